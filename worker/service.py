"""Service: what a worker does with each request. The same object serves in-process and over ZeroMQ.

``handle(frames) -> frames`` is the whole contract: bytes in, bytes out, through the protocol's Session
codec either way, so every in-process (VirtualWorker) test also exercises the wire format.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from msgspec import UNSET

from planwire.transport import codec, dtypes, session
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.session import Frame, Limits
from planwire.transport.spec import plan_id
from planwire.worker.modelcheck import PlanRejected, check_model
from planwire.worker.runtime import PlanSession, providers_for
from planwire.worker.stats import clean, peer_of
from planwire.worker.store import ClientId, Store

if TYPE_CHECKING:
    from planwire.worker.stats import Stats

log = logging.getLogger("planwire.worker")


# Opsets of the ONNX default domain this worker's onnxruntime accepts (reported in welcome).
ONNX_OPSET = 23


class Service:
    """One worker: a Store of tensors, registered plans, and the request handlers."""

    def __init__(
        self,
        worker_id: str,
        *,
        data: Iterable[tuple[str, np.ndarray, Sequence[str]]] = (),
        public: bool = False,
        device: str = "cpu",
        threads: int = 1,
        limits: Limits | None = None,
        max_plans: int | None = None,
        max_store_bytes: int | None = None,
        max_client_store_bytes: int | None = None,
    ) -> None:
        self.id = worker_id
        self.session = uuid.uuid4().hex
        self.providers = providers_for(device)
        self.threads = threads
        self.limits = limits or Limits()
        self.store = Store(public=public, max_bytes=max_store_bytes, max_client_bytes=max_client_store_bytes)
        self.max_plans = max_plans
        self.plans: dict[str, PlanSession] = {}
        self.stats: Stats | None = None  # set by plan-worker: observes every answered request
        self._client: ClientId = b""  # who sent the request being handled (quotas, ownership)
        self._any_rank: dict[str, frozenset[str]] = {}  # plan id -> its ports of unknown rank
        for key, array, tags in data:
            try:  # only wire dtypes, stored little-endian and C-contiguous like everything received
                wire = dtypes.to_wire(array.dtype)
            except ValueError as e:
                raise ValueError(f"own tensor {key!r}: {e}") from None
            array = np.ascontiguousarray(array, dtype=dtypes.to_numpy(wire))
            self.store.put(key, array, tags, private=True)
        self._handlers: dict[type, Callable[[m._Message, list[memoryview]], tuple[m._Message, list[Frame]]]] = {
            m.Hello: self._hello,
            m.Ping: lambda msg, _: (m.Ok(re=msg.id, session=self.session), []),
            m.Put: self._put,
            m.Get: self._get,
            m.Delete: self._delete,
            m.Search: self._search,
            m.Describe: self._describe,
            m.RegisterPlan: self._register,
            m.HasPlan: self._has_plan,
            m.Run: self._run,
            m.DeletePlan: self._delete_plan,
        }

    # -- entry point ------------------------------------------------------------------------------

    def handle(self, frames: Sequence[Frame], client: ClientId = b"") -> list[Frame]:
        """Answer one request message from ``client`` (its id for quotas; in process: b"");
        never raises: every failure becomes an error reply."""
        rid = -1
        msg: m._Message | None = None
        out: list[Frame] = []
        t0 = time.perf_counter()
        self._client = client
        try:
            total = sum(map(len, frames))
            if total > self.limits.max_message_bytes:
                rid = session.request_id(frames)
                raise ProtocolError(
                    "too_large",
                    f"message of {total} bytes, over the limit of {self.limits.max_message_bytes}",
                )
            msg, buffers = session.unpack_request(frames, self.limits)
            rid = msg.id  # type: ignore[attr-defined]
            reply, out = self._handlers[type(msg)](msg, buffers)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s #%d -> %s (%.2f ms)",
                    m.type_name(type(msg)),
                    rid,
                    m.type_name(type(reply)),
                    (time.perf_counter() - t0) * 1e3,
                )
        except ProtocolError as e:
            rid = getattr(e, "re", rid)
            log.info("request #%d%s refused: %s [%s]", rid, self._about(frames, msg), clean(e.message), e.code)
            reply = m.Error(re=rid, session=self.session, code=e.code, message=e.message)  # type: ignore[arg-type]
        except Exception as e:  # a bug here must not take the worker down
            log.exception("request #%d%s failed", rid, self._about(frames, msg))
            reply = m.Error(re=rid, session=self.session, code="internal", message=f"{type(e).__name__}: {e}")
        if self.stats is not None:  # the operator's view (plan-worker status, --metrics)
            try:
                self.stats.observe(frames, msg, reply, time.perf_counter() - t0)
            except Exception:
                log.exception("stats of request #%d not recorded", rid)
        return session.pack(reply, out)

    def _about(self, frames: Sequence[Frame], msg: m._Message | None) -> str:
        """' type from CLIENT plan NAME (ID)' for a log line about a refused or failed request."""
        kind = f" {m.type_name(type(msg))}" if msg is not None else ""
        text = f"{kind} from {peer_of(frames, getattr(self.stats, 'curve', False))}"
        pid = getattr(msg, "plan", None)
        if pid is not None:
            plan = self.plans.get(pid)
            text += f" plan {plan.name!r} ({pid[:12]})" if plan is not None else f" plan {clean(pid[:64])!r}"
        elif isinstance(msg, m.RegisterPlan):
            text += f" plan {msg.name!r}"
        return text

    # -- handlers ---------------------------------------------------------------------------------

    def _hello(self, msg: m.Hello, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        if msg.version != m.PROTOCOL_VERSION:
            raise ProtocolError(
                "bad_version", f"client speaks protocol {msg.version}, this worker {m.PROTOCOL_VERSION}"
            )
        lim = m.Limits(
            max_message_bytes=self.limits.max_message_bytes,
            max_plan_bytes=self.limits.max_plan_bytes,
            max_frames=self.limits.max_frames,
        )
        return m.Welcome(
            re=msg.id,
            session=self.session,
            worker=self.id,
            version=m.PROTOCOL_VERSION,
            providers=self.providers,
            opsets={"ai.onnx": ONNX_OPSET},
            limits=lim,
        ), []

    def _put(self, msg: m.Put, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        arrays = [self._tensor(t.dtype, t.shape, t.frame, buffers, f"put tensor {t.key!r}") for t in msg.tensors]
        self.store.check_writable(t.key for t in msg.tensors)
        self.store.check_quota(
            self._client, ((t.key, a.nbytes) for t, a in zip(msg.tensors, arrays, strict=True)), f"put #{msg.id}"
        )
        for t, arr in zip(msg.tensors, arrays, strict=True):
            self.store.put(t.key, arr, t.tags, owner=self._client)
        return m.Ok(re=msg.id, session=self.session), []

    def _get(self, msg: m.Get, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        arrays = self.store.take(msg.keys, msg.keep)
        return self._tensors_reply(msg.id, msg.keys, arrays)

    def _delete(self, msg: m.Delete, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        self.store.delete(msg.keys)
        return m.Ok(re=msg.id, session=self.session), []

    def _search(self, msg: m.Search, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, e) for k, e in self.store.search(msg.tags)]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _describe(self, msg: m.Describe, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        found = [self._info(k, self.store.entry(k)) for k in msg.keys]
        return m.Found(re=msg.id, session=self.session, tensors=found), []

    def _register(self, msg: m.RegisterPlan, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        frame = session.frame_at(buffers, msg.frame, "register_plan.frame")
        data = bytes(frame)
        pid = plan_id(data)
        plan = self.plans.get(pid)
        if plan is None:
            if self.max_plans is not None and len(self.plans) >= self.max_plans:
                raise ProtocolError(
                    "quota_exceeded",
                    f"plan {msg.name or pid[:12]!r} not registered: the worker already holds {len(self.plans)} plans "
                    "(its limit): unregister plans with delete_plan, or start plan-worker with a larger --max-plans",
                )
            try:
                summary = check_model(data, max_bytes=self.limits.max_plan_bytes)
            except PlanRejected as e:
                code = "too_large" if len(data) > self.limits.max_plan_bytes else e.code
                raise ProtocolError(code, f"plan {msg.name or pid[:12]!r} rejected: {e}") from None
            name = msg.name or summary.metadata_props.get("planwire.name", "") or pid[:12]
            plan = PlanSession(data, name=name, providers=self.providers, threads=self.threads)
            for port, wire, _ in plan.outputs:  # inputs are checked by PlanSession
                if wire not in dtypes.WIRE_TO_NUMPY:
                    raise ProtocolError(
                        "bad_plan",
                        f"plan {name!r} output {port!r} has type {wire!r}; supported: {dtypes.human_list()}",
                    )
            self.plans[pid] = plan
            if summary.unknown_rank:
                self._any_rank[pid] = summary.unknown_rank
            log.info("registered plan %r (%s, %d bytes)", name, pid[:12], len(data))
        return self._plan_info(msg.id, pid, plan), []

    def _delete_plan(self, msg: m.DeletePlan, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        self._any_rank.pop(msg.plan, None)
        if self.plans.pop(msg.plan, None) is not None:
            log.info("unregistered plan %r", msg.plan[:12])
        return m.Ok(re=msg.id, session=self.session), []

    def _has_plan(self, msg: m.HasPlan, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        plan = self.plans.get(msg.plan)
        if plan is None:
            return m.Missing(re=msg.id, session=self.session, plan=msg.plan), []
        return self._plan_info(msg.id, msg.plan, plan), []

    def _run(self, msg: m.Run, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        # What the schema forbids is refused before anything changes (as any invalid header).
        if len(set(msg.outputs)) != len(msg.outputs):
            raise ProtocolError("invalid_message", f"run.outputs must be distinct keys, got {msg.outputs}")
        for i, arg in enumerate(msg.args):
            if (arg.ref is UNSET) == (arg.tensor is UNSET):
                raise ProtocolError("invalid_message", f"run.args[{i}] needs exactly one of 'ref', 'tensor'")
        self.store.check_writable(msg.outputs)  # forbidden: nothing recorded, the worker's data untouched
        try:
            return self._execute(msg, buffers)
        except ProtocolError as e:
            # Clients do not wait for runs: record why the outputs will not come, so that a later get,
            # describe or run that uses them fails with run_failed and this reason.
            why = e.message if e.code == "run_failed" else f"run #{msg.id} refused: {e.message} [{e.code}]"
            for key in msg.outputs:
                self.store.fail(key, why)
            raise

    def _execute(self, msg: m.Run, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        plan = self.plans.get(msg.plan)
        if plan is None:
            raise ProtocolError("unknown_plan", f"no plan {msg.plan[:12]!r} on worker {self.id!r}: register it first")
        n_out = len(plan.outputs)
        if len(msg.outputs) != n_out:
            raise ProtocolError(
                "bad_argument",
                f"plan {plan.name!r} has {n_out} outputs: run.outputs needs {n_out} keys, got {msg.outputs}",
            )
        if msg.fetch and max(msg.fetch) >= n_out:
            raise ProtocolError("bad_argument", f"run.fetch {msg.fetch} out of range for {n_out} outputs")
        args = [self._arg(i, a, buffers) for i, a in enumerate(msg.args)]
        any_rank = self._any_rank.get(msg.plan) if self._any_rank else None
        if any_rank is None:
            plan.check(args)
        else:
            self._check_any_rank(plan, args, any_rank)
        try:
            results = plan.run(args, check=False)
        except Exception as e:  # onnxruntime's own errors already say what they are
            detail = e if isinstance(e, ort.capi.onnxruntime_pybind11_state.Fail) else f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
            raise ProtocolError("run_failed", f"plan {plan.name!r} failed on worker {self.id!r}: {detail}") from None
        sizes = ((k, r.nbytes) for k, r in zip(msg.outputs, results, strict=True))
        self.store.check_quota(self._client, sizes, f"outputs of run #{msg.id}")
        for key, arr in zip(msg.outputs, results, strict=True):
            self.store.put(key, arr, owner=self._client)
        fetch = msg.fetch
        if msg.inline_max:
            fetch = [*fetch, *(i for i, r in enumerate(results) if r.nbytes <= msg.inline_max and i not in fetch)]
        if not fetch:
            return m.Ok(re=msg.id, session=self.session), []
        return self._tensors_reply(msg.id, [msg.outputs[i] for i in fetch], [results[i] for i in fetch])

    # -- helpers ----------------------------------------------------------------------------------

    def _tensor(self, dtype: str, shape: list[int], index: int, buffers: list[memoryview], what: str) -> np.ndarray:
        return codec.from_frame(dtype, shape, session.frame_at(buffers, index, what), what=what)

    def _arg(self, i: int, arg: m.Arg, buffers: list[memoryview]) -> np.ndarray:
        if arg.ref is not UNSET:
            return self.store.entry(arg.ref).array
        t = arg.tensor
        return self._tensor(t.dtype, t.shape, t.frame, buffers, f"run argument {i}")  # type: ignore[union-attr]

    def _tensors_reply(self, rid: int, keys: list[str], arrays: list[np.ndarray]) -> tuple[m._Message, list[Frame]]:
        out, frames = [], []
        for key, arr in zip(keys, arrays, strict=True):
            wire, shape, buf = codec.to_frame(arr)
            out.append(m.KeyedTensor(key=key, dtype=wire, shape=shape, frame=len(frames)))
            frames.append(buf)
        return m.Tensors(re=rid, session=self.session, tensors=out), frames

    @staticmethod
    def _check_any_rank(plan: PlanSession, args: Sequence[np.ndarray], any_rank: frozenset[str]) -> None:
        """PlanSession.check for a plan with inputs of unknown rank (which onnxruntime reports as shape
        ``[]``): those take any shape, and only their dtype is checked."""
        if len(args) != len(plan.inputs):
            plan.check(args)  # names the count
        for i, (arr, (name, wire, shape)) in enumerate(zip(args, plan.inputs, strict=True)):
            what = f"plan {plan.name!r} argument {i} ({name!r})"
            if arr.dtype != dtypes.to_numpy(wire):
                raise ProtocolError("bad_argument", f"{what}: expected dtype {dtypes.human(wire)}, got {arr.dtype}")
            if name not in any_rank and (
                len(shape) != arr.ndim
                or any(isinstance(w, int) and w != g for w, g in zip(shape, arr.shape, strict=True))
            ):
                want = "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"
                raise ProtocolError("bad_argument", f"{what}: expected shape {want}, got {list(arr.shape)}")

    def _plan_info(self, rid: int, pid: str, plan: PlanSession) -> m.PlanInfo:
        any_rank = self._any_rank.get(pid, frozenset())

        def ports(items: list) -> list[m.Port]:
            return [
                m.Port(
                    name=n,
                    dtype=t,
                    shape=None if n in any_rank else [d if isinstance(d, int) else (d or None) for d in s],
                )
                for n, t, s in items
            ]

        return m.PlanInfo(
            re=rid, session=self.session, plan=pid, inputs=ports(plan.inputs), outputs=ports(plan.outputs)
        )

    @staticmethod
    def _info(key: str, entry) -> m.TensorInfo:
        return m.TensorInfo(
            key=key,
            dtype=codec.dtypes.to_wire(entry.array.dtype),
            shape=list(entry.array.shape),
            tags=list(entry.tags),
            private=entry.private,
        )
