"""The plan half of a Service (worker/service.py): registering a plan (checked, then its session created
here or by the sandboxed runner), who holds it, forgetting it when nobody does, its ``plan_info``, and
keeping a copy where the operator reviews it (plan-worker review) when the worker has private data.

A mixin of :class:`~planwire.worker.service.Service`: it works on the service's plans, holders, flows,
store and releaser, for the client the request counts against (``self._client``).
"""

from __future__ import annotations

import logging

from planwire.transport import framing
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.transport.framing import Frame
from planwire.transport.plancheck import PlanRejected, check_model
from planwire.transport.spec import plan_id
from planwire.worker import flow
from planwire.worker.jobs import Plan, RegisterJob
from planwire.worker.runtime import OrtPlan, Signature

log = logging.getLogger("planwire.worker")


class PlanRegistry:
    """register_plan, has_plan and delete_plan, and the plan bookkeeping they share with runs."""

    def _register(self, msg: m.RegisterPlan, buffers: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        job = self._begin_register(msg, buffers)
        if isinstance(job, m.PlanInfo):
            return job, []
        ort_plan = OrtPlan(job.data, name=job.name, device=self.device, threads=self.threads, nchwc=self.nchwc)
        plan = self._add_plan(job, ort_plan)
        self._ort_plans[job.pid] = ort_plan
        return self._plan_info(msg.id, job.pid, plan), []

    def _add_plan(self, job: RegisterJob, ports: Signature) -> Plan:
        """Record a plan whose session was created (here or by the runner)."""
        plan = self.plans[job.pid] = Plan(job.name, job.data, ports)
        if job.any_rank:
            self._any_rank[job.pid] = job.any_rank
        self.flows[job.pid] = flow.analyze(job.data, [n for n, _, _ in ports.inputs], [n for n, _, _ in ports.outputs])
        self.holders.add(job.pid, self._client)
        log.info("registered plan %r (%s, %d bytes)", job.name, job.pid[:12], len(job.data))
        if ports.nchwc[0]:
            log.info("plan %r runs %d Convs as NCHWc kernels (block %d)", job.name, *ports.nchwc)
        if ports.placement:
            log.warning(
                "plan %r (%s) runs on %s: the CPU nodes cost host-device copies",
                job.name,
                job.pid[:12],
                ports.placement,
            )
        if self.plans_dir is not None and any(e.private for _, e in self.store.own()):
            self._keep(job.pid, job.name, job.data)
        return plan

    def _begin_register(self, msg: m.RegisterPlan, buffers: list[memoryview]) -> RegisterJob | m.PlanInfo:
        frame = framing.frame_at(buffers, msg.frame, "register_plan.frame")
        data = bytes(frame)
        pid = plan_id(data)
        plan = self.plans.get(pid)
        if plan is not None:
            self.holders.add(pid, self._client)
            return self._plan_info(msg.id, pid, plan)
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
        return RegisterJob(msg, pid, name, data, summary.unknown_rank)

    def _delete_plan(self, msg: m.DeletePlan, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        # The plan's bytes stay while another client holds it; when nobody does, ``_unload`` tells the
        # runner and the direct lane to drop their sessions (Service.unloaded).
        if self.holders.remove(msg.plan, self._client):
            self._unload(msg.plan)
        return m.Ok(re=msg.id, session=self.session), []

    def _unload(self, pid: str) -> None:
        """Forget a plan nobody holds any more."""
        self._any_rank.pop(pid, None)
        self.flows.pop(pid, None)
        self._ort_plans.pop(pid, None)
        if self.plans.pop(pid, None) is not None:
            log.info("unregistered plan %r", pid[:12])
            for hook in self.unloaded:  # the runner's and the direct lane's sessions of it go too
                hook(pid)

    def _has_plan(self, msg: m.HasPlan, _: list[memoryview]) -> tuple[m._Message, list[Frame]]:
        plan = self.plans.get(msg.plan)
        if plan is None or not self.holders.holds(msg.plan, self._client):
            return m.Missing(re=msg.id, session=self.session, plan=msg.plan), []
        return self._plan_info(msg.id, msg.plan, plan), []

    def _keep(self, pid: str, name: str, data: bytes) -> None:
        """Keep a plan a worker with private data received where its operator reviews it (plan-worker review)."""
        from planwire.worker.review import keep, prune

        try:
            keep(self.plans_dir, pid, data)  # type: ignore[arg-type]
        except OSError as e:
            log.warning("plan %r (%s) not kept in %s: %s", name, pid[:12], self.plans_dir, e)
            return
        if self.max_plans_dir_bytes is None:
            return
        policy = self.releaser.policy
        referenced = self.plans.keys() | (policy.rules.keys() if policy is not None else set())
        removed, total = prune(self.plans_dir, self.max_plans_dir_bytes, referenced)  # type: ignore[arg-type]
        for gone, size in removed:
            log.info(
                "removed kept plan %s (%d bytes) from %s: over --max-plans-dir-mb, least recently received and "
                "neither registered nor approved",
                gone[:12],
                size,
                self.plans_dir,
            )
        if total > self.max_plans_dir_bytes:
            log.warning(
                "kept plans in %s take %d bytes, over --max-plans-dir-mb (%d bytes): the rest are registered now or "
                "approved by the policy, and are kept",
                self.plans_dir,
                total,
                self.max_plans_dir_bytes,
            )

    def _plan_info(self, rid: int, pid: str, plan: Plan) -> m.PlanInfo:
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
            re=rid,
            session=self.session,
            plan=pid,
            inputs=ports(plan.ports.inputs),
            outputs=ports(plan.ports.outputs),
            placement=plan.ports.placement,
        )
