"""Bridge: a Flower node whose training runs on a plan-worker, over planwire's own protocol.

The SuperNode runs this ClientApp; the data and the training run on a ``plan-worker`` (any language,
any device that runs it) at the node config's ``planwire-worker`` URL. The worker holds the node's
examples as private tensors in batches tagged ``<x>.<b>`` and ``<y>.<b>`` (node config
``planwire-x-tag``/``planwire-y-tag``, default ``images``/``labels``, as ``plan-worker --data file.npz``
loads them). The bridge registers the plan (the worker checks it again with its own checker and limits),
stores the round's weights and a fresh optimizer state there, runs the local steps over the worker's
batches in a shuffled order (one message per step, not waited on), and fetches the trained weights. The
examples never leave the worker: runs only reference them, and the worker refuses to hand them out.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from planwire.flower.cache import plan_for
from planwire.flower.client import hyper_overrides, reply, settings
from planwire.flower.ports import PlanPorts
from planwire.flower.records import arrays_to_state, state_to_arrays
from planwire.flower.runner import Outcome
from planwire.transport import PointerTensor, RemoteWorker, connect


def _batches(worker: RemoteWorker, x_tag: str, y_tag: str) -> list[tuple[PointerTensor, PointerTensor]]:
    """The worker's (inputs, targets) batch pointers, by batch number."""
    found: dict[str, dict[int, PointerTensor]] = {x_tag: {}, y_tag: {}}
    pattern = re.compile(rf"({re.escape(x_tag)}|{re.escape(y_tag)})\.(\d+)")
    for pointer in worker.search():
        for tag in pointer.tags:
            match = pattern.fullmatch(tag)
            if match:
                found[match.group(1)][int(match.group(2))] = pointer
    common = sorted(set(found[x_tag]) & set(found[y_tag]))
    if not common:
        raise RuntimeError(f"plan-worker {worker.id!r} holds no batches tagged {x_tag}.<b> and {y_tag}.<b>")
    return [(found[x_tag][b], found[y_tag][b]) for b in common]


class _Remote:
    """A plan's state on one plan-worker for one round: put, stepped in place, fetched, freed."""

    def __init__(self, worker: RemoteWorker, plan: bytes, ports: PlanPorts, weights: dict[str, np.ndarray]) -> None:
        self.worker, self.ports = worker, ports
        self.variant = ports.variant(plan)
        worker.ensure_plan(self.variant, ports.name)
        prefix = worker.new_key()
        state = {**weights, **ports.initial_optimizer_state()}
        self.keys = {name: f"{prefix}:{name}" for name in state}
        worker.put_many({self.keys[n]: v for n, v in state.items()}, tags=(f"plan:{ports.name}",), owned=False)
        self._outputs = [self.keys[ports.bindings[o.name]] if o.name in ports.bindings else None for o in ports.outputs]
        self._reported = [i for i, key in enumerate(self._outputs) if key is None]
        self._names = [ports.outputs[i].name.removeprefix("metric.") for i in self._reported]

    def steps(self, order: list[tuple[PointerTensor, PointerTensor]], hyper: dict[str, np.ndarray]) -> dict[str, float]:
        """Run one step per batch in ``order``; the batch-weighted mean of the loss and metrics."""
        pending = []
        for x, y in order:
            args: list[Any] = []
            batch = iter((x, y))
            for spec in self.ports.inputs:
                if spec.role == "arg":
                    args.append(next(batch))
                elif spec.role == "hyper":
                    args.append(hyper[spec.name])
                else:
                    args.append(PointerTensor(self.worker, self.keys[spec.name], spec.dtype, spec.shape, owned=False))
            results = self.worker.run(
                self.variant, args, outputs=self._outputs, fetch=self._reported, wait=False, name=self.ports.name
            )
            pending.append((x.shape[0], [results[i] for i in self._reported]))
        sums = dict.fromkeys(self._names, 0.0)
        seen = 0
        for n, values in pending:
            for name, pointer in zip(self._names, values, strict=True):
                sums[name] += float(np.asarray(pointer.get())) * n
            seen += n
        if not np.isfinite(sums.get("loss", 0.0)):
            raise FloatingPointError(f"plan {self.ports.name!r}: the loss became {sums['loss']} on the plan-worker")
        return {k: v / max(seen, 1) for k, v in sums.items()}

    def weights(self) -> dict[str, np.ndarray]:
        names = [s.name for s in self.ports.weights.values()]
        arrays = self.worker.fetch_arrays([self.keys[n] for n in names], keep=False)
        return dict(zip(names, arrays, strict=True))

    def free(self) -> None:
        for key in self.keys.values():
            self.worker.release(key)
        self.worker.flush()


