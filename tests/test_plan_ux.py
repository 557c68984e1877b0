"""Small traps a new user falls into: printing a plan, a batch size fixed without notice, saving a training
plan, loading a plan where torch is not installed, silent long builds, and the federated example's history."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planwire as sy
from planwire.exporter import FixedShapeWarning, LoadedPlan, progress
from planwire.exporter.summary import human_bytes, read_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PLANWIRE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PLANWIRE_PROGRESS", raising=False)
    yield


# -- repr is a bounded summary --------------------------------------------------------------------------


class Big(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1000, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).relu()


def test_repr_of_a_million_parameter_plan_is_one_short_line() -> None:
    plan = Big()
    plan.build(torch.randn(2, 1000), dynamic_axes=[[0]], progress=False)
    text = repr(plan)
    assert str(plan) == text and "\n" not in text and len(text) < 200, text
    size = human_bytes(len(plan.variants[0].data))
    assert text == (
        f"<Big Big id:{plan.id} built (x: float32[?, 1000]) -> (output: float32[?, 1000]); "
        f"1,001,000 parameters, {size}>"
    )
    assert size.endswith(" MiB") and plan.parameter_count == 1_001_000
    assert len(plan.code) > 1_000_000  # the graph with its weights is still there, on request


def test_training_plan_repr_lists_the_batch_and_counts_the_state() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    step = sy.training_plan(
        model, F.cross_entropy, sy.optim.SGD(lr=0.1), args_shape=[(-1, 4), (-1,)], metrics=("accuracy",)
    )
    text = repr(step)
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert step.parameter_count == params == 4 * 8 + 8 + 8 + 8 + 8 + 8 + 1 + 8 * 3 + 3
    assert text.startswith(f"<TrainingPlan train_Sequential id:{step.step.variant.id[:12]} built (arg0: float32[?, 4]")
    assert (
        "(arg0: float32[?, 4], arg1: int64[?], hyper.lr: float64[], hyper.weight_decay: float64[], +9 state) -> "
        "(loss: float32[], metric.accuracy: float32[], +9 state)"  # 6 parameters, 3 batch-norm buffers
    ) in text
    assert text.endswith(f"; {params:,} parameters, {human_bytes(len(step.step.variant.data))}>")
    assert str(step) == text and len(text) < 300


def test_unbuilt_plan_repr() -> None:
    assert repr(Big()) == "<Big Big not built>" and Big().parameter_count == 0


# -- a fixed batch size is said once ----------------------------------------------------------------------


def test_build_without_dynamic_axes_warns_once_how_to_free_the_batch() -> None:
    @sy.func2plan()
    def scale(x, y):
        return x * 2 + y

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scale.build(torch.ones(4, 3), torch.ones(3), progress=False)
        scale.build(torch.ones(5, 3), torch.ones(3), progress=False)
    fixed = [w for w in caught if issubclass(w.category, FixedShapeWarning)]
    assert len(fixed) == 1, [str(w.message) for w in caught]
    assert fixed[0].filename == __file__  # points at the user's build() call
    assert str(fixed[0].message) == (
        "plan 'scale' is built for these sizes only (x: float32[4, 3], y: float32[3]): its saved .onnx and its "
        "graph on workers accept no other batch size. To free the batch axis: build(..., dynamic_axes=[[0], [0]]) "
        "(the free axes of each argument), or args_shape with -1 for them."
    )

    @sy.func2plan(args_shape=[(2, 3)])  # sizes the user wrote down: nothing to say
    def declared(x):
        return x + 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        declared.build(torch.ones(4, 3), dynamic_axes=[[0]], progress=False)
        scale.build(torch.ones(4, 3), torch.ones(3), dynamic_axes=[[0], []], progress=False)
    assert not [w for w in caught if issubclass(w.category, FixedShapeWarning)]
    assert declared.variants[0].inputs[0].shape[0] != 4  # dynamic now


# -- saving and loading, with and without torch -------------------------------------------------------


def small_step() -> sy.TrainingPlan:  # type: ignore[name-defined]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return sy.training_plan(
        model, F.cross_entropy, sy.optim.SGD(lr=0.1), args_shape=[(-1, 4), (-1,)], metrics=("accuracy",)
    )


def test_training_plan_save_and_load_round_trip(tmp_path: Path) -> None:
    step = small_step()
    path = step.save(tmp_path / "step.onnx")
    assert path.read_bytes() == step.step.variant.data
    loaded = sy.load_plan(path)
    assert isinstance(loaded, LoadedPlan) and loaded.kind == "training" and loaded.name == "train_Sequential"
    assert loaded.variants[0].inputs == step.step.variant.inputs
    assert [o.role for o in loaded.variants[0].outputs][:2] == ["loss", "metric"]
    assert (
        loaded.parameter_count == step.parameter_count
        and repr(loaded)[len("<LoadedPlan") :] == repr(step)[len("<TrainingPlan") :]
    )
    # the saved step runs as a plain ONNX model: same loss as the built one
    rng = np.random.default_rng(0)
    batch = [rng.standard_normal((7, 4)).astype(np.float32), rng.integers(0, 3, 7)]
    feeds = step.step.feeds(batch)
    want = ort.InferenceSession(step.step.variant.data).run(["loss"], feeds)[0]
    got = loaded(*[feeds[s.name] for s in loaded.variants[0].inputs])
    assert np.allclose(np.asarray(got[0]), want) and np.isfinite(want)


WORKER_ONLY = textwrap.dedent(
    """
    import json, sys

    class NoTorch:  # a worker-only install: neither torch nor the onnx package can be imported
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torch", "onnx", "onnxscript"):
                raise ImportError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoTorch())
    sys.modules["torch"] = None
    import numpy as np
    import planwire

    plan = planwire.load_plan(sys.argv[1])
    step = planwire.load_plan(sys.argv[2])
    out = plan(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32))
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "onnx") and sys.modules[m])
    print(json.dumps({
        "repr": repr(plan), "step": repr(step), "kind": step.kind, "out": out.tolist(),
        "type": type(out).__name__, "signature": plan.signature(), "leaked": leaked,
    }))
    try:
        plan.code
    except ImportError as e:
        print(e)
    """
)


def test_load_plan_and_inspect_with_onnxruntime_alone(tmp_path: Path) -> None:
    @sy.func2plan(args_shape=[(-1, 3)], state=(torch.tensor([1.0, 10.0, 100.0]),))
    def affine(x, state):
        return x * state.read()[0]

    plan_path = affine.save(tmp_path / "affine.onnx")
    step_path = small_step().save(tmp_path / "step.onnx")
    script = tmp_path / "worker_only.py"
    script.write_text(WORKER_ONLY)
    # run outside the checkout, as on a device: only the installed package is importable
    out = subprocess.run(
        [sys.executable, str(script), str(plan_path), str(step_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.splitlines()[:2]
    report = json.loads(first)
    assert report["leaked"] == [] and report["type"] == "ndarray"
    assert report["out"] == [[1.0, 20.0, 300.0], [4.0, 50.0, 600.0]]
    assert report["repr"].startswith("<LoadedPlan affine id:" + affine.id + " built (x: float32[?, 3])")
    assert (
        "; 3 parameters, " in report["repr"] and report["signature"] == "(x: float32[?, 3]) -> (output: float32[?, 3])"
    )
    assert report["kind"] == "training" and report["step"].startswith("<LoadedPlan train_Sequential id:")
    assert second.startswith("plan.code prints the graph with the onnx package") and "pip install onnx" in second


def test_read_model_reads_metadata_and_state_sizes_without_onnx() -> None:
    @sy.func2plan(args_shape=[(-1, 2)], state=(torch.ones(2, 5), torch.ones(7)))
    def with_state(x, state):
        w, b = state.read()
        return x @ w + b.sum()

    facts = read_model(with_state.variants[0].data)
    assert facts.metadata["planwire.name"] == "with_state"
    assert facts.initializers == {"state.0": 10, "state.1": 7}
    assert facts.state_size() == with_state.parameter_count == 17
    with pytest.raises(ValueError, match="malformed ONNX model"):
        read_model(b"\x3a\xff\xff\xff\xff\x0f")  # graph field claiming 4 GiB


# -- build progress ---------------------------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_when_not_a_tty(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)  # every build counts as long

    @sy.func2plan()
    def triple_plus(x):
        return x * 3 + 1

    triple_plus.build(torch.ones(2, 3), dynamic_axes=[[0]])
    lines = [line.rsplit(" (", 1)[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "planwire: building plan 'triple_plus' (trace, export, verify): trace",
        "planwire: building plan 'triple_plus': export",
        "planwire: building plan 'triple_plus': verify",
        "planwire: built plan 'triple_plus'",
    ]
    triple_plus.build(torch.ones(2, 3), dynamic_axes=[[0]])  # served by the cache: no progress at all
    assert capsys.readouterr().err == ""


def test_training_plan_build_shows_its_stages(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))  # a graph no other test exports
    sy.training_plan(model, F.cross_entropy, sy.optim.Adam(lr=0.01), args_shape=[(-1, 5), (-1,)], name="stages")
    lines = [line.rsplit(" (", 1)[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "planwire: building plan 'stages' (trace, export, verify): trace",
        "planwire: building plan 'stages': export",
        "planwire: building plan 'stages': verify",
        "planwire: built plan 'stages'",
    ]


@pytest.mark.parametrize("how", ["env", "argument"])
def test_progress_can_be_turned_off(
    how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)
    if how == "env":
        monkeypatch.setenv("PLANWIRE_PROGRESS", "0")

    @sy.func2plan(progress=False if how == "argument" else None)
    def quiet(x):
        return x - 7

    quiet.build(torch.ones(2, 3), dynamic_axes=[[0]])
    assert capsys.readouterr().err == "" and quiet.is_built


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.0)
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with progress.building("demo"):
        progress.stage("export")
        progress.stage("verify")
    screen = tty.getvalue().split("\r")[-1]
    assert screen.startswith("building plan 'demo': ") and "3/3, done [" in screen and screen.endswith("\n")
    with pytest.raises(RuntimeError), progress.building("broken"):
        progress.stage("export")
        raise RuntimeError("boom")
    assert "1/3, failed during export [" in tty.getvalue().split("\r")[-1]


def test_progress_appears_once_a_build_outlasts_the_delay(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress, "DELAY", 0.05)
    with progress.building("slow"):
        build = progress._current.get()
        assert build is not None and not build.shown  # nothing printed at the start
        for _ in range(1000):  # the watcher thread shows it once the delay has passed
            if build.shown:
                break
            threading.Event().wait(0.01)
        progress.stage("verify")
    lines = [line.rsplit(" (", 1)[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == [
        "planwire: building plan 'slow' (trace, export, verify): trace",
        "planwire: building plan 'slow': verify",
        "planwire: built plan 'slow'",
    ]


def test_progress_waits_for_the_delay(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "DELAY", 3600.0)
    with progress.building("fast"):
        progress.stage("export")
    assert capsys.readouterr().err == ""


# -- the federated example's history and plot ------------------------------------------------------------


def federated_module():
    spec = importlib.util.spec_from_file_location("federated_example", ROOT / "examples" / "federated.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_round_loss_is_the_example_weighted_mean_of_its_batches(tmp_path: Path) -> None:
    fed = federated_module()
    history = fed.History()
    history.add([2.0, 1.0, 0.5], [0.25, 0.5, 1.0], [32, 32, 16], held_out=0.5)
    history.add([0.4], [0.9], [10], held_out=0.93)
    assert history.loss == [pytest.approx((2.0 * 32 + 1.0 * 32 + 0.5 * 16) / 80), pytest.approx(0.4)]
    assert history.accuracy == [pytest.approx((0.25 * 32 + 0.5 * 32 + 1.0 * 16) / 80), pytest.approx(0.9)]
    assert history.held_out == [0.5, 0.93]

    path = fed.plot(history, tmp_path / "plots" / "fed.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (990, 396)  # 9 x 3.6 inches at 110 dpi


def test_federated_arguments_are_checked() -> None:
    fed = federated_module()
    with pytest.raises(SystemExit):
        fed.parse(["--plot", "history.pdf"])
    with pytest.raises(SystemExit):
        fed.parse(["--rounds", "0"])
    args = fed.parse(["--plot", "out.png", "--rounds", "2", "--no-progress", "--min-accuracy", "0"])
    assert (args.plot, args.rounds, args.no_progress, args.min_accuracy) == (Path("out.png"), 2, True, 0.0)
