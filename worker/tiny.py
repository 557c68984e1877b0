"""The tiny call's prepared path: a direct-lane run (worker/direct.py) answered in one straight pass.

The general path (Service.decode, begin, DirectLane.run, complete) builds an Origin, a RunJob, a list of
entries, a reply struct through generic helpers and a stats row through a dispatch on the request's kind:
most of a tiny call's CPU. This path does the same checks and the same changes for the one case that
dominates a tiny call, in one function:

* a ``run`` header alone (arguments by ``ref``, no inline tensor), on a plan the client holds, whose
  arguments are the client's (or the worker's public) stored host arrays, none private;
* a call the lane's prepared verdict admits: per plan, its session's C-level run and port names, and per
  (dtypes, shapes) of the arguments whether the plan's signature accepts them and the call is small
  (the verdict is reset when the plan is unregistered or registered again).

Anything else, and any check that fails, returns None BEFORE anything changed: the general path then
handles the request from the start, with its exact errors and codes. After the run, a refused quota (or
any failure) is completed by ``Service.complete`` as the general path would. What changes is what the
general path changes: the owner is seen, the outputs stored (and no longer failed), the lane's counts, the
reply observed by stats once (``Stats.ran``) and the reply frames are the same bytes.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Sequence

import numpy as np
from msgspec import UNSET

from planwire.transport import codec, framing
from planwire.transport import messages as m
from planwire.transport.framing import Frame
from planwire.worker.direct import DirectLane, _Bound
from planwire.worker.jobs import Origin, RunJob
from planwire.worker.service import Service

log = logging.getLogger("planwire.worker")

_SIGNATURE, _MAX_HEADER = framing.SIGNATURE, framing.MAX_HEADER_BYTES
_decode_fast = m.request_decoder.decode_fast  # None unless proven free of repeated keys (messages.py)
_encode = m.encoder.encode
_ndarray = np.ndarray
_clock = time.perf_counter
_to_frame = codec.to_frame
_Run, _Tensors, _Ok, _KeyedTensor = m.Run, m.Tensors, m.Ok, m.KeyedTensor
_nbytes = operator.attrgetter("nbytes")  # map(), not a comprehension: Python 3.11 makes a function per comprehension


class TinyPath:
    """``path(frames, client)``: the reply frames of a tiny direct-lane run, or None (the general path's)."""

    def __init__(self, service: Service, lane: DirectLane) -> None:
        self.service = service
        self.lane = lane
        # a request longer than this is the general path's (too_large, or a header over MAX_HEADER_BYTES)
        self._max_header = min(_MAX_HEADER, service.limits.max_message_bytes - len(_SIGNATURE))
        # (frames, request) of the last request declined after a full decode: what framing.unpack_request
        # would give for those frames (two frames, the signature, a header under every limit, no repeated key)
        self._declined: tuple[Sequence[Frame], m._Message] | None = None

    def decoded(self, frames: Sequence[Frame]) -> m._Message | None:
        """The request of ``frames`` if this path decoded them (and declined them) just now: the general path
        takes it (with no buffers: two frames) instead of decoding it again. Once."""
        declined, self._declined = self._declined, None
        if declined is not None and declined[0] is frames:
            return declined[1]
        return None

    def __call__(self, frames: Sequence[Frame], client: bytes) -> list[Frame] | None:
        t0 = _clock()
        self._declined = None
        if len(frames) != 2:
            return None
        sig, header = frames
        if len(header) > self._max_header or sig != _SIGNATURE:
            return None
        try:
            msg = _decode_fast(header)
        except Exception:  # the general path says what is wrong
            return None
        if msg is None:
            return None  # escapes, defaults written out or a repeated key: the general path decides
        self._declined = (frames, msg)  # valid as framing.unpack_request decodes it: the general path's if declined
        if type(msg) is not _Run or self.lane.declines(msg.plan):  # not direct-safe: for the sandbox
            return None
        service = self.service
        outputs, pid, fetch = msg.outputs, msg.plan, msg.fetch
        plan = service.plans.get(pid)
        if plan is None or len(outputs) != len(plan.ports.outputs) or pid in service._any_rank:
            return None
        if fetch and max(fetch) >= len(outputs):
            return None
        store = service.store
        if store.observer is not None:  # --state-dir: the general path (and the group commit of its replies)
            return None
        owner = service.owners.owner(client)
        if not service.holders.holds(pid, owner):
            return None
        if len(outputs) > 1 and len(set(outputs)) != len(outputs):
            return None
        own = store._own
        if own and any(key in own for key in outputs):  # forbidden: the general path refuses it
            return None
        space = store._spaces.get(owner)
        args = []
        for a in msg.args:
            key = a.ref
            if key is UNSET or a.tensor is not UNSET:
                return None
            entry = space.get(key) if space is not None else None
            if entry is None:
                entry = own.get(key)
                if entry is None:
                    return None
            array = entry.array
            if entry.private or type(array) is not _ndarray:
                return None
            args.append(array)
        run = self.lane.prepared(pid, plan, args)
        if run is None:
            return None
        service._act_for(client)  # what follows acts for this owner
        try:
            results = run(args)
        except Exception:  # the general path runs it again (the lane declines it now) and answers
            self.lane.decline(pid, args)
            return None
        self.lane.counts["direct_runs"] += 1
        rid = msg.id
        try:
            sizes = list(map(_nbytes, results))
            # no observer here: a call that surely fits is all check_quota would check (its text built if not)
            if len(sizes) != len(outputs) or not store.fits(owner, sum(sizes)):
                store.check_quota(owner, zip(outputs, sizes, strict=True), f"outputs of run #{rid}")
            store.put_outputs(owner, outputs, results)
            form = run.reply if type(run) is _Bound else None
            if form and not fetch and msg.inline_max >= form.largest and form.session is service.session:
                frames_out = [_SIGNATURE, form.head % (rid, *map(_encode, outputs))]
                for r in results:  # the run's own arrays, C-contiguous (worker/direct.py _Bound)
                    frames_out.append(memoryview(r).cast("B"))
            else:
                frames_out = _reply(msg, service.session, results, sizes)
                if form is None:  # type(run) is _Bound: its replies' form, made once
                    run.reply = _Form.of(msg, service.session, results, sizes, frames_out[1])  # type: ignore[union-attr]
        except Exception:  # e.g. quota_exceeded: completed (refused, outputs marked failed) as the general path does
            job = RunJob(msg, plan, args, [None] * len(args), origin=Origin(frames, client, t0))
            return service.complete(job, results)
        stats = service.stats
        if stats is not None:  # the operator's view, as Service.reply observes a reply
            try:
                stats.ran(frames, client, owner, msg, _clock() - t0, sizes)
            except Exception:
                log.exception("stats of request #%d not recorded", rid)
        return frames_out


def _reply(msg: m.Run, session: str, results: list[np.ndarray], sizes: list[int]) -> list[Frame]:
    """The frames of the reply to run ``msg`` that gave ``results`` (of ``sizes`` bytes): its ``fetch`` outputs
    and those within its ``inline_max`` ride on it, in that order."""
    fetch, outputs, inline_max = msg.fetch, msg.outputs, msg.inline_max
    if inline_max:
        fetch = list(fetch)
        for i, n in enumerate(sizes):
            if n <= inline_max and i not in fetch:
                fetch.append(i)
    if not fetch:
        return [_SIGNATURE, _encode(_Ok(re=msg.id, session=session))]
    out, bufs = [], []
    for i in fetch:
        wire, shape, buf = _to_frame(results[i])
        out.append(_KeyedTensor(key=outputs[i], dtype=wire, shape=shape, frame=len(bufs)))
        bufs.append(buf)
    return [_SIGNATURE, _encode(_Tensors(re=msg.id, session=session, tensors=out)), *bufs]


class _Form:
    """The header of every reply to a run of one prepared signature (its outputs' dtypes and shapes are fixed)
    that carries all its outputs in order (no ``fetch``, each within ``inline_max``): one bytes format of the
    request id and the output keys. Made from a reply msgspec encoded, and kept only if it gives those bytes."""

    __slots__ = ("head", "largest", "session")

    def __init__(self, head: bytes, largest: int, session: str) -> None:
        self.head, self.largest, self.session = head, largest, session

    @classmethod
    def of(
        cls, msg: m.Run, session: str, results: list[np.ndarray], sizes: list[int], header: bytes
    ) -> _Form | bool | None:
        """The form of ``header``, msgspec's encoding of the reply to ``msg``: None (not yet) when that reply
        does not carry every output in order, False (never: this signature's replies are encoded each time) when
        the form would not give its bytes."""
        if msg.fetch or not msg.inline_max or max(sizes) > msg.inline_max:
            return None
        if any(r.dtype.byteorder == ">" or not r.flags.c_contiguous or not r.size for r in results):
            return False  # sent as is, each a flat view of its bytes: what codec.to_frame gives for these only
        tensors = []
        for i, r in enumerate(results):
            wire, shape, _ = _to_frame(r)
            tensors.append(b'{"key":%%s,"dtype":%s,"shape":%s,"frame":%d}' % (_encode(wire), _encode(shape), i))
        start = b'{"type":"tensors","re":%%d,"session":%s,"tensors":[' % _encode(session).replace(b"%", b"%%")
        form = cls(start + b",".join(tensors) + b"]}", max(sizes), session)
        try:
            same = form.head % (msg.id, *map(_encode, msg.outputs)) == header
        except (TypeError, ValueError):
            return False
        return form if same else False
