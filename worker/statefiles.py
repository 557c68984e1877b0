"""The file format of a plan-worker state directory (``--state-dir``; worker/statedir.py holds the directory):
its layout, the typed headers of its files, framed files, atomic writes, owners' names on disk, and a tensor
file read back and validated.

Layout (directories 0700, files 0600; one worker per directory, held with ``flock`` on ``lock``)::

    DIR/lock                  the pid of the worker using the directory (decimal, newline)
    DIR/session               JSON {"format": 1, "session": 32 lowercase hex digits} (PROTOCOL.md §4.3)
    DIR/owners                JSON {"format": 1, "tokens": {IDENTITY: OWNER}}: identities issued at hello (secret)
    DIR/privacy               JSON {"format": 1, "spent": {OWNER: [[NOISE_MULTIPLIER, COUNT], ...]}}
    DIR/tensors/O/K.t         one tensor of owner O (or a failed run's record)
    DIR/plans/PID.plan        a plan's bytes, name and ports (PID: the sha256 of the bytes, 64 hex digits)
    DIR/plans/PID.holders     JSON {"format": 1, "holders": [OWNER, ...]}: the owners that registered it
    DIR/**/.tmp-NAME          a write in progress (removed at start: never acknowledged)

Names. OWNER is an owner's name on disk, ``[0-9a-z]+``: ``k`` + the hex of a CURVE public key (the same
client across restarts), or ``c`` + this incarnation's 8-hex-digit nonce + the hex of a connection's
routing id; an owner restored from disk keeps the name it was read under. In paths, O and K are the first
40 hex digits of the sha256 of the UTF-8 of OWNER and of the tensor's key. JSON is UTF-8, objects with
exactly the fields named (an unknown field makes the file invalid), ``format`` always 1.

Tensor and plan files: ``MAGIC`` (8 bytes ``PWSTATE\x01``), the header's length (u32 little-endian, at
most 1 MiB), a JSON header, zero padding up to the next multiple of 64 bytes from the file's start, then
the payload, to the end of the file. A plan file's header is ``{"plan": PID, "name": str, "inputs": [PORT],
"outputs": [PORT]}`` (PORT: ``[name, dtype, shape]``, a dim an int, a str or null) and its payload the
plan's bytes. A tensor file's header (fields at their default omitted)::

    {"owner": OWNER, "key": str, "dtype": "float", "shape": [], "tags": [], "private": false, "rows": 0,
     "failed": str (a failed run's record: no payload, no release),
     "release": {"plan": FINGERPRINT, "output": str, "how": "as_is" | "update", "rows": int,
                 "param": str (default ""), "base": {"dtype", "shape"}, "released": {"dtype", "shape"}}}

Its payload is the tensor's bytes (the wire dtype, C order, little-endian: PROTOCOL.md), then, when there
is a ``release`` with ``base`` and/or ``released``, each of those arrays in that order, each starting at
the next multiple of 64 bytes from the payload's start (zero padding between); the file's size must be
exactly that. ``release`` (only on a private tensor) is the pending release of a private result
(worker/release.py's Pending): the policy rule's plan FINGERPRINT, the plan output it is, ``how`` and the
input ``param`` it updates (from the rule: at a restart the rule the policy in force has for FINGERPRINT
must still release that output the same way, or the result stays private), the fewest rows of private
data it was computed from, the ``base`` of an update (the parameter as the client last stored it) and,
once a noised update was released, the ``released`` value, which every later read returns (any other
release computes the same value again, so it is not kept). Limits on every field: the typed structs
below (``TensorHeader``, ``ReleaseRecord``, ``PrivacyRecord``, ...).

``privacy`` holds, per owner, how many noised releases it was given at each noise multiplier (> 0; the
same multiplier may appear twice, the counts add up): its epsilon is dp-accounting's RDP accountant's for
exactly those Gaussian events, at the policy's delta. A release writes it (with the new event) before it
writes the tensor with its ``released`` value, and both before the reply: a crash in between can only
overcount. A damaged ``privacy`` file is never read as a clean slate: noised releases are refused until
it is repaired (removing it resets every owner's budget).

"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from msgspec import Meta, Struct

from planwire.transport import dtypes
from planwire.transport import messages as m
from planwire.worker.store import ClientId

MAGIC = b"PWSTATE\x01"  # tensor and plan files: magic, u32 header length, JSON header, zero padding, payload
ALIGN = 64
MAX_HEADER = 1 << 20
FORMAT = 1
SESSION_RE = re.compile(r"[0-9a-f]{32}")

# -- file headers (typed: a hostile header fails to decode and its file is skipped) -------------------

OwnerName = Annotated[str, Meta(min_length=1, max_length=1024, pattern=r"^[0-9a-z]+$")]


class Part(Struct, forbid_unknown_fields=True):
    """An array after the tensor in a tensor file's payload (at the next multiple of 64 bytes)."""

    dtype: m.DType
    shape: m.Shape


