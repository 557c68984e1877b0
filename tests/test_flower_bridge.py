"""The Flower bridge under the worker's trust model, against real plan-worker processes (tcp, CURVE).

A bridged node's training runs on a plan-worker whose data is private: the trained weights come back
only as the data owner's policy releases them (an update, clipped by the worker here), the bridge adds
the update to the weights it pushed, and the result is the same training as on a worker that serves its
data publicly. Without a rule, or with a rule that does not release the weights, the bridge refuses with
a message naming the rule to add, and nothing is released. With CURVE, the node's keys come from its
node config.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="planwire[flower] is not installed")
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

import planwire as sy
from planwire.flower import PlanPorts, PlanRefused, arrays_to_state, fingerprint
from planwire.flower.bridge import bridge_evaluate, bridge_train
from planwire.flower.server import BYTES_KEY, PLAN_RECORD, SHA_KEY
from planwire.transport import CurveRefused
from planwire.worker.process import WorkerProcess
from planwire.worker.review import policy_snippet, review

CONF = {"lr": 0.05, "local-epochs": 2, "seed": 3, "server-round": 1}
BATCH, BATCHES = 16, 4


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, bytes]:
    """y = Wx + b, MSE, SGD with momentum: a training plan with param and optimizer state."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    plan = sy.training_plan(model, F.mse_loss, sy.optim.SGD(lr=0.05, momentum=0.9), args_shape=[(-1, 3), (-1, 2)])
    return model, plan.step.variant.data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan-worker data file: BATCHES batches of BATCH rows tagged x.<b> and y.<b>."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH * BATCHES, 3)).astype(np.float32)
    y = (x @ np.float32([[1, -2, 0.5], [0.3, 0, 1]]).T + 0.1).astype(np.float32)
    path = tmp_path_factory.mktemp("bridge") / "node.npz"
    np.savez(
        path, **{f"{t}.{b}": a[b * BATCH : (b + 1) * BATCH] for b in range(BATCHES) for t, a in (("x", x), ("y", y))}
    )
    return path


