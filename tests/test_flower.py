"""planwire.flower: training plans as the payload of Flower apps, on Flower's real simulation engine.

Unit level: ports read from a plan's own metadata, ArrayRecord conversion, the client's training loop
(checked step by step against SGD computed by hand in numpy), the node's plan cache and policy.
Real runs: 100 virtual clients learning the digits CNN, Flower's FedProx/FedAdam/Krum through
PlanStrategy, a hostile node's reply left out, and a whole federation in processes where torch
cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("flwr", reason="planwire[flower] is not installed")
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result
from flwr.simulation import run_simulation
from torch import nn

import planwire as sy
from planwire.flower import (
    PlanPorts,
    PlanRefused,
    PlanRunner,
    PlanStrategy,
    arrays_to_state,
    fingerprint,
    state_to_arrays,
)
from planwire.flower import cache as plan_cache
from planwire.flower.cache import plan_for
from planwire.flower.client import hyper_overrides, round_rng
from planwire.flower.server import BYTES_KEY, MAX_DELIVERIES, PLAN_RECORD, SHA_KEY
from planwire.transport.plancheck import PlanRejected

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower"
sys.path.insert(0, str(APP))

from planwire_digits import model as digits_model  # noqa: E402
from planwire_digits import server_app as digits_server  # noqa: E402
from planwire_digits.client_app import app as digits_client  # noqa: E402

# Two CPUs for the whole engine, one per virtual client at a time: what CI has.
BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": 2, "include_dashboard": False},
}


@pytest.fixture(scope="module")
def digits_plan() -> tuple[nn.Module, bytes]:
    return digits_model.build(lr=0.1)


@pytest.fixture(scope="module")
def linear_plan() -> tuple[nn.Module, bytes]:
    """y = Wx + b with MSE and plain SGD: simple enough to check every step by hand."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    plan = sy.training_plan(model, F.mse_loss, sy.optim.SGD(lr=0.1), args_shape=[(-1, 3), (-1, 2)])
    return model, plan.step.variant.data


@pytest.fixture(autouse=True)
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))


def context(node_id: int = 7, **node_config: object) -> Context:
    return Context(run_id=1, node_id=node_id, node_config=dict(node_config), state=RecordDict(), run_config={})


def plan_content(plan: bytes, *, with_bytes: bool = True, sha: str | None = None) -> RecordDict:
    record = ConfigRecord({SHA_KEY: sha or fingerprint(plan)})
    if with_bytes:
        record[BYTES_KEY] = plan
    return RecordDict({PLAN_RECORD: record})


# -- ports and records --------------------------------------------------------------------------------


def test_ports_come_from_the_plan_itself(digits_plan: tuple[nn.Module, bytes]) -> None:
    model, plan = digits_plan
    ports = PlanPorts.check(plan)
    assert list(ports.weights) == list(model.state_dict())  # the keys Flower users already have
    assert ports.hyper_defaults == {"hyper.lr": 0.1, "hyper.momentum": 0.9, "hyper.weight_decay": 0.0}
    assert [s.name for s in ports.args] == ["arg0", "arg1"]
    assert set(ports.bindings.values()) == {s.name for s in ports.inputs if s.role in ("param", "optim")}
    optim = ports.initial_optimizer_state()
    assert len(optim) == 6 and all(not a.any() for a in optim.values())
    assert fingerprint(plan) == ports.variant(plan).id  # the same id plan-worker registers it under


def test_ports_refuse_what_is_not_a_training_plan() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Abs", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    data = onnx.helper.make_model(graph).SerializeToString()
    with pytest.raises(PlanRejected, match="not a planwire training plan"):
        PlanPorts.check(data)


