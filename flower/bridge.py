"""Bridge: a Flower node whose training runs on a plan-worker, over planwire's own protocol.

The SuperNode runs this ClientApp; the data and the training run on a ``plan-worker`` (any language,
any device that runs it) at the node config's ``planwire-worker`` URL. The worker holds the node's
examples as private tensors in batches tagged ``<x>.<b>`` and ``<y>.<b>`` (node config
``planwire-x-tag``/``planwire-y-tag``, default ``images``/``labels``, as ``plan-worker --data file.npz``
loads them). The bridge registers the plan (the worker checks it again with its own checker and limits),
stores the round's weights and a fresh optimizer state there, runs the local steps over the worker's
batches in a shuffled order (one message per step, not waited on), and reads back what the worker lets go.

Under the worker's trust model: what a step computes from private data leaves only as the data owner's
policy (``plan-worker --policy``) releases it. The bridge asks the worker (``describe``'s ``release``)
after the first step how each trained weight may leave: as an ``update`` (new minus pushed, clipped and
noised by the worker if the policy says so), which the bridge adds to the weights it pushed, or as it is.
A trained weight, loss or metric the policy does not release stops the round for this node with an error
naming the missing rule, before the other steps run and with nothing read (every node reports the same
metrics: Flower skips a round's aggregation when their keys differ). A worker started with ``--public`` keeps nothing
private: the weights come back as they are.

CURVE: node config ``planwire-curve-secret`` (this node's ``.key_secret``, from ``plan-worker keys``) and
``planwire-curve-server`` (the worker's public ``.key``), both files on the node. They are read from the
node config only, never the run config: a node's secret key and whom it trusts are its own business, not
the server's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from planwire.flower.cache import PlanRefused
from planwire.flower.client import config_int, hyper_overrides, opened, reply, round_rng
from planwire.flower.ports import WEIGHT_ROLES, PlanPorts, fingerprint
from planwire.flower.records import state_to_arrays
from planwire.flower.runner import Outcome
from planwire.transport import PointerTensor, RemoteWorker, connect
from planwire.transport import messages as m

Batch = tuple[PointerTensor, PointerTensor]


def _batches(worker: RemoteWorker, x_tag: str, y_tag: str) -> list[Batch]:
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


def _readable(info: m.TensorInfo) -> bool:
    return not info.private or isinstance(info.release, str)


class _Remote:
    """A plan's state on one plan-worker for one round: put, stepped in place, read as released, freed."""

    def __init__(self, worker: RemoteWorker, plan: bytes, ports: PlanPorts, weights: dict[str, np.ndarray]) -> None:
        self.worker, self.ports, self.pushed = worker, ports, weights
        self.fingerprint = fingerprint(plan)
        self.variant = ports.variant(plan)
        worker.ensure_plan(self.variant, ports.name)
        prefix = worker.new_key()
        state = {**weights, **ports.initial_optimizer_state()}
        self.keys = {name: f"{prefix}:{name}" for name in state}
        worker.put_many({self.keys[n]: v for n, v in state.items()}, tags=(f"plan:{ports.name}",), owned=False)
        self._outputs = [self.keys[ports.bindings[o.name]] if o.name in ports.bindings else None for o in ports.outputs]
        self._reported = [i for i, key in enumerate(self._outputs) if key is None]
        self._names = [ports.outputs[i].name.removeprefix("metric.") for i in self._reported]
        self._fetch: list[int] | None = None  # the reported outputs, once the worker said they may leave
        self._rule = False  # whether the worker releases anything of this plan (its policy has a rule for it)
        roles = {s.name: s.role for s in ports.inputs}
        # Trained weights: the weight inputs a step output replaces (frozen ones are never written).
        self.trained = {out: name for out, name in ports.bindings.items() if roles[name] in WEIGHT_ROLES}

    def steps(self, order: list[Batch], hyper: dict[str, np.ndarray], *, training: bool) -> dict[str, float]:
        """Run one step per batch in ``order``; the batch-weighted means of the loss and metrics. After the
        first step, ask the worker what may leave: PlanRefused unless the loss and metrics may (and, when
        ``training``, the weights), before the other steps run and with nothing read."""
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
            fetch = self._fetch or []
            results = self.worker.run(
                self.variant, args, outputs=self._outputs, fetch=fetch, wait=False, name=self.ports.name
            )
            reported = [results[i] for i in self._reported]
            if self._fetch is None:
                infos = self.worker.describe(*reported)
                self._fetch = [i for i, info in zip(self._reported, infos, strict=True) if _readable(info)]
                self._rule |= any(isinstance(info.release, str) for info in infos)
                if training:
                    self.modes()  # refuses now, before the other steps, if the weights cannot leave
                held = [self.ports.outputs[i].name for i in self._reported if i not in self._fetch]
                if held:  # every node must report the same metrics, or Flower skips the round's aggregation
                    raise PlanRefused(self._refusal(held, "as_is"))
            pending.append((x.shape[0], reported))
        sums = dict.fromkeys(self._names, 0.0)
        seen = 0
        for n, values in pending:
            for name, pointer in zip(self._names, values, strict=True):
                sums[name] += float(np.asarray(pointer.get())) * n
            seen += n
        if not np.isfinite(sums.get("loss", 0.0)):
            raise FloatingPointError(f"plan {self.ports.name!r}: the loss became {sums['loss']} on the plan-worker")
        return {k: v / max(seen, 1) for k, v in sums.items()}

    def modes(self) -> dict[str, str]:
        """How each trained weight reads back (``as_is`` or ``update``), asked of the worker without reading
        anything; PlanRefused naming the policy rule that is missing when one may not leave."""
        inputs = list(self.trained.values())
        specs = {s.name: s for s in self.ports.inputs}
        pointers = [
            PointerTensor(self.worker, self.keys[n], specs[n].dtype, specs[n].shape, owned=False) for n in inputs
        ]
        infos = self.worker.describe(*pointers)
        self._rule |= any(isinstance(info.release, str) for info in infos)
        modes = {n: "as_is" if not i.private else i.release for n, i in zip(inputs, infos, strict=True)}
        held = [out for out, n in self.trained.items() if not isinstance(modes[n], str)]
        if held:
            raise PlanRefused(self._refusal(held, "update"))
        return modes  # type: ignore[return-value]

    def _refusal(self, held: list[str], how: str) -> str:
        """Why nothing is returned: which rule the data owner's policy lacks, and what to add."""
        first = held[0]
        value = f'{{ update = "{self.trained[first]}" }}' if how == "update" else '"as_is"'
        example = f'outputs."{first}" = {value}'
        plan = repr(self.ports.name)
        what = (
            f"the weights that plan {plan} trains"
            if how == "update"
            else f"the loss and metrics that plan {plan} computes"
        )
        where = f"plan-worker {self.worker.id!r} keeps {what} on its data"
        if self._rule:
            why = f"the data owner's --policy rule for this plan does not release {held}"
        else:
            why = f'the data owner\'s --policy has no rule for this plan (fingerprint = "{self.fingerprint}")'
        each = "trained weight" if how == "update" else "metric"
        return (
            f"{where}: {why}. The bridge returns only what the policy releases: add {example} for each {each} "
            "to the plan's [[plan]] rule (`plan-worker review` prints the whole rule). Nothing left the worker."
        )

    def weights(self) -> dict[str, np.ndarray]:
        """The trained weights: pushed + released update, or the released value; untrained ones as pushed."""
        modes = self.modes()
        names = list(modes)
        arrays = self.worker.fetch_arrays([self.keys[n] for n in names], keep=False)
        out = dict(self.pushed)
        for name, array in zip(names, arrays, strict=True):
            pushed = self.pushed[name]
            if array.shape != pushed.shape or array.dtype != pushed.dtype:
                raise ValueError(
                    f"plan-worker {self.worker.id!r} returned {array.dtype}{list(array.shape)} for {name!r}, "
                    f"which holds {pushed.dtype}{list(pushed.shape)}"
                )
            out[name] = pushed + array if modes[name] == "update" else array
        return out

    def free(self) -> None:
        for key in self.keys.values():
            self.worker.release(key)
        self.worker.flush()


