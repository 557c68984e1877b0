"""planwire_digits: the ServerApp. Builds the plan once, then runs a stock Flower strategy with it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Krum, Result, Strategy

from planwire.flower import PlanPorts, PlanRunner, PlanStrategy, arrays_to_state
from planwire_digits.model import build
from planwire_digits.task import held_out

# The same keys and defaults as [tool.flwr.app.config] in pyproject.toml (run_simulation has no run config).
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 20,
    "strategy": "fedavg",
    "fraction-train": 0.3,
    "fraction-evaluate": 0.0,
    "min-available-nodes": 2,
    "local-epochs": 5,
    "batch-size": 8,
    "lr": 0.1,
    "seed": 0,
}


def make_strategy(conf: Mapping[str, Any]) -> Strategy:
    """One of Flower's own strategies, by name; planwire adds nothing to its aggregation."""
    common = {
        "fraction_train": conf["fraction-train"],
        "fraction_evaluate": conf["fraction-evaluate"],
        "min_available_nodes": conf["min-available-nodes"],
    }
    name = conf["strategy"]
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=0.01)
    if name == "fedadam":
        return FedAdam(**common, eta=0.03, eta_l=conf["lr"])
    if name == "krum":
        return Krum(**common, num_malicious_nodes=1)
    raise ValueError(f"run config strategy={name!r}: use fedavg, fedprox, fedadam or krum")


def evaluator(plan: bytes) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Held-out accuracy at the server, with the plan itself in onnxruntime (a zero learning rate step)."""
    ports = PlanPorts.check(plan)
    runner = PlanRunner(plan, ports)
    x, y = held_out()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        outcome = runner.evaluate(arrays_to_state(ports, arrays), (x, y), batch_size=512)
        return MetricRecord(outcome.metrics)

    return evaluate


def run(grid: Grid, conf: Mapping[str, Any]) -> tuple[Result, PlanStrategy]:
    """Build the plan, then let the strategy run ``num-server-rounds`` rounds."""
    conf = {**DEFAULTS, **conf}
    model, plan = build(lr=conf["lr"], seed=conf["seed"])
    strategy = PlanStrategy(make_strategy(conf), plan)
    train_config = ConfigRecord({k: conf[k] for k in ("lr", "local-epochs", "batch-size", "seed")})
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        train_config=train_config,
        num_rounds=conf["num-server-rounds"],
        evaluate_fn=evaluator(plan),
    )
    return result, strategy


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    result, _ = run(grid, dict(context.run_config))
    accuracy = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]["accuracy"]
    print(f"final held-out accuracy: {accuracy:.3f}")