def test_arrays_round_trip_and_misfits(digits_plan: tuple[nn.Module, bytes]) -> None:
    model, plan = digits_plan
    ports = PlanPorts.check(plan)
    record = ArrayRecord(model.state_dict())  # what a Flower server starts from
    state = arrays_to_state(ports, record)
    assert set(state) == {s.name for s in ports.inputs if s.role == "param"}
    np.testing.assert_array_equal(state["param.head.1.bias"], model.head[1].bias.detach().numpy())
    back = state_to_arrays(ports, state)
    assert list(back) == list(record)
    for key in record:
        np.testing.assert_array_equal(back[key].numpy(), record[key].numpy())

    del record["head.1.bias"]
    with pytest.raises(ValueError, match=r"missing \['head.1.bias'\]"):
        arrays_to_state(ports, record)
    record["head.1.bias"] = Array(np.zeros(11, np.float32))
    with pytest.raises(ValueError, match=r"\['head.1.bias'\] is float32\[11\], plan 'train_CNN' holds float32\[10\]"):
        arrays_to_state(ports, record)
    record["head.1.bias"] = Array(np.full(10, np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        arrays_to_state(ports, record)


# -- the client's training loop ---------------------------------------------------------------------


def _sgd_by_hand(w, b, x, y, *, batch, epochs, lr, rng, mu=0.0):
    """What PlanRunner.train must do: shuffled batches of ``batch`` (the last one shorter), MSE SGD, and
    FedProx's proximal step."""
    w0, b0 = w.copy(), b.copy()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for lo in range(0, len(x), batch):
            i = order[lo : lo + batch]
            err = x[i] @ w.T + b - y[i]
            gw = 2 * err.T @ x[i] / err.size
            gb = 2 * err.sum(0) / err.size
            w, b = w - lr * gw - lr * mu * (w - w0), b - lr * gb - lr * mu * (b - b0)
    return w, b


@pytest.mark.parametrize(("batch", "mu"), [(4, 0.0), (3, 0.0), (10, 0.0), (4, 0.5)])
def test_local_training_matches_sgd_by_hand(linear_plan: tuple[nn.Module, bytes], batch: int, mu: float) -> None:
    model, plan = linear_plan
    ports = PlanPorts.check(plan)
    runner = PlanRunner(plan, ports)
    data_rng = np.random.default_rng(1)
    x = data_rng.standard_normal((10, 3)).astype(np.float32)
    y = data_rng.standard_normal((10, 2)).astype(np.float32)
    weights = arrays_to_state(ports, ArrayRecord(model.state_dict()))
    out = runner.train(
        weights, (x, y), batch_size=batch, epochs=2, hyper={"lr": 0.05}, rng=np.random.default_rng(5), proximal_mu=mu
    )
    w, b = _sgd_by_hand(
        weights["param.weight"].astype(np.float64),
        weights["param.bias"].astype(np.float64),
        x,
        y,
        batch=batch,
        epochs=2,
        lr=0.05,
        rng=np.random.default_rng(5),
        mu=mu,
    )
    np.testing.assert_allclose(out.state["param.weight"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.state["param.bias"], b, rtol=1e-4, atol=1e-5)
    assert out.num_examples == 10 and set(out.metrics) == {"loss"}

    # local-steps counts steps, across epochs: 3 steps of 4 = one epoch's 4+4+2, then 4 of the next.
    three = runner.train(weights, (x, y), batch_size=4, steps=3, hyper={"lr": 0.05}, rng=np.random.default_rng(5))
    assert not np.allclose(three.state["param.weight"], out.state["param.weight"])

    # evaluation: the MSE of the weights as they are; nothing changes
    ev = runner.evaluate(weights, (x, y), batch_size=3)
    expected = ((x @ weights["param.weight"].T + weights["param.bias"] - y) ** 2).mean()
    assert ev.metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert ev.state["param.weight"] is weights["param.weight"]


def test_the_bench_pytorch_client_trains_on_planwire_batches(linear_plan: tuple[nn.Module, bytes]) -> None:
    """bench.flower's PyTorch client draws the very batches, in the same order, that planwire's ClientApp
    feeds its plan (the flower family's like-for-like), by epochs and by local steps; the shuffling is
    seeded by the node's partition-id where it has one (simulations draw node ids at random)."""
    from bench.flower import batch_order

    model, plan = linear_plan
    ports = PlanPorts.check(plan)
    fed: list[list[int]] = []

    class Recording(PlanRunner):
        def _step(self, state, batch, hyper):  # noqa: ANN001, ANN202
            fed.append(batch[0][:, 0].astype(int).tolist())
            return super()._step(state, batch, hyper)

    runner = Recording(plan, ports)
    n = 10
    x = np.zeros((n, 3), np.float32)
    x[:, 0] = np.arange(n)  # each example carries its index
    y = np.zeros((n, 2), np.float32)
    weights = arrays_to_state(ports, ArrayRecord(model.state_dict()))
    for steps in (0, 4):
        conf = {"seed": 3, "server-round": 2, "batch-size": 4, "local-epochs": 2, "local-steps": steps}
        fed.clear()
        rng = round_rng(conf, context(node_id=99, **{"partition-id": 6}))
        runner.train(weights, (x, y), batch_size=4, epochs=2, steps=steps, hyper={"lr": 0.0}, rng=rng)
        assert fed == [b.tolist() for b in batch_order(conf, 6, n)]
        assert len(fed) == (steps or 2 * 3)
    again = round_rng({"seed": 3, "server-round": 2}, context(node_id=12345, **{"partition-id": 6})).permutation(n)
    assert (
        again.tolist()
        == round_rng({"seed": 3, "server-round": 2}, context(**{"partition-id": 6})).permutation(n).tolist()
    )
    assert (
        round_rng({}, context(node_id=5)).permutation(n).tolist()
        != round_rng({}, context(node_id=6)).permutation(n).tolist()
    )


def test_local_data_that_does_not_fit_is_named(linear_plan: tuple[nn.Module, bytes]) -> None:
    model, plan = linear_plan
    ports = PlanPorts.check(plan)
    runner = PlanRunner(plan, ports)
    weights = arrays_to_state(ports, ArrayRecord(model.state_dict()))
    x, y = np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"array for 'arg0': expected shape \[\?, 3\], got \[4, 5\]"):
        runner.train(weights, (np.zeros((4, 5), np.float32), y), batch_size=2, rng=np.random.default_rng())
    with pytest.raises(ValueError, match="expected dtype"):
        runner.train(weights, (x.astype(np.float64), y), batch_size=2, rng=np.random.default_rng())
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        runner.train(weights, (x + 1e30, y), batch_size=2, hyper={"lr": 1e30}, rng=np.random.default_rng())


# -- the node's plan cache and policy -----------------------------------------------------------------


def test_plan_is_checked_once_and_cached_per_node(linear_plan: tuple[nn.Module, bytes]) -> None:
    _, plan = linear_plan
    plan_cache._cached.clear()
    ctx = context()
    data, ports = plan_for(plan_content(plan), ctx)
    assert data == plan and ports.name == PlanPorts.check(plan).name
    kept = ctx.state[plan_cache.STATE_KEY]
    assert kept[SHA_KEY] == fingerprint(plan) and kept[BYTES_KEY] == plan

    # Later messages carry only the fingerprint: a fresh ClientApp process finds it in context.state.
    plan_cache._cached.clear()
    assert plan_for(plan_content(plan, with_bytes=False), ctx)[0] == plan
    # A node that never got it says so (the server then sends the bytes again).
    plan_cache._cached.clear()
    with pytest.raises(PlanRefused, match="not cached on this node"):
        plan_for(plan_content(plan, with_bytes=False), context(node_id=8))


def test_node_policy_refuses_plans(linear_plan: tuple[nn.Module, bytes], digits_plan: tuple[nn.Module, bytes]) -> None:
    _, plan = linear_plan
    _, other = digits_plan
    plan_cache._cached.clear()
    allow = context(**{"planwire-allowed-plans": fingerprint(other)})
    with pytest.raises(PlanRefused, match="not in this node's planwire-allowed-plans"):
        plan_for(plan_content(plan), allow)
    assert plan_for(plan_content(other), allow)[0] == other
    with pytest.raises(PlanRefused, match="do not match their fingerprint"):
        plan_for(plan_content(plan, sha=fingerprint(other)), context())
    with pytest.raises(PlanRefused, match="not a sha256 fingerprint"):
        plan_for(plan_content(plan), context(**{"planwire-allowed-plans": "abc"}))
    # The size limit is plan-worker's: MiB in the node config, checked before anything is parsed.
    assert plan_cache.NodePolicy.from_node_config({"planwire-max-plan-mb": 3}).max_bytes == 3 << 20
    with pytest.raises(PlanRefused, match="positive integer"):
        plan_cache.NodePolicy.from_node_config({"planwire-max-plan-mb": "big"})
    with pytest.raises(PlanRejected, match="over the worker limit of 100 B"):
        PlanPorts.check(plan, max_bytes=100)


def test_a_plan_with_external_data_never_reaches_onnxruntime(linear_plan: tuple[nn.Module, bytes]) -> None:
    _, plan = linear_plan
    proto = onnx.load_from_string(plan)
    t = proto.graph.initializer.add()
    t.name, t.data_type, t.data_location = "leak", onnx.TensorProto.FLOAT, onnx.TensorProto.EXTERNAL
    t.dims.append(4)
    t.external_data.add(key="location", value="secrets.bin")
    hostile = proto.SerializeToString()
    plan_cache._cached.clear()
    with pytest.raises(PlanRejected, match="external data"):
        plan_for(plan_content(hostile), context())


def _with_metadata(plan: bytes, **edits: tuple[str, str]) -> bytes:
    """``plan`` with text replaced in its planwire metadata (key -> (old, new)), as a hostile peer might."""
    proto = onnx.load_from_string(plan)
    for prop in proto.metadata_props:
        if prop.key in edits:
            old, new = edits[prop.key]
            assert old in prop.value, (prop.key, prop.value)
            prop.value = prop.value.replace(old, new)
    return proto.SerializeToString()


@pytest.mark.parametrize("lr", ["Infinity", "1e300", "NaN"])
def test_a_hyper_default_its_dtype_cannot_hold_is_rejected(linear_plan: tuple[nn.Module, bytes], lr: str) -> None:
    _, plan = linear_plan
    hostile = _with_metadata(
        plan,
        **{
            "planwire.inputs": (
                '"hyper.lr", "role": "hyper", "dtype": "double"',
                '"hyper.lr", "role": "hyper", "dtype": "int64"',
            ),
            "planwire.training": ('"lr": 0.1', f'"lr": {lr}'),
        },
    )
    with pytest.raises(
        PlanRejected, match=r"default of hyper-parameter 'hyper\.lr' is .*whole number in int64's range"
    ):
        PlanPorts.check(hostile)


def test_a_run_config_override_its_dtype_cannot_hold_is_refused_naming_it(linear_plan: tuple[nn.Module, bytes]) -> None:
    _, plan = linear_plan
    ports = PlanPorts.check(
        _with_metadata(
            plan,
            **{
                "planwire.inputs": (
                    '"hyper.lr", "role": "hyper", "dtype": "double"',
                    '"hyper.lr", "role": "hyper", "dtype": "int64"',
                ),
                "planwire.training": ('"lr": 0.1', '"lr": 1'),
            },
        )
    )
    assert ports.hyper_feeds({"lr": 3})["hyper.lr"].tolist() == 3
    for bad in (1e300, float("inf"), 0.5):
        with pytest.raises(ValueError, match=r"hyper-parameter 'hyper\.lr' is .*whole number in int64's range"):
            ports.hyper_feeds({"lr": bad})


def test_a_run_config_override_that_is_no_number_is_refused_naming_it(linear_plan: tuple[nn.Module, bytes]) -> None:
    """The rule the defaults are held to at load holds for every call's overrides: ``lr = true`` in a run config
    is refused naming the input, not silently replaced by the default (nor taken as 1.0)."""
    _, plan = linear_plan
    ports = PlanPorts.check(plan)
    assert ports.hyper_defaults == {n: a.item() for n, a in ports.bound.hyper.items()}  # read once, by BoundPlan
    conf = {"lr": 0.05, "local-epochs": 2, "seed": "not a hyper-parameter"}
    assert hyper_overrides(conf, ports) == {"lr": 0.05}
    assert ports.hyper_feeds(hyper_overrides(conf, ports))["hyper.lr"].item() == 0.05
    for bad in (True, False, "0.1", None):
        with pytest.raises(ValueError, match=r"hyper-parameter 'hyper\.lr' is .*: it takes a finite float"):
            ports.hyper_feeds(hyper_overrides({"lr": bad}, ports))


def test_a_targets_count_that_is_no_count_is_rejected(linear_plan: tuple[nn.Module, bytes]) -> None:
    _, plan = linear_plan
    hostile = _with_metadata(plan, **{"planwire.training": ('"targets": 1', '"targets": "x"')})
    with pytest.raises(PlanRejected, match=r'"targets" must count .*from 0 to 2\), not \'x\''):
        PlanPorts.check(hostile)


# -- real runs on Flower's simulation engine --------------------------------------------------------


def simulate(client_app: ClientApp, nodes: int, conf: dict) -> tuple[Result, PlanStrategy]:
    """The example's ServerApp logic with ``conf`` over ``nodes`` virtual SuperNodes."""
    out: dict = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        out["run"] = digits_server.run(grid, conf)

    run_simulation(server_app=server, client_app=client_app, num_supernodes=nodes, backend_config=BACKEND)
    assert "run" in out, "the ServerApp did not finish"
    return out["run"]


def test_100_virtual_clients_learn_digits(digits_plan: tuple[nn.Module, bytes]) -> None:
    """The example's defaults: 20 rounds, 30 of 100 clients each, ~13 examples per client."""
    result, strategy = simulate(digits_client, 100, {})
    accuracy = {r: m["accuracy"] for r, m in result.evaluate_metrics_serverapp.items()}
    assert accuracy[20] > 0.90, accuracy
    assert sorted(result.train_metrics_clientapp) == list(range(1, 21))  # every round aggregated
    assert set(result.train_metrics_clientapp[20]) == {"loss", "accuracy"}  # weighted by num-examples
    # The plan went to each node once, not once per round: 20 rounds x 30 messages, far fewer copies.
    plan = strategy.plan
    assert len(strategy.holders) <= 100
    assert strategy.plan_bytes_sent == len(strategy.holders) * len(plan)
    assert len(strategy.holders) > 80 and not strategy.left_out


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "krum"])
def test_flower_strategies_run_the_plan(name: str) -> None:
    conf = {"strategy": name, "num-server-rounds": 3, "fraction-train": 1.0, "local-epochs": 1, "batch-size": 16}
    if name == "krum":  # Krum keeps one client's model, not an average: let each client's model get somewhere
        conf.update({"local-epochs": 3, "lr": 0.05})
    result, strategy = simulate(digits_client, 8, conf)
    accuracy = {r: m["accuracy"] for r, m in result.evaluate_metrics_serverapp.items()}
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert accuracy[3] > accuracy[0] + 0.05, accuracy  # FedAdam moves slowest: its server step is small
    assert type(strategy.strategy).__name__.lower() == name
    assert strategy.plan_bytes_sent == 8 * len(strategy.plan)