class ReleaseRecord(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A private result's pending release (worker/release.py's Pending) under the policy rule ``plan``."""

    plan: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    output: Annotated[str, Meta(min_length=1, max_length=4096)]
    how: Literal["as_is", "update"]
    rows: Annotated[int, Meta(ge=0)]
    param: Annotated[str, Meta(max_length=4096)] = ""
    base: Part | None = None
    released: Part | None = None


class TensorHeader(Struct, forbid_unknown_fields=True, omit_defaults=True):
    owner: OwnerName
    key: m.Key
    dtype: m.DType = "float"
    shape: m.Shape = []
    tags: list[m.Tag] = []
    private: bool = False
    rows: Annotated[int, Meta(ge=0)] = 0
    failed: Annotated[str, Meta(max_length=1 << 16)] | None = None  # a failed run's record (no payload)
    release: ReleaseRecord | None = None  # a private result's pending release (its arrays follow the tensor's)


class PortRecord(Struct, array_like=True, forbid_unknown_fields=True):
    name: str
    dtype: m.DType
    shape: Annotated[list[Annotated[int, Meta(ge=0, le=2**62)] | str | None], Meta(max_length=m.MAX_RANK)]


class PlanHeader(Struct, forbid_unknown_fields=True):
    plan: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$")]
    name: Annotated[str, Meta(max_length=4096)]
    inputs: list[PortRecord]
    outputs: list[PortRecord]


class HoldersRecord(Struct, forbid_unknown_fields=True):
    format: int
    holders: list[OwnerName]


class OwnersRecord(Struct, forbid_unknown_fields=True):
    format: int
    tokens: dict[Annotated[str, Meta(min_length=1, max_length=256)], OwnerName]


class SessionRecord(Struct, forbid_unknown_fields=True):
    format: int
    session: str


NoiseMultiplier = Annotated[float, Meta(gt=0, le=1e6)]


class PrivacyRecord(Struct, forbid_unknown_fields=True):
    format: int
    spent: dict[OwnerName, list[tuple[NoiseMultiplier, Annotated[int, Meta(ge=1, le=1 << 40)]]]]


@dataclass
class KeptRelease:
    """A pending release as kept on disk (worker/state.py converts it from and to release.Pending)."""

    plan: str  # the fingerprint of the policy rule it was made under
    output: str
    how: str  # "as_is" or "update"
    param: str
    rows: int
    base: np.ndarray | None = None
    released: np.ndarray | None = None


# -- low-level file operations -------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, parts: Iterable[Any]) -> tuple[Path, int]:
    """``parts`` (buffers) written to ``path``'s temporary file: (its path, its open descriptor)."""
    tmp = path.with_name(f".tmp-{path.name}")
    with contextlib.suppress(FileNotFoundError):  # left by a crash: never followed if it is a link
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for part in parts:
            view = memoryview(part).cast("B")
            while view.nbytes:
                view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp, fd


def write_atomic(path: Path, parts: Iterable[Any], sync: bool = True) -> None:
    """Write ``parts`` (buffers) as ``path``: a temporary file, fsync, rename over ``path``, fsync its directory
    (without ``sync``, no fsyncs: the file survives a crash of this process, not of the machine)."""
    tmp, fd = write_temp(path, parts)
    try:
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def framed(header: bytes) -> list[bytes]:
    """MAGIC, the header's length and the header, padded so the payload starts aligned."""
    head = MAGIC + struct.pack("<I", len(header)) + header
    return [head, bytes(-len(head) % ALIGN)]