def curve_keys(node: Mapping[str, Any]) -> tuple[bytes, bytes, bytes] | None:
    """(client public, client secret, worker public) from the node config's key files, or None (no CURVE)."""
    secret_file, server_file = node.get("planwire-curve-secret"), node.get("planwire-curve-server")
    if not secret_file and not server_file:
        return None
    if not secret_file or not server_file:
        missing = "planwire-curve-secret" if not secret_file else "planwire-curve-server"
        raise ValueError(
            f"node config {missing} is missing: CURVE needs both this node's secret key file "
            "(planwire-curve-secret) and the plan-worker's public key file (planwire-curve-server)"
        )
    from planwire.transport.auth import load_secret, public_key

    return public_key(str(secret_file)), load_secret(str(secret_file)), public_key(str(server_file))


def _open(msg: Message, context: Context) -> tuple[RemoteWorker, bytes, PlanPorts, dict, list[Batch], dict[str, Any]]:
    plan, ports, conf, weights = opened(msg, context)
    node = context.node_config
    worker = connect(
        str(node["planwire-worker"]), timeout=float(node.get("planwire-timeout", 60.0)), curve=curve_keys(node)
    )
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
        hyper = ports.hyper_feeds(hyper_overrides(conf, ports))
        rng = round_rng(conf, context)
        steps = config_int(conf, "local-steps", 0) or config_int(conf, "local-epochs", 1) * len(batches)
        order = [batches[i] for _ in range(-(-steps // len(batches))) for i in rng.permutation(len(batches))][:steps]
        remote = _Remote(worker, plan, ports, weights)
        try:
            metrics = remote.steps(order, hyper, training=True)
            new = remote.weights()
        finally:
            remote.free()
        n = sum(int(x.shape[0]) for x, _ in batches)
        return reply(msg, Outcome(new, n, metrics), state_to_arrays(ports, new))
    finally:
        worker.close()


def bridge_evaluate(msg: Message, context: Context) -> Message:
    """Loss and metrics (those the policy releases) of the server's weights on the plan-worker's batches:
    the plan's step with a zero learning rate, whose state is then dropped."""
    worker, plan, ports, weights, batches, _ = _open(msg, context)
    try:
        if "hyper.lr" not in ports.hyper_defaults:
            raise ValueError(f"plan {ports.name!r} has no hyper.lr input: it cannot be run without updating")
        remote = _Remote(worker, plan, ports, weights)
        try:
            metrics = remote.steps(batches, ports.hyper_feeds({"lr": 0.0}), training=False)
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


__all__ = ["bridge_client_app", "bridge_evaluate", "bridge_train", "curve_keys"]