hostile = ClientApp()


@hostile.train()
def _hostile_train(msg: Message, context: Context) -> Message:
    """Node 0 answers with an array of the wrong shape; the others train honestly."""
    reply = digits_client(msg, context)
    if context.node_config["partition-id"] == 0:
        reply.content["arrays"]["head.1.bias"] = Array(np.zeros(3, np.float32))
    return reply


def test_a_reply_that_does_not_fit_the_plan_is_left_out() -> None:
    conf = {"num-server-rounds": 2, "fraction-train": 1.0, "local-epochs": 1, "batch-size": 16}
    result, strategy = simulate(hostile, 4, conf)
    assert sorted(result.train_metrics_clientapp) == [1, 2]  # the rounds went on without it
    assert len(strategy.left_out) == 2
    node, why = strategy.left_out[0]
    assert {n for n, _ in strategy.left_out} == {node}
    assert "reply arrays['head.1.bias'] is float32[3], plan 'train_CNN' holds float32[10]" in why
    accuracy = {r: m["accuracy"] for r, m in result.evaluate_metrics_serverapp.items()}
    assert accuracy[2] > accuracy[0]


inconsistent = ClientApp()


@inconsistent.train()
def _inconsistent_train(msg: Message, context: Context) -> Message:
    """Nodes 0-2 reply with metrics Flower cannot aggregate with the others' (one more key, a list where the
    others have a number, the MetricRecord under another name), node 3 claims a weight that would outweigh
    everyone (or overflow the sum of weights); nodes 4 and 5 train honestly."""
    reply = digits_client(msg, context)
    part = context.node_config["partition-id"]
    if part == 0:
        reply.content["metrics"]["extra"] = 1.0
    elif part == 1:
        reply.content["metrics"]["loss"] = [1.0, 2.0]
    elif part == 2:
        reply.content["scores"] = reply.content["metrics"]
        del reply.content["metrics"]
    elif part == 3:
        reply.content["metrics"]["num-examples"] = 1e308
    return reply