def read_framed(path: Path) -> tuple[bytes, Any, int]:
    """(header bytes, open file positioned at the payload, payload size); ValueError for a malformed file."""
    f = open(path, "rb")  # noqa: SIM115  (returned to the caller, who closes it)
    try:
        size = os.fstat(f.fileno()).st_size
        start = f.read(len(MAGIC) + 4)
        if len(start) < len(MAGIC) + 4 or start[: len(MAGIC)] != MAGIC:
            raise ValueError("not a planwire state file (bad magic)")
        (n,) = struct.unpack("<I", start[len(MAGIC) :])
        if n > MAX_HEADER or len(MAGIC) + 4 + n > size:
            raise ValueError(f"header length {n} past the file's end or over {MAX_HEADER}")
        header = f.read(n)
        offset = len(MAGIC) + 4 + n
        offset += -offset % ALIGN
        if offset > size:
            raise ValueError("truncated before its payload")
        f.seek(offset)
        return header, f, size - offset
    except BaseException:
        f.close()
        raise


def nbytes(part: Part) -> int:
    n = dtypes.to_numpy(part.dtype).itemsize
    for dim in part.shape:
        n *= dim
    return n


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:40]


# -- owners: their names on disk -------------------------------------------------------------------------


class Names:
    """Owner ids <-> names on disk. A CURVE owner (``k:KEY``) keeps its name across restarts: the same key
    is the same client. A connection's owner (``c:ROUTING-ID``) is named with this incarnation's nonce, so
    a new connection that happens to get an old routing id can never be taken for an old client; a restored
    one (``s:NAME``) acts only through the identity it was issued at hello."""

    def __init__(self) -> None:
        self.nonce = secrets.token_hex(4)

    def name(self, owner: ClientId) -> str:
        kind, _, rest = owner.partition(b":")
        if kind == b"k":
            return "k" + rest.hex()
        if kind == b"s":
            return rest.decode("ascii")
        return "c" + self.nonce + rest.hex()

    @staticmethod
    def owner(name: str) -> ClientId:
        if name.startswith("k"):
            try:
                return b"k:" + bytes.fromhex(name[1:])
            except ValueError:
                pass
        return b"s:" + name.encode("ascii")


def read_tensor(
    d: Path, path: Path, names: Names
) -> tuple[ClientId, str, TensorHeader, np.ndarray | None, KeptRelease | None]:
    """A tensor file ``path`` in owner directory ``d``, validated: (owner, key, header, array or None for a
    failed run's record, its pending release if any); ValueError (or OSError, msgspec.DecodeError) saying
    what is wrong with it."""
    if path.is_symlink() or not path.is_file():
        raise ValueError("not a regular file")
    header_bytes, f, size = read_framed(path)
    with f:
        h = msgspec.json.decode(header_bytes, type=TensorHeader)
        owner = names.owner(h.owner)
        if d.name != digest(h.owner) or path.name != f"{digest(h.key)}.t":
            raise ValueError(f"misplaced: its header names key {h.key!r} of another owner or file")
        if h.failed is not None:
            if size or h.release is not None:
                raise ValueError("a failed run's record with a payload")
            return owner, h.key, h, None, None
        r = h.release
        if r is not None and not h.private:
            raise ValueError("a pending release on a tensor that is not private")
        parts = [Part(h.dtype, h.shape)]
        if r is not None:
            parts += [p for p in (r.base, r.released) if p is not None]
        sizes = [nbytes(p) for p in parts]
        need = sum(sizes) + sum(-n % ALIGN for n in sizes[:-1])
        if need != size:
            raise ValueError(f"{h.dtype}{h.shape} needs {need} bytes, the file holds {size}")
        arrays = []
        for i, (p, n) in enumerate(zip(parts, sizes, strict=True)):
            if i:
                f.seek(-sizes[i - 1] % ALIGN, os.SEEK_CUR)
            dt = dtypes.to_numpy(p.dtype)
            a = np.fromfile(f, dtype=dt, count=n // dt.itemsize)
            if a.nbytes != n:
                raise ValueError("shorter than its header says")
            arrays.append(a.reshape(p.shape))
    kept = None
    if r is not None:
        base = arrays[1] if r.base is not None else None
        released = arrays[-1] if r.released is not None else None
        kept = KeptRelease(r.plan, r.output, r.how, r.param, r.rows, base, released)
    return owner, h.key, h, arrays[0], kept