@pytest.fixture(autouse=True)
def clientapp_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ClientApp runtime sets in its process before calling the app (messages need it)."""
    for field, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 5)):
        monkeypatch.setattr(TaskIdentity, field, value)


def message(model: nn.Module, plan: bytes, kind: str = "train") -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "config": ConfigRecord(dict(CONF)),
            PLAN_RECORD: ConfigRecord({SHA_KEY: fingerprint(plan), BYTES_KEY: plan}),
        }
    )
    return Message(content=content, dst_node_id=5, message_type=kind)


def node(url: str, **more: object) -> Context:
    config = {"planwire-worker": url, "planwire-x-tag": "x", "planwire-y-tag": "y", **more}
    return Context(run_id=1, node_id=5, node_config=config, state=RecordDict(), run_config={})


def owner(
    tmp_path: Path, data: Path, policy: str | None, name: str = "owner", extra: tuple[str, ...] = ()
) -> WorkerProcess:
    """A plan-worker holding ``data`` privately, with ``policy`` (TOML) and an audit log."""
    args = ["--audit", str(tmp_path / f"{name}.jsonl"), "--plans-dir", str(tmp_path / "plans"), *extra]
    if policy is not None:
        (tmp_path / f"{name}.toml").write_text(policy)
        args += ["--policy", str(tmp_path / f"{name}.toml")]
    return WorkerProcess(name, data=[str(data)], extra=args)


def events(tmp_path: Path, name: str = "owner") -> list[dict]:
    path = tmp_path / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trained(reply: Message, plan: bytes) -> dict[str, np.ndarray]:
    assert not reply.has_error()
    return arrays_to_state(PlanPorts.check(plan), reply.content["arrays"])


def test_released_updates_give_the_same_training_as_a_public_worker(linear, data: Path, tmp_path: Path) -> None:
    model, plan = linear
    pushed = arrays_to_state(PlanPorts.check(plan), ArrayRecord(model.state_dict()))
    with WorkerProcess("public", data=[str(data)], extra=["--public"]) as public:
        expected = bridge_train(message(model, plan), node(public.url))
    rule = policy_snippet(review(plan)) + 'inputs."hyper.lr" = { min = 0.0, max = 0.1 }\n'
    with owner(tmp_path, data, rule) as worker:
        got = bridge_train(message(model, plan), node(worker.url))
        evaluated = bridge_evaluate(message(model, plan, "evaluate"), node(worker.url))
    new, want = trained(got, plan), trained(expected, plan)
    for name in want:  # pushed + (new - pushed), in float64 and back: the same weights up to rounding
        np.testing.assert_allclose(new[name], want[name], rtol=1e-5, atol=1e-6)
        assert not np.allclose(new[name], pushed[name])  # it trained
    metrics = dict(got.content["metrics"])
    assert metrics["num-examples"] == BATCH * BATCHES
    assert metrics["loss"] == pytest.approx(dict(expected.content["metrics"])["loss"], rel=1e-5)
    assert set(dict(evaluated.content["metrics"])) == {"loss", "num-examples"}
    log = events(tmp_path)
    weights = {o for o, i in PlanPorts.check(plan).bindings.items() if i.startswith("param.")}
    assert {o for e in log if e["event"] == "released" for o in e["outputs"]} == {"loss", *weights}
    assert not [e for e in log if e["event"] == "refused"]  # optimizer state never asked for


def test_the_worker_clips_the_update_the_bridge_returns(linear, data: Path, tmp_path: Path) -> None:
    model, plan = linear
    pushed = arrays_to_state(PlanPorts.check(plan), ArrayRecord(model.state_dict()))
    rule = policy_snippet(review(plan)) + "update = { clip_norm = 0.01 }\n"
    with owner(tmp_path, data, rule) as worker:
        new = trained(bridge_train(message(model, plan), node(worker.url)), plan)
    for name, w0 in pushed.items():
        assert np.linalg.norm(new[name].astype(np.float64) - w0) == pytest.approx(0.01, rel=1e-3)


def test_without_a_rule_the_round_fails_naming_it_and_nothing_leaves(linear, data: Path, tmp_path: Path) -> None:
    model, plan = linear
    fp = fingerprint(plan)
    other = policy_snippet(review(plan)).replace(fp, "0" * 64)  # approves some other plan
    with owner(tmp_path, data, other) as worker:
        with pytest.raises(PlanRefused) as info:
            bridge_train(message(model, plan), node(worker.url))
        with pytest.raises(PlanRefused, match=r'add outputs."loss" = "as_is" for each metric'):
            bridge_evaluate(message(model, plan, "evaluate"), node(worker.url))
    text = str(info.value)
    assert "plan-worker 'owner' keeps the weights that plan 'train_Linear' trains on its data" in text
    assert f'has no rule for this plan (fingerprint = "{fp}")' in text
    assert 'add outputs."new.param.weight" = { update = "param.weight" }' in text
    assert "Nothing left the worker." in text
    assert not [e for e in events(tmp_path) if e["event"] == "released"]

    # A rule that releases the loss but not the weights: the outputs it lacks are named.
    loss_only = "\n".join(line for line in policy_snippet(review(plan)).splitlines() if "update =" not in line)
    with owner(tmp_path, data, loss_only, "partial") as worker, pytest.raises(PlanRefused) as info:
        bridge_train(message(model, plan), node(worker.url))
    assert "rule for this plan does not release ['new.param.weight', 'new.param.bias']" in str(info.value)
    assert not [e for e in events(tmp_path, "partial") if e["event"] == "released"]


def test_curve_keys_come_from_the_node_config(linear, data: Path, tmp_path: Path) -> None:
    model, plan = linear
    keys = tmp_path / "keys"
    script = [sys.executable, "-m", "planwire.worker", "keys"]
    for args in ([str(keys)], [str(keys / "clients"), "--name", "node"], [str(tmp_path / "other"), "--name", "eve"]):
        assert subprocess.run([*script, *args], capture_output=True, timeout=60).returncode == 0
    curve = ("--curve-secret", str(keys / "worker.key_secret"), "--curve-clients", str(keys / "clients"))
    rule = policy_snippet(review(plan))
    with owner(tmp_path, data, rule, extra=curve) as worker:
        assert "curve listed clients" in worker.log()
        ok = node(
            worker.url,
            **{
                "planwire-curve-secret": str(keys / "clients" / "node.key_secret"),
                "planwire-curve-server": str(keys / "worker.key"),
            },
        )
        assert dict(bridge_train(message(model, plan), ok).content["metrics"])["num-examples"] == BATCH * BATCHES
        eve = node(
            worker.url,
            **{
                "planwire-curve-secret": str(tmp_path / "other" / "eve.key_secret"),
                "planwire-curve-server": str(keys / "worker.key"),
            },
        )
        with pytest.raises(CurveRefused):
            bridge_train(message(model, plan), eve)
        with pytest.raises(ValueError, match="node config planwire-curve-server is missing"):
            bridge_train(message(model, plan), node(worker.url, **{"planwire-curve-secret": "x.key_secret"}))
        with pytest.raises(ValueError, match="no such file"):
            bridge_train(
                message(model, plan),
                node(worker.url, **{"planwire-curve-secret": str(tmp_path / "nope"), "planwire-curve-server": "x"}),
            )
