"""The run half of a Service (worker/service.py): a run validated (its arguments against the plan's
signature, the private data it reads and what the owner's policy releases of its outputs), executed in
process (or by the sandboxed runner, from the RunJob), and its results stored, fetched or inlined. A run
that fails or is refused records why on its outputs, so later uses of them say so.

A mixin of :class:`~planwire.worker.service.Service`: it works on the service's plans, flows, store and
releaser, for the client the request counts against (``self._client``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from msgspec import UNSET

from planwire.transport import dtypes
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.framing import Frame
from planwire.worker import flow
from planwire.worker.jobs import Plan, RunJob
from planwire.worker.peers import clean
from planwire.worker.resident import Resident, hosts
from planwire.worker.runtime import OrtPlan, Signature
from planwire.worker.store import ClientId, Entry

log = logging.getLogger("planwire.worker")

_STOPPED = frozenset({"plan_crashed", "plan_timeout", "out_of_memory", "cancelled"})  # a run that started, or was due


class RunPath:
    """run, from its validation to its reply."""

    def _run(self, msg: m.Run, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        job = self._begin_run(msg, buffers)
        pid = job.msg.plan
        try:
            plan = self._ort_plans.get(pid)
            if plan is None:
                plan = self._ort_plans[pid] = OrtPlan(
                    job.plan.data, name=job.plan.name, device=self.device, threads=self.threads, nchwc=self.nchwc
                )
            results = plan.run(job.args, check=False)
        except ProtocolError as e:
            self._fail_outputs(msg, e)
            raise
        except Exception as e:  # onnxruntime's own errors already say what they are
            detail = e if isinstance(e, ort.capi.onnxruntime_pybind11_state.Fail) else f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
            error = ProtocolError("run_failed", f"plan {job.plan.name!r} failed on worker {self.id!r}: {detail}")
            if job.reads_private:  # its text may quote tensor values: keep the op, the node and the shapes
                log.info("plan %r failed on private data: %s", job.plan.name, clean(str(e)))
                error = ProtocolError("run_failed", flow.redacted(job.plan.name, self.id, e, job.args))
            self._fail_outputs(msg, error)
            raise error from None
        try:
            return self._end_run(job, results)
        except ProtocolError as e:  # e.g. quota_exceeded: the outputs were not stored
            self._fail_outputs(msg, e)
            raise

    def _begin_run(self, msg: m.Run, buffers: list[memoryview], ahead: Mapping[str, Entry] | None = None) -> RunJob:
        self.check_form(msg, self._client)
        try:
            return self._prepare(msg, buffers, ahead)
        except ProtocolError as e:
            self._fail_outputs(msg, e)
            raise

    def check_form(self, msg: m.Run, client: ClientId) -> None:
        """What the schema forbids, and outputs ``client`` may not write: refused before anything changes (as
        any invalid header). Any later refusal of the run marks its outputs failed."""
        if len(set(msg.outputs)) != len(msg.outputs):
            raise ProtocolError("invalid_message", f"run.outputs must be distinct keys, got {msg.outputs}")
        for i, arg in enumerate(msg.args):
            if (arg.ref is UNSET) == (arg.tensor is UNSET):
                raise ProtocolError("invalid_message", f"run.args[{i}] needs exactly one of 'ref', 'tensor'")
        self.store.check_writable(client, msg.outputs)  # forbidden: nothing recorded, the worker's data untouched

    def _fail_outputs(self, msg: m.Run, e: ProtocolError) -> None:
        # Clients do not wait for runs: record why the outputs will not come, so that a later get,
        # describe or run that uses them fails with run_failed and this reason.
        if e.code == "run_failed":
            why = e.message
        elif e.code in _STOPPED:
            why = f"run #{msg.id} failed: {e.message} [{e.code}]"
        else:
            why = f"run #{msg.id} refused: {e.message} [{e.code}]"
        for key in msg.outputs:
            self.store.fail(self._client, key, why)

    def _prepare(self, msg: m.Run, buffers: list[memoryview], ahead: Mapping[str, Entry] | None = None) -> RunJob:
        """The RunJob of ``msg``; ``ahead``: entries read in place of the stored ones (outputs of the run the
        runner executes, for a run chained behind it: worker/chain.py)."""
        plan = self.plans.get(msg.plan)
        if plan is None or not self.holders.holds(msg.plan, self._client):
            raise ProtocolError("unknown_plan", f"no plan {msg.plan[:12]!r} on worker {self.id!r}: register it first")
        n_out = len(plan.ports.outputs)
        if len(msg.outputs) != n_out:
            raise ProtocolError(
                "bad_argument",
                f"plan {plan.name!r} has {n_out} outputs: run.outputs needs {n_out} keys, got {msg.outputs}",
            )
        if msg.fetch and max(msg.fetch) >= n_out:
            raise ProtocolError("bad_argument", f"run.fetch {msg.fetch} out of range for {n_out} outputs")
        private_args: dict[int, Entry] = {}
        entries: list[Entry | None] = []
        args = []
        refs = [a.ref for a in msg.args]
        if UNSET not in refs:  # stored tensors only (a training step): looked up in one call
            entries = self.store.entries(self._client, refs, ahead)  # type: ignore[arg-type,assignment]
            args = [e.array for e in entries]  # type: ignore[union-attr]
            private_args = {i: e for i, e in enumerate(entries) if e.private}  # type: ignore[union-attr,misc]
        else:
            for i, a in enumerate(msg.args):
                if a.ref is not UNSET:
                    entry = ahead[a.ref] if ahead and a.ref in ahead else self.store.entry(self._client, a.ref)
                    entries.append(entry)
                    args.append(entry.array)
                    if entry.private:
                        private_args[i] = entry
                else:
                    t = a.tensor
                    entries.append(None)
                    args.append(self._tensor(t.dtype, t.shape, t.frame, buffers, f"run argument {i}"))  # type: ignore[union-attr]
        private = self.flows[msg.plan].private_outputs(list(private_args)) if private_args else frozenset()
        pending: dict = {}
        rows = 0
        if private:
            values = hosts(args) if self.releaser.policy is not None else args  # rules read argument values
            pending = self._pending(msg, plan, values, private_args, private)
            rows = min(e.rows for e in private_args.values())
        any_rank = self._any_rank.get(msg.plan) if self._any_rank else None
        if any_rank is None:
            plan.ports.check(args)
        else:
            self._check_any_rank(plan.ports, args, any_rank)
        return RunJob(
            msg, plan, args, entries, reads_private=bool(private_args), private=private, pending=pending, rows=rows
        )

    def _end_run(self, job: RunJob, results: list[np.ndarray]) -> tuple[m._Message, list[Frame]]:
        msg, private, pending, rows = job.msg, job.private, job.pending, job.rows
        sizes = [r.nbytes for r in results]
        self.store.check_quota(self._client, zip(msg.outputs, sizes, strict=True), f"outputs of run #{msg.id}")
        self.store.put_outputs(self._client, msg.outputs, results, private, pending, rows)
        fetch, inline_max = msg.fetch, msg.inline_max
        if inline_max:
            fetch = [
                *fetch,
                *(
                    i
                    for i, n in enumerate(sizes)
                    if n <= inline_max and i not in fetch and (i not in private or i in pending and pending[i].ready)
                ),
            ]
        if not fetch:
            return m.Ok(re=msg.id, session=self.session), []
        keys = [msg.outputs[i] for i in fetch]
        if private:  # a private output leaves only as its release (the owner's policy): read through it
            values = self.store.readable(self._client, keys, self._release)[1]
        else:
            values = hosts([results[i] for i in fetch])
        return self._tensors_reply(msg.id, keys, values)

    def _pending(
        self, msg: m.Run, plan: Plan, args: list[np.ndarray], private_args: dict[int, Entry], private: frozenset
    ) -> dict:
        """The releases the owner's policy allows for a run on private data; refuses a fetch of any other
        private output before anything runs."""
        names_in, names_out = [n for n, _, _ in plan.ports.inputs], [n for n, _, _ in plan.ports.outputs]
        pending = self.releaser.prepare(
            msg.plan, plan.name, names_in, names_out, args, private_args, private, self._client
        )
        held = [i for i in msg.fetch if i in private and (i not in pending or not pending[i].ready)]
        if held:
            keys = [msg.outputs[i] for i in held]
            message = (
                f"run.fetch asks for {keys}, computed by plan {plan.name!r} from this worker's private data: such "
                "results are stored and may be used by later runs, but never leave the worker unless the data "
                "owner approves the plan (plan-worker --policy)"
            )
            rule = self.releaser.policy.rules.get(msg.plan) if self.releaser.policy is not None else None
            self.releaser.audit(
                "refused", self._client, rule, plan.name, [names_out[i] for i in held], [], reason=message
            )
            raise ProtocolError("private_data", message)
        return pending

    def _release(self, key: str, entry: Entry) -> np.ndarray:
        if isinstance(entry.array, Resident):  # the release reads the value: its host copy
            entry = dataclasses.replace(entry, array=entry.array.materialize())
        return self.releaser.release(self._client, key, entry)

    @staticmethod
    def _check_any_rank(plan: Signature, args: Sequence[np.ndarray], any_rank: frozenset[str]) -> None:
        """Signature.check for a plan with inputs of unknown rank (which onnxruntime reports as shape
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
