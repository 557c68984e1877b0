"""Bound plans (outputs that replace inputs on the next call) driven by the plan's own metadata: a training
plan saved to a file trains on a real plan-worker from a process that never imports torch, step for step
as the exporter's TrainingPointer trains it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import planwire as sy
from planwire.transport import connect
from planwire.transport import messages as m
from planwire.transport.bound import BoundPlan, BoundPointer, hyper_array
from planwire.transport.spec import PlanVariant
from planwire.worker import VirtualWorker
from planwire.worker.process import WorkerProcess
from tests.test_trainer import batches, small_cnn

LRS = (None, 0.2, None)  # the middle step overrides the learning rate

# Run in a fresh interpreter: load the file, train on the worker, report losses and weights, and whether
# torch was ever imported.
TORCH_FREE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import planwire
    from planwire.transport import connect

    plan_file, state_file, data_file, url, out = sys.argv[1:]
    plan = planwire.load_plan(plan_file)
    data = np.load(data_file)
    lrs = json.loads(data["lrs"].item())
    with connect(url, timeout=20) as worker:
        ptr = plan.send(worker, state=dict(np.load(state_file)))
        losses, accuracies = [], []
        for i, lr in enumerate(lrs):
            x = worker.put(data[f"x{i}"]) if i == 0 else data[f"x{i}"]  # a pointer, then local arrays
            loss, acc = ptr(x, data[f"y{i}"]) if lr is None else ptr(x, data[f"y{i}"], lr=lr)
            losses.append(float(loss.get()))
            accuracies.append(float(acc.get()))
        np.savez(out, **ptr.state_dict())
    print(json.dumps({"losses": losses, "accuracies": accuracies, "torch": "torch" in sys.modules,
                      "pointer": type(ptr).__name__}))
    """
)


@pytest.fixture(scope="module")
def cnn_plan():
    return sy.training_plan(
        small_cnn(),
        F.cross_entropy,
        sy.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
        args_shape=[(-1, 1, 8, 8), (-1,)],
        args_dtypes=[torch.float32, torch.int64],
        metrics=("accuracy",),
    )


def test_the_bound_plan_read_from_metadata_is_the_built_step(cnn_plan):
    bound, step = cnn_plan.bound, cnn_plan.step
    assert dict(bound.bindings) == step.bindings
    assert {k: float(v) for k, v in bound.hyper.items()} == {k: float(v) for k, v in step.hyper.items()}
    assert [s.name for s in bound.args] == list(step.args)
    assert [s.name for s in bound.state] == [*step.params, *step.frozen, *step.buffers, *step.optim]
    assert bound.targets == 1


