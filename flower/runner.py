"""Local training with a plan in plain onnxruntime: batching, shuffling and the step loop (no torch).

The client app owns the loop: it cuts its own data into batches of any size (the plan's batch axis is
dynamic), shuffles them each epoch, feeds the plan the batch, the hyper-parameters and the current state,
and replaces each state input with the output bound to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from planwire.flower.ports import PlanPorts
from planwire.transport import dtypes
from planwire.transport.ortoptions import session_options

Data = Sequence[np.ndarray]  # model inputs then targets, first axis = examples


@dataclass
class Outcome:
    """What a local run produced: the new weights (by input name), the example count and mean metrics."""

    state: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


class PlanRunner:
    """One checked plan loaded in onnxruntime, reused for every round on this node."""

    def __init__(self, plan: bytes, ports: PlanPorts, *, threads: int = 1) -> None:
        self.ports = ports
        self.session = ort.InferenceSession(plan, session_options(threads), providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in ports.outputs]
        self._reported = ports.reported

    def check_data(self, data: Data, what: str = "local data") -> int:
        """The number of examples in ``data``; ValueError naming the array that does not fit the plan."""
        args = self.ports.args
        if len(data) != len(args):
            raise ValueError(f"{what}: plan {self.ports.name!r} takes {len(args)} arrays, got {len(data)}")
        n = len(data[0]) if data else 0
        for spec, array in zip(args, data, strict=True):
            why = spec.mismatch(dtypes.to_wire(array.dtype), array.shape)
            if why:
                raise ValueError(f"{what}: array for {spec.name!r}: {why}")
            if len(array) != n:
                raise ValueError(f"{what}: arrays have {n} and {len(array)} examples")
        if n == 0:
            raise ValueError(f"{what} is empty")
        return n

    def train(
        self,
        weights: Mapping[str, np.ndarray],
        data: Data,
        *,
        batch_size: int,
        epochs: int = 1,
        steps: int = 0,
        hyper: Mapping[str, object] | None = None,
        rng: np.random.Generator,
        proximal_mu: float = 0.0,
    ) -> Outcome:
        """``steps`` local steps (or, when 0, ``epochs`` passes) over ``data`` in shuffled batches."""
        n = self.check_data(data)
        if batch_size < 1:
            raise ValueError(f"batch-size must be at least 1, got {batch_size}")
        total = steps if steps > 0 else epochs * -(-n // batch_size)
        state = {**weights, **self.ports.initial_optimizer_state()}
        feeds = self.ports.hyper_feeds(hyper or {})
        lr = float(feeds["hyper.lr"]) if "hyper.lr" in feeds else 0.0
        start = {name: weights[name] for name in self.ports.names("param")} if proximal_mu else {}
        sums: dict[str, float] = {}
        seen = done = 0
        while done < total:
            order = rng.permutation(n)
            for lo in range(0, n, batch_size):
                if done == total:
                    break
                idx = order[lo : lo + batch_size]
                before = {k: state[k] for k in start}
                results = self._step(state, [a[idx] for a in data], feeds)
                self._accumulate(sums, results, len(idx))
                seen += len(idx)
                done += 1
                # FedProx: the gradient of mu/2 |w - w_global|^2, as one more decoupled SGD step.
                for k, w0 in start.items():
                    state[k] = state[k] - np.asarray(lr * proximal_mu, state[k].dtype) * (before[k] - w0)
        return Outcome({k: state[k] for k in weights}, n, {k: v / seen for k, v in sums.items()})

    def evaluate(self, weights: Mapping[str, np.ndarray], data: Data, *, batch_size: int) -> Outcome:
        """Loss and metrics of ``weights`` on ``data``: the plan's step with a zero learning rate, whose
        updates are discarded (train-mode forward: dropout and batch statistics as in training)."""
        n = self.check_data(data, "evaluation data")
        if "hyper.lr" not in self.ports.hyper_defaults:
            raise ValueError(f"plan {self.ports.name!r} has no hyper.lr input: it cannot be run without updating")
        feeds = self.ports.hyper_feeds({"lr": 0.0})
        sums: dict[str, float] = {}
        for lo in range(0, n, batch_size):
            state = {**weights, **self.ports.initial_optimizer_state()}
            self._accumulate(
                sums, self._step(state, [a[lo : lo + batch_size] for a in data], feeds), min(batch_size, n - lo)
            )
        return Outcome(dict(weights), n, {k: v / n for k, v in sums.items()})

    def _step(self, state: dict[str, np.ndarray], batch: list[np.ndarray], hyper: dict[str, np.ndarray]) -> dict:
        feeds = {spec.name: a for spec, a in zip(self.ports.args, batch, strict=True)}
        feeds.update(hyper)
        feeds.update({spec.name: state[spec.name] for spec in self.ports.inputs if spec.role not in ("arg", "hyper")})
        values = dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))
        for out, target in self.ports.bindings.items():
            state[target] = values[out]
        loss = float(values["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"plan {self.ports.name!r}: the loss became {loss}; lower the learning rate")
        return {self._reported[k]: float(v) for k, v in values.items() if k in self._reported}

    @staticmethod
    def _accumulate(sums: dict[str, float], results: Mapping[str, float], weight: int) -> None:
        for k, v in results.items():
            sums[k] = sums.get(k, 0.0) + v * weight


__all__ = ["Data", "Outcome", "PlanRunner"]
