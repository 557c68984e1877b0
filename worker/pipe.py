"""The private pipe between a worker's supervisor and its sandboxed runner, and the shared memory they use.

Requests and answers are pipelined: the supervisor may send several runs before reading an answer, and the
runner answers each, in order, as soon as it is done (``Reader`` keeps what a read took past one message).
Nothing here is the public protocol and no Python objects are serialized: a message is a msgpack header (msgspec
structs below) plus raw buffers, over a Unix socket pair. Tensors of up to ``INLINE_MAX`` bytes travel
through the socket; larger ones live in files of a per-worker shared-memory directory that both
processes map, so a stored tensor is never copied per call.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Sequence

import msgspec
import numpy as np

from planwire.transport import dtypes

INLINE_MAX = 64 << 10  # bytes; below this a copy through the socket is cheaper than a mapping
_ALIGN = 16
_PREFIX = struct.Struct("<QII")  # body bytes, header bytes, number of buffers


class TensorRef(msgspec.Struct, array_like=True):
    """A tensor: buffer ``index`` of the message, or its bytes at ``offset`` of segment ``segment``, or
    neither: only the tensor the runner holds under ``handle`` (worker/devstore.py). With data and a
    handle, in a run's arguments: the runner uploads it and holds it under that handle."""

    dtype: str
    shape: list[int]
    index: int = -1
    segment: str = ""
    offset: int = 0
    handle: int = 0  # 0: none

    @property
    def has_data(self) -> bool:
        return self.index >= 0 or bool(self.segment)


class Load(msgspec.Struct, tag="load", array_like=True):
    """Create the session of plan ``plan`` from buffer 0 (first dropping the sessions of ``drop``)."""

    plan: str
    name: str
    drop: list[str] = []  # plans unregistered since the last request (delete_plan)
    free: list[int] = []  # handles of held tensors the supervisor dropped


class Run(msgspec.Struct, tag="run", array_like=True):
    """Run plan ``plan`` (created first from buffer 0 when ``load``; the sessions of ``drop`` dropped first).
    An argument the runner holds already is its handle alone (a step's ~90 state tensors: ints, not structs,
    to encode and decode); any other is a TensorRef with its data."""

    plan: str
    name: str
    args: list[TensorRef | int]
    load: bool = False
    drop: list[str] = []  # plans unregistered since the last request (delete_plan)
    free: list[int] = []  # handles of held tensors the supervisor dropped
    out: list[int] = []  # the handles the runner holds the outputs under
    fetch: list[int] = []  # outputs whose data comes back with the answer (the client fetches them)
    inline_max: int = 0  # and outputs of at most this many bytes (run.inline_max)
    save: bool = False  # every output comes back with its data (the host copy; a CPU runner then holds a
    # large one by the shared copy): runs queued behind this one may crash the runner, and must not lose it


class Fetch(msgspec.Struct, tag="fetch", array_like=True):
    """Send the data of held tensors ``handles`` (a get, a release, or the lazy host copy); ``rebind``: a
    CPU runner then holds each large one by the shared copy instead of its own memory."""

    handles: list[int]
    rebind: bool = False
    free: list[int] = []


class Ready(msgspec.Struct, tag="ready", array_like=True):
    pid: int
    memory_limit: int  # bytes of RLIMIT_DATA set, 0 when none


class Loaded(msgspec.Struct, tag="loaded", array_like=True):
    inputs: list[tuple[str, str, list[int | str | None]]]
    outputs: list[tuple[str, str, list[int | str | None]]]
    placement: str = ""  # where its nodes run, when not wholly on the worker's device (OrtPlan.placement)
    nchwc: tuple[int, int] = (0, 0)  # Convs run as NCHWc kernels, their block (OrtPlan.nchwc)


class Ran(msgspec.Struct, tag="ran", array_like=True):
    """Each output is held under the run's ``out`` handle. One sent without data whose dtype and shape are those
    of the same output in the runner's previous answer, to a run of the same plan, is ``SAME`` (a training
    step's new state: no per-tensor struct to build, encode and decode); any other is a TensorRef."""

    outputs: list[TensorRef | int]  # with data where asked
    reused: int = 0  # outputs written into freed buffers of earlier runs


class Fetched(msgspec.Struct, tag="fetched", array_like=True):
    tensors: list[TensorRef]


class Failed(msgspec.Struct, tag="failed", array_like=True):
    code: str
    message: str


SAME = 0  # a Ran output described by the previous answer (see Ran)

