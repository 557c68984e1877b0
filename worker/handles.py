"""The runner's tensors by handle, as the supervisor keeps track of them: host copies, what to free, what crossed.

The runner keeps the tensors it was sent and the results it computed on its device, by handle
(worker/resident.py, worker/devstore.py): a run sends a held tensor as its handle, results come back as
Residents, and handles the Store dropped are freed with the next request. A handle is good for one runner
generation (``gen``): a runner that ends takes the tensors with no host copy (``lose``); the others are
uploaded again by their next run. ``counts`` says what crossed between host and runner.
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
import os
import time
import weakref
from array import array
from collections.abc import Callable, Sequence

import numpy as np

from planwire.transport import codec, dtypes
from planwire.transport.errors import ProtocolError
from planwire.worker import pipe
from planwire.worker.resident import Resident
from planwire.worker.store import Entry

log = logging.getLogger("planwire.worker")


_gen, _handle = operator.attrgetter("gen"), operator.attrgetter("handle")  # of a Resident


class Handles:
    """The Residents of the current runner generation, and their keeper: host copies come through ``fetch``
    (the sandbox's), and a Resident that dies is dropped here at once (``drop``: one call per dying tensor, a
    step's ~90 old state tensors); shared-memory segments in ``directory``."""

    def __init__(self, fetch: Callable[[list[Resident]], None], directory: str) -> None:
        self.fetch, self.dir = fetch, directory
        self.gen = 0
        self.live = False  # a runner of generation ``gen`` runs: a dropped handle is freed with its next request
        # The Residents alive, by handle, as plain weak references without callbacks: a Resident that dies
        # leaves both maps through ``drop`` (its ``__del__``), which costs a step's ~90 state tensors less
        # than a WeakValueDictionary's keyed reference and callback each (handles are never reused).
        self.residents: dict[int, weakref.ref[Resident]] = {}
        self.unsaved = Unsaved()  # those with no host copy yet
        self._handles = itertools.count(1)
        # handles to free with the next request: an array, not a list of ints kept across a burst (each
        # would pin the allocator arena it sits in: bench/load.py's RSS)
        self._free = array("q")
        # (dtype, shape, size, bytes) of each output of the runner's last answer: what pipe.SAME refers to
        self._last: list[tuple] = []
        self.counts = dict.fromkeys(
            (
                "uploads",
                "upload_bytes",
                "downloads",
                "download_bytes",
                "reused",
                "host_copies",
                "lost",
                "in_flight_max",
            ),
            0,
        )

    def copies(self) -> dict[str, int]:
        """What crossed between host and runner so far, and the tensors it holds now (any thread)."""
        return {**self.counts, "held": len(self.residents)}

    def _track(self, resident: Resident, saved: bool) -> None:
        ref = weakref.ref(resident)
        self.residents[resident.handle] = ref
        if not saved:
            self.unsaved.refs[resident.handle] = ref

    # -- handles ------------------------------------------------------------------------------------

    def new_generation(self) -> None:
        """A new runner: handles of earlier ones mean nothing to it (nor do its answers to theirs)."""
        self.gen += 1
        self._last = []
        self.live = True

    def new_handles(self, n: int) -> list[int]:
        return [next(self._handles) for _ in range(n)]

    def drop(self, resident: Resident) -> None:
        """A Resident is garbage: its handle is freed with the next request (when a runner holds it)."""
        handle = resident.handle
        self.residents.pop(handle, None)
        self.unsaved.refs.pop(handle, None)
        if resident.gen == self.gen and self.live:
            self._free.append(handle)

    def free_later(self, handles: Sequence[int]) -> None:
        self._free.extend(handles)

    def take_free(self) -> list[int]:
        free, self._free = self._free, array("q")
        return free.tolist()

    def lose(self, why: str) -> list[Resident]:
        """The runner ended: its tensors with a host copy are uploaded again when used; the others are lost
        (``why``), and returned."""
        held = [r for r in (ref() for ref in self.residents.values()) if r is not None]
        self.residents, self.unsaved = {}, Unsaved()
        self._free = array("q")
        self.live = False
        lost = []
        for r in held:
            r.gen = -1
            if r.host is None:
                r.lost = why
                lost.append(r)
        self.counts["lost"] += len(lost)
        return lost

    # -- crossing -----------------------------------------------------------------------------------

    def arguments(
        self, args: Sequence[np.ndarray | Resident], entries: Sequence[Entry | None], buffers: list
    ) -> tuple[list[pipe.TensorRef | int], list[np.ndarray]]:
        """A run's arguments as the runner gets them, and the shared copies to keep until it answers. One it
        holds goes by handle; any other crosses (in ``buffers``, or a large one through shared memory) and,
        when it is a stored tensor (``entries[i]``), the runner holds it from then on (the entry's array
        becomes a Resident with that host copy). ProtocolError (nothing sent) when an argument was lost with
        an earlier runner."""
        gen = self.gen
        try:  # every one held by this runner (a training step's state and data): their handles alone, in bulk
            if set(map(_gen, args)) == {gen}:
                return list(map(_handle, args)), []
        except AttributeError:  # a host array: the general case
            pass
        refs: list[pipe.TensorRef | int] = []
        keep = []
        held: dict[int, tuple[Resident, int]] = {}  # marked held once all are read (an error sends nothing)
        for i, (arr, entry) in enumerate(zip(args, entries, strict=True)):
            holder: Resident | None = None
            if isinstance(arr, Resident):  # an Ahead (worker/chain.py) too
                if arr.gen == gen:  # held by the runner: its handle alone
                    refs.append(arr.handle)
                    continue
                if id(arr) in held:  # crossing as an earlier argument: held under that one's handle
                    refs.append(held[id(arr)][1])
                    continue
                if arr.host is None:
                    raise ProtocolError("run_failed", f"argument {i} is gone: {arr.lost or 'not held by the runner'}")
                holder, arr = arr, arr.host
            elif entry is not None and entry.array is arr:  # a stored tensor's first use: held from now on
                holder = Resident(self, 0, -1, arr.dtype, arr.shape, host=arr)
                entry.array = holder
            wire, shape, buf = codec.to_frame(arr)
            loc = pipe.segment_of(arr) if buf.nbytes > pipe.INLINE_MAX else None
            if loc is None and buf.nbytes > pipe.INLINE_MAX:
                try:
                    shared = pipe.to_segment(self.dir, "i", arr, unlink=True)
                except OSError as e:  # shared memory full: this call copies through the pipe
                    log.warning("shared memory unavailable (%s): argument of %s bytes sent inline", e, buf.nbytes)
                else:
                    if holder is not None:
                        holder.host = shared  # the host copy is the shared one (on CPU the runner wraps it)
                    keep.append(shared)  # alive (its file too) until the runner has answered
                    loc = pipe.segment_of(shared)
            handle = 0
            if holder is not None:
                handle = next(self._handles)
                held[id(holder)] = (holder, handle)
            self.counts["uploads"] += 1
            self.counts["upload_bytes"] += buf.nbytes
            if loc is None:
                refs.append(pipe.TensorRef(wire, shape, index=len(buffers), handle=handle))
                buffers.append(buf)
            else:
                seg, offset = loc
                refs.append(
                    pipe.TensorRef(wire, shape, segment=os.path.basename(seg.path), offset=offset, handle=handle)
                )
        for holder, handle in held.values():
            holder.handle, holder.gen = handle, gen
            self._track(holder, True)
        return refs, keep

    def outputs(self, handles: list[int], ran: pipe.Ran, buffers: list[memoryview]) -> list[Resident]:
        """The outputs of a Ran message, held under ``handles``, as Residents (with a host copy where the
        runner sent the data, checked: dtype × shape against the bytes there)."""
        refs, last = ran.outputs, self._last
        self._last = []  # (none when this answer cannot be read)
        if len(refs) != len(handles):
            self._free.extend(handles)
            raise ProtocolError("internal", f"runner answered {len(refs)} outputs for {len(handles)}")
        # A SAME output is its kind in the previous answer, taken as a whole: only the others are read, in order
        same, n = pipe.SAME, len(refs)
        kinds: list = list(last) if len(last) == n else [None] * n
        todo = [i for i, ref in enumerate(refs) if ref is not same] if len(last) == n else range(n)
        for i in todo:  # all of them first: what a later SAME means, whatever fails below
            ref = refs[i]
            if type(ref) is int:  # as in the previous answer
                if ref != same or len(last) != n:
                    self._free.extend(handles)
                    raise ProtocolError("internal", f"runner output {i} refers to an earlier answer it cannot")
                continue
            try:
                dtype, shape = dtypes.to_numpy(ref.dtype), tuple(ref.shape)
                size = math.prod(shape)
            except (ValueError, TypeError) as e:
                self._free.extend(handles)
                raise ProtocolError("internal", f"runner output {i}: {e}") from None
            kinds[i] = (dtype, shape, size, size * dtype.itemsize)
        self._last = kinds
        try:  # the data sent: each checked before any Resident is made
            sent = [
                (i, self.data(refs[i], buffers, f"runner output {i}"))
                for i in todo
                if type(refs[i]) is not int and refs[i].has_data  # type: ignore[union-attr]
            ]
        except Exception:
            self._free.extend(handles)
            raise
        out = Resident.held(self, self.gen, handles, kinds, time.monotonic())
        refs_of = list(map(weakref.ref, out))  # tracked by handle, in bulk; those sent have their host copy
        self.residents.update(zip(handles, refs_of, strict=True))
        unsaved = self.unsaved.refs
        unsaved.update(zip(handles, refs_of, strict=True))
        for i, host in sent:
            out[i].host = host
            del unsaved[handles[i]]
        self.counts["reused"] += ran.reused
        return out

    def data(self, ref: pipe.TensorRef, buffers: list[memoryview], what: str) -> np.ndarray:
        """The host array of a tensor the runner sent (in a buffer, or a segment the supervisor now owns)."""
        if ref.segment:
            if not ref.segment.startswith("o"):
                raise ProtocolError("internal", f"{what}: runner named segment {ref.segment!r}")
            seg = pipe.open_segment(self.dir, ref.segment, unlink=True)
            # the supervisor's now: renamed, so that a runner's end (which removes its leftovers) keeps it
            held = os.path.join(self.dir, f"h{next(self._handles)}")
            os.rename(seg.path, held)
            seg.path = held
            try:
                array = pipe.array_in(seg, ref.dtype, ref.shape, ref.offset)
            except ValueError as e:
                raise ProtocolError("internal", f"{what}: {e}") from None
        else:
            if not 0 <= ref.index < len(buffers):
                raise ProtocolError("internal", f"{what} points to a missing buffer")
            array = codec.from_frame(ref.dtype, ref.shape, buffers[ref.index], what=what)
        self.counts["downloads"] += 1
        self.counts["download_bytes"] += array.nbytes
        return array

    # -- host copies --------------------------------------------------------------------------------

    def copied(self, resident: Resident, host: np.ndarray) -> None:
        """``resident`` has its host copy now."""
        resident.host = host
        self.unsaved.refs.pop(resident.handle, None)
        self.counts["host_copies"] += 1


class Unsaved:
    """The Residents only the runner holds (no host copy yet), by handle: read as a mapping of the live ones."""

    __slots__ = ("refs",)

    def __init__(self) -> None:
        self.refs: dict[int, weakref.ref[Resident]] = {}

    def __bool__(self) -> bool:
        return bool(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __contains__(self, handle: object) -> bool:
        return handle in self.refs

    def values(self) -> list[Resident]:
        return [r for ref in list(self.refs.values()) if (r := ref()) is not None]

    def born_by(self, t: float) -> list[Resident]:
        """The live ones born by monotonic time ``t``: the first ones, as they are tracked in the order they
        were born (a step's state, born with its answer, is passed over in one look, not tensor by tensor)."""
        out = []
        for ref in list(self.refs.values()):
            r = ref()
            if r is None:
                continue
            if r.born > t:
                break
            out.append(r)
        return out