def test_replies_whose_metrics_differ_are_left_out_and_every_round_aggregates() -> None:
    """Flower skips a round's whole aggregation when replies' metric keys or record names differ: a hostile
    node must not be able to do that. (Without the screening, no round aggregates here.)"""
    conf = {"num-server-rounds": 2, "fraction-train": 1.0, "local-epochs": 1, "batch-size": 16}
    result, strategy = simulate(inconsistent, 6, conf)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert set(result.train_metrics_clientapp[2]) == {"loss", "accuracy"}
    assert len(strategy.left_out) == 8 and len({n for n, _ in strategy.left_out}) == 4
    reasons = {why for _, why in strategy.left_out}
    assert reasons == {
        "metrics do not fit plan 'train_CNN': missing [], unexpected ['extra'] (every reply must carry the same keys)",
        "metric 'loss' must be a finite number, got [1.0, 2.0]",
        "expected one MetricRecord named 'metrics', got ['scores']",
        "'num-examples' must be a whole number from 1 to 1000000, got 1e+308",
    }
    accuracy = {r: m["accuracy"] for r, m in result.evaluate_metrics_serverapp.items()}
    assert accuracy[2] > accuracy[0]


failing = ClientApp()


@failing.train()
def _failing_train(msg: Message, context: Context) -> Message:
    """Node 0 fails every time (as a node that refuses the plan, or crashes, does); the others train."""
    if context.node_config["partition-id"] == 0:
        raise RuntimeError("this node keeps failing")
    return digits_client(msg, context)