ToRunner = Load | Run | Fetch
FromRunner = Ready | Loaded | Ran | Fetched | Failed
_encoder = msgspec.msgpack.Encoder()
_to_runner = msgspec.msgpack.Decoder(ToRunner)
_from_runner = msgspec.msgpack.Decoder(FromRunner)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Spinning needs a core to spare: a client, the supervisor (and its ZeroMQ I/O thread) and the runner are
# all busy within a call. On the 2-core VM the bench runs on, spinning made tiny calls slower (a woken
# thread waited for the spinner's core), so with fewer cores than this nothing spins.
SPIN_CORES = 4


class Spin:
    """Watching the pipe instead of sleeping on it, only while that pays: on a host of SPIN_CORES cores or
    more, and while most spins catch what they
    wait for, and while this thread gets the CPU it spins on (its CPU time over the spin's wall time, a moving
    average; on a host with no core to spare the spinner is descheduled and takes a core the other side, or
    a client, needs). Otherwise it spins only every ``probe``-th time, to find out whether it pays again."""

    def __init__(self, probe: int = 32) -> None:
        self.probe, self.hits, self.share, self._n = probe, 1.0, 1.0, 0
        self.enabled = _cores() >= SPIN_CORES

    def allowed(self) -> bool:
        if not self.enabled:
            return False
        if self.hits >= 0.5 and self.share >= 0.8:
            return True
        self._n += 1
        return self._n % self.probe == 0

    def until(self, ready: Callable[[], object], end: float) -> bool:
        """Poll ``ready`` until ``perf_counter()`` reaches ``end``; whether it became true."""
        clock = time.perf_counter
        t0, c0 = clock(), time.thread_time()
        hit = False
        while clock() < end:
            if ready():
                hit = True
                break
        wall = clock() - t0
        if wall > 20e-6:
            self.share += (min((time.thread_time() - c0) / wall, 1.0) - self.share) / 8
        self.hits += (hit - self.hits) / 8
        return hit


class PipeClosed(ConnectionError):
    """The other side closed the pipe (for the supervisor: the runner died)."""


def pack(msg: msgspec.Struct, buffers: Sequence[bytes | memoryview] = ()) -> list[bytes | memoryview]:
    """One message's parts: prefix, buffer sizes, header, then each buffer at a 16-byte aligned offset."""
    header = _encoder.encode(msg)
    sizes = [memoryview(b).nbytes for b in buffers]
    head = _PREFIX.size + 8 * len(sizes) + len(header)
    parts: list[bytes | memoryview] = [b"", struct.pack(f"<{len(sizes)}Q", *sizes), header]
    offset = head - _PREFIX.size  # body offset so far
    for b, n in zip(buffers, sizes, strict=True):
        pad = -offset % _ALIGN
        if pad:
            parts.append(bytes(pad))
        parts.append(b if isinstance(b, bytes) else memoryview(b).cast("B"))
        offset += pad + n
    parts[0] = _PREFIX.pack(offset, len(header), len(sizes))
    return parts


def send(sock: socket.socket, msg: msgspec.Struct, buffers: Sequence[bytes | memoryview] = ()) -> None:
    """One message (``pack``), in one system call when it fits the socket's buffer."""
    send_parts(sock, pack(msg, buffers))


MAX_PARTS = 512  # parts per sendmsg (the kernel takes at most IOV_MAX, 1024 on Linux)