def _open(msg: Message, context: Context) -> tuple[RemoteWorker, bytes, PlanPorts, dict, list, dict[str, Any]]:
    plan, ports = plan_for(msg.content, context)
    conf = settings(msg, context)
    weights = arrays_to_state(ports, msg.content["arrays"], what="server arrays")
    node = context.node_config
    worker = connect(str(node["planwire-worker"]), timeout=float(node.get("planwire-timeout", 60.0)))
    try:
        batches = _batches(worker, str(node.get("planwire-x-tag", "images")), str(node.get("planwire-y-tag", "labels")))
    except Exception:
        worker.close()
        raise
    return worker, plan, ports, weights, batches, conf


def bridge_train(msg: Message, context: Context) -> Message:
    """The plan's local training for this round, run on the node's plan-worker."""
    worker, plan, ports, weights, batches, conf = _open(msg, context)
    try:
        if float(conf.get("proximal-mu", 0.0)):
            raise ValueError("the plan-worker bridge cannot add FedProx's proximal term; use FedAvg-style strategies")
        hyper = {
            k: np.asarray(v, dtype=np.float64)
            for k, v in {
                **ports.hyper_defaults,
                **{f"hyper.{k}": v for k, v in hyper_overrides(conf, ports.hyper_defaults).items()},
            }.items()
        }
        rng = np.random.default_rng(
            [int(conf.get("seed", 0)), int(context.node_id) & 0xFFFFFFFF, int(conf.get("server-round", 0))]
        )
        steps = int(conf.get("local-steps", 0)) or int(conf.get("local-epochs", 1)) * len(batches)
        order = [batches[i] for _ in range(-(-steps // len(batches))) for i in rng.permutation(len(batches))][:steps]
        remote = _Remote(worker, plan, ports, weights)
        try:
            metrics = remote.steps(order, hyper)
            new = remote.weights()
        finally:
            remote.free()
        n = sum(int(x.shape[0]) for x, _ in batches)
        return reply(msg, Outcome(new, n, metrics), state_to_arrays(ports, new))
    finally:
        worker.close()


def bridge_evaluate(msg: Message, context: Context) -> Message:
    """Loss and metrics of the server's weights on the plan-worker's batches (a zero learning rate step)."""
    worker, plan, ports, weights, batches, _ = _open(msg, context)
    try:
        if "hyper.lr" not in ports.hyper_defaults:
            raise ValueError(f"plan {ports.name!r} has no hyper.lr input: it cannot be run without updating")
        hyper = {
            k: np.asarray(0.0 if k == "hyper.lr" else v, dtype=np.float64) for k, v in ports.hyper_defaults.items()
        }
        remote = _Remote(worker, plan, ports, weights)
        try:
            metrics = remote.steps(batches, hyper)  # lr 0: the weights stay; momentum state is never used
        finally:
            remote.free()
        n = sum(int(x.shape[0]) for x, _ in batches)
        return reply(msg, Outcome(weights, n, metrics))
    finally:
        worker.close()


def bridge_client_app() -> ClientApp:
    """A ClientApp for SuperNodes that only forward to a plan-worker (node config ``planwire-worker``).
    ``plan_client_app`` does the same for such nodes, so one app can serve both kinds of node."""
    app = ClientApp()
    app.train()(bridge_train)
    app.evaluate()(bridge_evaluate)
    return app


__all__ = ["bridge_client_app", "bridge_evaluate", "bridge_train"]