def test_a_node_that_keeps_failing_is_not_sent_the_plan_every_round() -> None:
    rounds = MAX_DELIVERIES + 2
    conf = {"num-server-rounds": rounds, "fraction-train": 1.0, "local-epochs": 1, "batch-size": 16}
    result, strategy = simulate(failing, 3, conf)
    assert sorted(result.train_metrics_clientapp) == list(range(1, rounds + 1))
    assert len(strategy.holders) == 2 and len(strategy.given_up) == 1
    (node,) = strategy.given_up
    assert node not in strategy.holders
    assert strategy.deliveries == {(node, strategy.fingerprint): MAX_DELIVERIES}  # the holders' counts are reset
    # The plan's bytes: once to each of the two working nodes, MAX_DELIVERIES times to the failing one (not
    # once per round).
    assert strategy.plan_bytes_sent == (2 + MAX_DELIVERIES) * len(strategy.plan)


_NO_TORCH = """
import os, sys
with open(os.environ["NO_TORCH_PIDS"], "a") as f:
    f.write(f"{os.getpid()}\\n")


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked: this process must not need it")


sys.meta_path.insert(0, _NoTorch())
"""

_FEDERATION = """
import json, sys
import numpy as np
from flwr.app import ArrayRecord, Array, ConfigRecord
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from planwire.flower import PlanStrategy
import planwire.flower.bridge  # the bridge is torch-free too
from planwire_digits.client_app import app as client_app

plan = open(sys.argv[1], "rb").read()
weights = dict(np.load(sys.argv[2]))
out = {}
server = ServerApp()

@server.main()
def main(grid, context):
    strategy = PlanStrategy(FedAvg(fraction_train=1.0, fraction_evaluate=1.0), plan)
    initial = ArrayRecord(array_dict={k: Array(v) for k, v in weights.items()})
    config = ConfigRecord({"lr": 0.1, "local-epochs": 1, "batch-size": 16})
    out["result"] = strategy.start(grid=grid, initial_arrays=initial, train_config=config, num_rounds=2)

run_simulation(server_app=server, client_app=client_app, num_supernodes=5, backend_config=%r)
r = out["result"]
print(json.dumps({
    "train": {k: dict(v) for k, v in r.train_metrics_clientapp.items()},
    "evaluate": {k: dict(v) for k, v in r.evaluate_metrics_clientapp.items()},
    "torch": "torch" in sys.modules,
}))
"""