def send_parts(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    """Packed messages, back to back: several in one system call (one wake-up of the other side)."""
    for i in range(0, len(parts), MAX_PARTS):
        view = parts[i : i + MAX_PARTS]
        total = sum(len(p) for p in view)
        sent = sock.sendmsg(view)
        while sent < total:  # a large message, or a signal, may cut a send short
            skip = sent
            rest = []
            for p in view:
                n = len(p)
                if skip >= n:
                    skip -= n
                    continue
                rest.append(memoryview(p)[skip:])
                skip = 0
            sent += sock.sendmsg(rest)


def _read_exact(sock: socket.socket, view: memoryview) -> None:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise PipeClosed("pipe closed")
        got += k


_CHUNK = 64 << 10  # bytes a read takes at most when it does not know the message's size yet


class Reader:
    """Messages from one end of the pipe, in order. Several may arrive back to back (the supervisor keeps
    a window of runs in flight; the runner answers each at once), so a read may take the start of the next
    message too: it stays here, and ``pending`` says whether a whole one is already in hand."""

    def __init__(self, sock: socket.socket, decoder: msgspec.msgpack.Decoder) -> None:
        self.sock, self.decoder = sock, decoder
        self.buf = bytearray()

    def pending(self) -> bool:
        """Whether a whole message is here (read it without waiting)."""
        buf = self.buf
        return len(buf) >= _PREFIX.size and len(buf) >= _PREFIX.size + _PREFIX.unpack_from(buf)[0]

    def _fill(self) -> None:
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise PipeClosed("pipe closed")
        self.buf += chunk

    def read(self):  # type: ignore[no-untyped-def]  (the decoder's message, its buffers)
        buf = self.buf
        while len(buf) < _PREFIX.size:
            self._fill()
        body_len, hlen, nbuf = _PREFIX.unpack_from(buf)
        body = np.empty(body_len, np.uint8)  # its own, aligned allocation; buffers are views of it
        view = memoryview(body).cast("B")
        have = min(len(buf) - _PREFIX.size, body_len)
        view[:have] = memoryview(buf)[_PREFIX.size : _PREFIX.size + have]
        del buf[: _PREFIX.size + have]
        _read_exact(self.sock, view[have:])  # the rest of a large message, straight into place
        if 8 * nbuf + hlen > body_len:
            raise ValueError(f"a message of {body_len} bytes cannot hold {nbuf} buffers and {hlen} header bytes")
        sizes = struct.unpack_from(f"<{nbuf}Q", view, 0)
        offset = 8 * nbuf
        msg = self.decoder.decode(view[offset : offset + hlen])
        offset += hlen
        buffers = []
        for n in sizes:
            offset += -offset % _ALIGN
            if offset + n > body_len:
                raise ValueError("a buffer runs past the end of its message")
            buffers.append(view[offset : offset + n])
            offset += n
        return msg, buffers


def requests(sock: socket.socket) -> Reader:
    """The runner's reader of the supervisor's requests."""
    return Reader(sock, _to_runner)


def replies(sock: socket.socket) -> Reader:
    """The supervisor's reader of the runner's answers."""
    return Reader(sock, _from_runner)


# -- shared memory --------------------------------------------------------------------------------


def shm_dir() -> str:
    """A fresh private directory for this worker's segments: /dev/shm when there is one (RAM), else tmp.
    Directories left by workers that were killed (their pid gone) are removed first: they hold RAM."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            parts = name.split("-")
            if len(parts) == 3 and parts[0] == "planwire" and parts[1].isdigit() and not _alive(int(parts[1])):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"planwire-{os.getpid()}-", dir=base)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Segment(mmap.mmap):
    """A mapped shared-memory file; the file goes when the mapping is garbage (unlink=True)."""

    path: str
    unlink: bool

    def __del__(self) -> None:
        if getattr(self, "unlink", False):
            with contextlib.suppress(OSError):
                os.unlink(self.path)


_names = itertools.count()


def create_segment(directory: str, prefix: str, nbytes: int, *, unlink: bool) -> Segment:
    """A new segment of ``nbytes`` (at least 1) with its space reserved: OSError(ENOSPC) now rather
    than SIGBUS on a later write when the shared-memory file system is full."""
    path = os.path.join(directory, f"{prefix}{next(_names)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.posix_fallocate(fd, 0, max(1, nbytes))
            seg = Segment(fd, max(1, nbytes))
        except BaseException:
            os.unlink(path)
            raise
    finally:
        os.close(fd)
    seg.path, seg.unlink = path, unlink
    return seg


def open_segment(directory: str, name: str, *, unlink: bool, writable: bool = False) -> Segment:
    """Map an existing segment by name (a plain name inside ``directory``, never a path)."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"bad segment name {name!r}")
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        seg = Segment(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    finally:
        os.close(fd)
    seg.path, seg.unlink = path, unlink
    return seg


def segment_of(array: np.ndarray) -> tuple[Segment, int] | None:
    """(segment, byte offset) when ``array`` is a C-contiguous view into a Segment, else None."""
    base = array.base
    while base is not None and not isinstance(base, Segment):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or not array.flags.c_contiguous:
        return None
    start = np.frombuffer(base, np.uint8, count=1).ctypes.data
    return base, array.ctypes.data - start


def array_in(seg: Segment, dtype: str, shape: Sequence[int], offset: int = 0) -> np.ndarray:
    """A view of ``dtype[shape]`` at ``offset`` of ``seg``; ValueError when it does not fit."""
    dt = dtypes.to_numpy(dtype)
    n = math.prod(shape)
    if offset < 0 or offset % dt.itemsize or offset + n * dt.itemsize > len(seg):
        raise ValueError(f"{dtype}{list(shape)} at offset {offset} does not fit segment of {len(seg)} bytes")
    return np.frombuffer(seg, dt, count=n, offset=offset).reshape(shape)


def to_segment(directory: str, prefix: str, array: np.ndarray, *, unlink: bool) -> np.ndarray:
    """A copy of ``array`` in a new segment (little-endian, C order), as a view of that segment."""
    seg = create_segment(directory, prefix, array.nbytes, unlink=unlink)
    out = np.frombuffer(seg, array.dtype, count=array.size).reshape(array.shape)
    out[...] = array
    return out
