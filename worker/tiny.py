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
import time
from collections.abc import Sequence

import numpy as np
from msgspec import UNSET

from planwire.transport import codec, framing
from planwire.transport import messages as m
from planwire.transport.framing import Frame
from planwire.worker.direct import DirectLane
from planwire.worker.jobs import Origin, RunJob
from planwire.worker.service import Service

log = logging.getLogger("planwire.worker")

_SIGNATURE, _MAX_HEADER = framing.SIGNATURE, framing.MAX_HEADER_BYTES
_decode = m.request_decoder.decode
_encode = m.encoder.encode
_ndarray = np.ndarray


class TinyPath:
    """``path(frames, client)``: the reply frames of a tiny direct-lane run, or None (the general path's)."""

    def __init__(self, service: Service, lane: DirectLane) -> None:
        self.service = service
        self.lane = lane

    def __call__(self, frames: Sequence[Frame], client: bytes) -> list[Frame] | None:
        t0 = time.perf_counter()
        service = self.service
        if len(frames) != 2 or len(frames[1]) > _MAX_HEADER or frames[0] != _SIGNATURE:
            return None
        header = frames[1]
        if len(frames[0]) + len(header) > service.limits.max_message_bytes:
            return None
        try:
            msg = _decode(header)
        except Exception:  # the general path says what is wrong
            return None
        if type(msg) is not m.Run:
            return None
        outputs = msg.outputs
        pid = msg.plan
        plan = service.plans.get(pid)
        if plan is None or len(outputs) != len(plan.ports.outputs) or service._any_rank.get(pid) is not None:
            return None
        if msg.fetch and max(msg.fetch) >= len(outputs):
            return None
        owners = service.owners
        owner = owners.owner(client)
        if not service.holders.holds(pid, owner):
            return None
        store = service.store
        if store.observer is not None:  # --state-dir: the general path (and the group commit of its replies)
            return None
        if len(outputs) > 1 and len(set(outputs)) != len(outputs):
            return None
        try:
            store.check_writable(owner, outputs)
        except Exception:
            return None
        args = []
        for a in msg.args:
            if a.tensor is not UNSET or a.ref is UNSET:
                return None
            entry = store.find(owner, a.ref)
            if entry is None or entry.private or type(entry.array) is not _ndarray:
                return None
            args.append(entry.array)
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
        try:
            sizes = [r.nbytes for r in results]
            store.check_quota(owner, zip(outputs, sizes, strict=True), f"outputs of run #{msg.id}")
            for key, arr in zip(outputs, results, strict=True):
                store.put(owner, key, arr)
            fetch, inline_max = msg.fetch, msg.inline_max
            if inline_max:
                fetch = [*fetch, *(i for i, n in enumerate(sizes) if n <= inline_max and i not in fetch)]
            if fetch:
                out, bufs = [], []
                for i in fetch:
                    wire, shape, buf = codec.to_frame(results[i])
                    out.append(m.KeyedTensor(key=outputs[i], dtype=wire, shape=shape, frame=len(bufs)))
                    bufs.append(buf)
                reply: m._Message = m.Tensors(re=msg.id, session=service.session, tensors=out)
            else:
                reply, bufs = m.Ok(re=msg.id, session=service.session), []
            frames_out = [_SIGNATURE, _encode(reply), *bufs]
        except Exception:  # e.g. quota_exceeded: completed (refused, outputs marked failed) as the general path does
            job = RunJob(msg, plan, args, [None] * len(args), origin=Origin(frames, client, t0))
            return service.complete(job, results)
        stats = service.stats
        if stats is not None:  # the operator's view, as Service.reply observes a reply
            try:
                stats.ran(frames, client, owner, msg, time.perf_counter() - t0, sizes)
            except Exception:
                log.exception("stats of request #%d not recorded", msg.id)
        return frames_out