def test_a_whole_federation_runs_where_torch_cannot_be_imported(
    digits_plan: tuple[nn.Module, bytes], tmp_path: Path
) -> None:
    """Server (from the plan's bytes) and every client process: flwr, onnxruntime and numpy only."""
    model, plan = digits_plan
    (tmp_path / "plan.onnx").write_bytes(plan)
    np.savez(tmp_path / "weights.npz", **{k: v.numpy() for k, v in model.state_dict().items()})
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(_NO_TORCH)
    (tmp_path / "federation.py").write_text(_FEDERATION % BACKEND)
    pids = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": f"{block}{os.pathsep}{APP}", "NO_TORCH_PIDS": str(pids)}
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "federation.py"), str(tmp_path / "plan.onnx"), str(tmp_path / "weights.npz")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torch"] is False
    assert len(set(pids.read_text().split())) >= 2  # the driver and the engine's client workers all blocked
    assert sorted(report["train"]) == ["1", "2"] and sorted(report["evaluate"]) == ["1", "2"]
    assert report["evaluate"]["2"]["loss"] < report["evaluate"]["1"]["loss"] < 2.3
    assert set(report["evaluate"]["2"]) == {"loss", "accuracy"}


def test_the_client_app_imports_no_heavy_library() -> None:
    """What a client process loads is what its memory costs: flwr, onnxruntime, numpy and planwire's
    transport, not torch, nor SciPy or scikit-learn (the example reads the digits' bundled file itself)."""
    code = (
        "import sys; from planwire_digits.client_app import app; "
        "print(sorted(m for m in ('torch', 'scipy', 'sklearn', 'pandas', 'ray', 'onnx') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(APP)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
