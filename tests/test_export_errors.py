"""Export mistakes a new user makes get one short message: their source line, the layer, the fix.

Every message here is asserted line by line; torch's own trace stays reachable as ``__cause__``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planwire as sy
from planwire.exporter import PlanBuildError
from planwire.exporter.diagnose import chain
from planwire.exporter.errors import TrainingExportError


@pytest.fixture(autouse=True)
def no_disk_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PLANWIRE_CACHE_DIR", "")
    monkeypatch.setenv("PLANWIRE_PROGRESS", "0")
    yield


def line_of(fn: Callable[..., object], text: str) -> int:
    """Line number in this file of the line of ``fn`` that contains ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


HERE = f"tests/{Path(__file__).name}"


def branchy(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:
        return x * 2
    return x - 1


def test_data_dependent_branch_names_the_line_and_the_fix(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(PlanBuildError) as err:
        sy.func2plan(args_shape=[(-1, 3)])(branchy)
    lines = str(err.value).splitlines()
    n = line_of(branchy, "if x.sum() > 0:")
    assert lines[0] == (
        f"plan 'branchy' could not be exported to ONNX: data-dependent control flow at {HERE}:{n}: if x.sum() > 0:"
    )
    assert "torch.where(cond, a, b)" in lines[2] and "torch.cond(pred, true_fn, false_fn, (x,))" in lines[2]
    assert lines[-1] == "The exporter's full error is chained as __cause__." and len(lines) == 4
    assert err.value.plan == "branchy" and err.value.op is None
    # the whole torch story is kept, down to the guard that failed
    assert err.value.__cause__ is not None
    assert any(type(e).__name__ == "GuardOnDataDependentSymNode" for e in chain(err.value))
    # and torch's partial-graph dumps and guard warnings no longer flood stderr
    assert "def forward" not in capfd.readouterr().err


class Eigen(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.T)[0]


class WithEigen(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.block = nn.Sequential(nn.ReLU(), Eigen())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.fc(x))


def test_unsupported_op_names_the_op_the_layer_and_the_line() -> None:
    plan = WithEigen()
    with pytest.raises(PlanBuildError) as err:
        plan.build(torch.randn(3, 3), dynamic_axes=[[]])
    lines = str(err.value).splitlines()
    n = line_of(Eigen.forward, "torch.linalg.eigh")
    assert lines == [
        "plan 'WithEigen' could not be exported to ONNX at op aten._linalg_eigh.default: it has no ONNX translation",
        f"  in layer block.1 (Eigen), at {HERE}:{n}: return torch.linalg.eigh(x @ x.T)[0]",
        "  fix: compute this with other torch ops, or register an ONNX translation for the op "
        "(torch.onnx.export's custom_translation_table).",
        "The exporter's full error is chained as __cause__.",
    ]
    assert err.value.op == "aten._linalg_eigh.default"
    assert isinstance(err.value.__cause__, torch.onnx.OnnxExporterError)
    assert not plan.is_built


class BranchyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.fc(x)
        return -self.fc(x)


def test_training_plan_with_a_data_dependent_branch_names_the_line() -> None:
    with pytest.raises(TrainingExportError) as err:
        sy.training_plan(BranchyNet(), F.cross_entropy, sy.optim.SGD(lr=0.1), args_shape=[(-1, 4), (-1,)])
    lines = str(err.value).splitlines()
    n = line_of(BranchyNet.forward, "if x.mean() > 0:")
    assert lines[0] == (
        "plan 'train_BranchyNet' could not be traced in <root> (BranchyNet): data-dependent control flow "
        f"at {HERE}:{n}: if x.mean() > 0:"
    )
    assert "torch.where" in lines[2] and err.value.__cause__ is not None


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_training_plan_needs_args_shape() -> None:
    with pytest.raises(TypeError) as err:
        sy.training_plan(small(), F.cross_entropy, sy.optim.SGD(lr=0.1))
    message = str(err.value)
    assert message.startswith("training plan 'train_Sequential' needs args_shape: one shape per batch argument")
    assert "args_shape=[(-1, 1, 28, 28), (-1,)]" in message and "examples=(x, y)" in message
    with pytest.raises(TypeError, match="args_shape/args_dtypes or examples, not both"):
        sy.training_plan(small(), args_shape=[(-1, 4), (-1,)], examples=(torch.ones(2, 4), torch.zeros(2)))


@pytest.mark.parametrize(
    ("optimizer", "advice"),
    [
        (
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
            "optimizer=torch.optim.SGD: a training plan runs the optimizer inside its ONNX graph, so it takes a "
            "functional optimizer from planwire.optim (no model.parameters()): use "
            "planwire.optim.SGD(lr=0.05, momentum=0.9)",
        ),
        (lambda m: torch.optim.Adam, "use planwire.optim.Adam(lr=0.001)"),
        (
            lambda m: torch.optim.AdamW(m.parameters(), lr=0.01),
            "use planwire.optim.Adam(lr=0.01, weight_decay=0.01, decoupled_weight_decay=True)",
        ),
        (lambda m: torch.optim.RMSprop(m.parameters()), "use one of planwire.optim's optimizers (SGD, Adam)"),
        (
            lambda m: sy.optim.SGD,
            "optimizer=planwire.optim.SGD is a class: pass an instance, e.g. optimizer=planwire.optim.SGD(lr=0.01)",
        ),
        (lambda m: "sgd", "optimizer must be a planwire.optim optimizer (SGD, Adam), got builtins.str"),
    ],
    ids=["torch-sgd", "torch-adam-class", "torch-adamw", "torch-rmsprop", "planwire-class", "string"],
)
def test_training_plan_refuses_other_optimizers_naming_planwire_optim(
    optimizer: Callable[[nn.Module], object], advice: str
) -> None:
    model = small()
    with pytest.raises(TypeError) as err:
        sy.training_plan(model, F.cross_entropy, optimizer(model), args_shape=[(-1, 4), (-1,)])
    assert advice in str(err.value)
    assert "hyper_tensors" not in str(err.value)


def test_training_plan_from_example_inputs_has_a_dynamic_batch() -> None:
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    step = sy.training_plan(small(), F.cross_entropy, sy.optim.SGD(lr=0.1), examples=(x, y))
    arg0, arg1 = step.step.variant.inputs[:2]
    assert (arg0.dtype, arg1.dtype) == ("float", "int64")
    assert isinstance(arg0.shape[0], str) and arg0.shape[1:] == (4,) and isinstance(arg1.shape[0], str)
    assert re.search(r"arg0: float32\[\?, 4\], arg1: int64\[\?\]", repr(step))