def test_a_saved_training_plan_trains_without_torch_like_the_exporter_driven_one(cnn_plan, tmp_path: Path):
    plan_file = cnn_plan.save(tmp_path / "step.onnx")
    np.savez(tmp_path / "state.npz", **cnn_plan.step.state)
    data = batches([3, 7, 5], seed=5)
    arrays = {f"x{i}": x.numpy() for i, (x, _) in enumerate(data)}
    arrays.update({f"y{i}": y.numpy() for i, (_, y) in enumerate(data)})
    np.savez(tmp_path / "data.npz", lrs=np.array(json.dumps(LRS)), **arrays)
    proc = WorkerProcess("bound")
    try:
        with connect(proc.url, timeout=20) as worker:  # the exporter-driven run, on the same worker
            ptr = cnn_plan.send(worker)
            losses, accuracies = [], []
            for (x, y), lr in zip(data, LRS, strict=True):
                loss, acc = ptr(x, y) if lr is None else ptr(x, y, lr=lr)
                losses.append(loss.get().item())
                accuracies.append(acc.get().item())
            expect = ptr.state_dict()
        done = subprocess.run(
            [sys.executable, "-c", TORCH_FREE, plan_file, tmp_path / "state.npz", tmp_path / "data.npz", proc.url]
            + [tmp_path / "trained.npz"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proc.stop()
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["torch"] is False
    assert report["pointer"] == "BoundPointer"
    assert report["losses"] == pytest.approx(losses, rel=1e-6)
    assert report["accuracies"] == pytest.approx(accuracies, abs=1e-6)
    assert losses[1] != pytest.approx(losses[0])  # the steps trained (not one loss repeated)
    trained = np.load(tmp_path / "trained.npz")
    assert sorted(trained.files) == sorted(expect)
    for name, value in expect.items():
        np.testing.assert_allclose(trained[name], value.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_loaded_training_plan_needs_its_state_and_says_which(cnn_plan, tmp_path: Path):
    loaded = sy.load_plan(cnn_plan.save(tmp_path / "step.onnx"))
    assert loaded.bound is not None and loaded.kind == "training"
    with VirtualWorker(None, id="w") as worker:
        with pytest.raises(TypeError, match=r"send\(worker, state=\{\.\.\.\}\).*param\.0\.weight"):
            loaded.send(worker)
        weights = {k: v for k, v in cnn_plan.step.state.items() if not k.startswith("optim.")}
        with pytest.raises(KeyError, match=r"missing \['param\.5\.weight'\]"):
            loaded.send(worker, state={k: v for k, v in weights.items() if k != "param.5.weight"})
        with pytest.raises(ValueError, match=r"5\.weight: got float32\[3, 3\]"):
            loaded.send(worker, state={**weights, "5.weight": np.zeros((3, 3), np.float32)})
        # module paths work as keys, and the optimizer state starts at zeros
        by_path = {k.partition(".")[2]: v for k, v in weights.items()}
        ptr = loaded.send(worker, state=by_path)
        assert isinstance(ptr, BoundPointer)
        momentum = ptr.state_arrays([n for n in ptr.keys if n.startswith("optim.")])
        assert momentum and all(not a.any() for a in momentum.values())
        with pytest.raises(TypeError, match=r"targets argument 1 \('arg1'\): expected dtype int64"):
            ptr(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.float32))


def test_a_binding_to_an_argument_is_refused(cnn_plan):
    props = {p.key: p.value for p in cnn_plan.step.model.metadata_props}
    outputs = json.loads(props["planwire.outputs"])
    outputs[-1]["binds"] = "arg0"
    props["planwire.outputs"] = json.dumps(outputs)
    with pytest.raises(ValueError, match=r"binds 'arg0', which is not a state input"):
        BoundPlan.from_metadata(cnn_plan.step.variant, props)


def _with_int_lr(cnn_plan, lr) -> tuple:
    """The plan's variant with ``hyper.lr`` declared int64 and ``lr``'s default in the metadata (JSON text)."""
    props = {p.key: p.value for p in cnn_plan.step.model.metadata_props}
    props["planwire.training"] = props["planwire.training"].replace('"lr": 0.05', f'"lr": {lr}')
    variant = cnn_plan.step.variant
    inputs = tuple(replace(s, dtype="int64") if s.name == "hyper.lr" else s for s in variant.inputs)
    return PlanVariant(variant.data, inputs, variant.outputs), props


@pytest.mark.parametrize("lr", ["Infinity", "-Infinity", "NaN", "1e300", "9223372036854775808", "0.5"])
def test_a_hyper_default_its_dtype_cannot_hold_is_refused_naming_it(cnn_plan, lr):
    variant, props = _with_int_lr(cnn_plan, lr)
    assert lr in props["planwire.training"]
    with pytest.raises(
        ValueError, match=r"default of hyper-parameter 'hyper\.lr' is .*a whole number in int64's range"
    ):
        BoundPlan.from_metadata(variant, props)


def test_a_hyper_default_its_dtype_holds_is_kept_and_overrides_are_checked_alike(cnn_plan):
    variant, props = _with_int_lr(cnn_plan, "3.0")
    bound = BoundPlan.from_metadata(variant, props)
    assert bound.hyper["hyper.lr"].dtype == np.int64 and bound.hyper["hyper.lr"].item() == 3
    spec = next(s for s in bound.variant.inputs if s.name == "hyper.lr")
    assert hyper_array(spec, 9223372036854775807).item() == 9223372036854775807
    with pytest.raises(ValueError, match=r"'hyper\.lr' is inf: it takes a whole number in int64's range"):
        hyper_array(spec, float("inf"))
    momentum = next(s for s in bound.variant.inputs if s.name == "hyper.momentum")
    assert hyper_array(momentum, 0.5).item() == 0.5
    assert momentum.dtype == "double"  # as PROTOCOL.md §7.2 declares hyper-parameters
    with pytest.raises(ValueError, match=r"'hyper\.momentum' is nan: it takes a finite float64"):
        hyper_array(momentum, float("nan"))
    with pytest.raises(ValueError, match=r"'hyper\.momentum' is 'fast': it takes a finite float64"):
        hyper_array(momentum, "fast")
    for no_number in (True, np.bool_(False), "0.5", None, [0.5]):  # a bool is not 1.0, a string not its number
        with pytest.raises(ValueError, match=r"'hyper\.momentum' is .*: it takes a finite float64"):
            hyper_array(momentum, no_number)
    assert hyper_array(momentum, np.array(0.25)).item() == 0.25 and hyper_array(momentum, np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match=r"'hyper\.lr' is True: it takes a whole number"):
        hyper_array(spec, True)


@pytest.mark.parametrize("targets", ['"x"', "-1", "3", "1.5", "true", "null"])
def test_a_targets_count_that_is_not_one_of_the_arguments_is_refused(cnn_plan, targets):
    props = {p.key: p.value for p in cnn_plan.step.model.metadata_props}
    training = json.loads(props["planwire.training"])
    assert training["targets"] == 1
    props["planwire.training"] = props["planwire.training"].replace('"targets": 1', f'"targets": {targets}')
    assert f'"targets": {targets}' in props["planwire.training"]
    with pytest.raises(ValueError, match=r'"targets" must count .* \(a whole number from 0 to 2\), not '):
        BoundPlan.from_metadata(cnn_plan.step.variant, props)


def test_a_step_sends_its_arguments_and_names_the_state_by_its_keys(cnn_plan):
    """What a step puts on the wire (real runs the worker answers): its batch, the state and stored
    hyper-parameters by key, the bound outputs to the state's keys, fresh keys for the reported outputs
    only (fetched with the reply); an override goes inline. A parameter moved off the worker with .get()
    stops the next step before it is sent."""
    with VirtualWorker(None, id="wire") as worker:
        ptr = cnn_plan.send(worker)
        sent: list[bytes] = []
        send = worker.connection._send
        worker.connection._send = lambda frames: (sent.append(bytes(frames[1])), send(frames))[1]
        (x, y), (x2, y2) = batches([4, 3], seed=3)
        xp = worker.put(x)
        steps = [ptr(xp, y), ptr(x2, y2, lr=0.2)]
        losses = [float(loss.get()) for loss, _ in steps]
        first, second = (m.request_decoder.decode(h) for h in sent if h.startswith(b'{"type":"run",'))
        inputs, bound = cnn_plan.step.variant.inputs, cnn_plan.bound
        stored = {s.name: m.Arg(ref=ptr.keys[s.name]) for s in bound.state}
        stored.update({n: m.Arg(ref=ptr._hyper_keys[n]) for n in bound.hyper})
        assert [s.name for s in inputs[:2]] == ["arg0", "arg1"]
        batch = [m.Arg(ref=xp.key), m.Arg(tensor=m.Tensor(dtype="int64", shape=[4], frame=0))]
        assert first.args == batch + [stored[s.name] for s in inputs[2:]]
        lr = [s.name for s in inputs].index("hyper.lr")
        assert second.args[lr] == m.Arg(tensor=m.Tensor(dtype="double", shape=[], frame=2))  # after x2, y2
        assert second.args[2:lr] + second.args[lr + 1 :] == first.args[2:lr] + first.args[lr + 1 :]
        outputs = cnn_plan.step.variant.outputs
        assert [o.name in bound.bindings for o in outputs[:2]] == [False, False]  # the loss, the accuracy
        assert first.fetch == [0, 1] and first.inline_max == 0
        assert first.outputs[:2] == [p.key for p in steps[0]] and second.outputs[:2] == [p.key for p in steps[1]]
        assert first.outputs[2:] == second.outputs[2:] == [ptr.keys[bound.bindings[o.name]] for o in outputs[2:]]
        assert losses[0] > 0 and losses[1] > 0
        ptr.parameters()[0].get()  # moves the weight off the worker
        with pytest.raises(TypeError, match="unknown hyper-parameters"):  # the call's own fault is named first
            ptr(xp, y, bogus=3.0)
        with pytest.raises(ValueError, match="already fetched"):
            ptr(xp, y)
        assert sum(h.startswith(b'{"type":"run",') for h in sent) == 2
