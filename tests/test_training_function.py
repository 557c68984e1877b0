"""Plain functions that take gradients (torch.func over functional_call) exported by build_function_step.

Each plan runs in onnxruntime at a batch size other than the traced one and must equal the eager
function; a FedProx step (proximal term to the global weights) is run for K rounds, feeding its
updated weights back, against the same rounds in eager torch.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value

from planwire.exporter.metadata import ports
from planwire.exporter.training import TrainingExportError, build_function_step
from planwire.exporter.training.function import uses_autograd

torch.manual_seed(0)
MODEL = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
NAMES = [n for n, _ in MODEL.named_parameters()]
PARAMS = [p.detach().clone() for p in MODEL.parameters()]


def fedprox(
    x: torch.Tensor, y: torch.Tensor, mu: torch.Tensor, lr: torch.Tensor, *weights: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One FedProx client step: cross entropy + mu/2 |w - w_global|^2; the first half of weights is w."""
    local = dict(zip(NAMES, weights[: len(NAMES)], strict=True))
    glob = dict(zip(NAMES, weights[len(NAMES) :], strict=True))

    def objective(w: dict[str, torch.Tensor]) -> torch.Tensor:
        prox = sum(((w[k] - glob[k]) ** 2).sum() for k in w)
        return F.cross_entropy(functional_call(MODEL, w, (x,)), y) + mu / 2 * prox

    g, loss = grad_and_value(objective)(local)
    return {"loss": loss, **{f"new.{k}": local[k] - lr * g[k] for k in NAMES}}


def run(step, feed: dict[str, np.ndarray]) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    return ort.InferenceSession(step.data, providers=["CPUExecutionProvider"]).run(None, feed)


def test_fedprox_rounds_match_eager() -> None:
    gen = torch.Generator().manual_seed(1)
    example = [torch.randn(6, 4), torch.randint(0, 3, (6,)), torch.tensor(0.1), torch.tensor(0.05), *PARAMS, *PARAMS]
    names = ["x", "y", "mu", "lr", *NAMES, *[f"global.{n}" for n in NAMES]]
    step = build_function_step(fedprox, example, dynamic=[{0: "batch"}, {0: "batch"}], input_names=names)
    assert step.input_names == tuple(names) and step.output_names == ("loss", *[f"new.{n}" for n in NAMES])
    assert step.variant.inputs[1].shape == ("batch",) and step.variant.outputs[1].shape == (8, 4)
    sess = ort.InferenceSession(step.data, providers=["CPUExecutionProvider"])
    glob = [p + 0.1 * torch.randn(p.shape, generator=gen) for p in PARAMS]
    local = [p.clone() for p in PARAMS]
    for n in (3, 11, 2):
        x, y = torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)
        args = [x, y, torch.tensor(0.1), torch.tensor(0.05), *local, *glob]
        outputs = sess.run(None, {k: a.numpy() for k, a in zip(names, args, strict=True)})
        expected = fedprox(*args)
        for got, (key, want) in zip(outputs, expected.items(), strict=True):
            np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=key)
        local = [torch.from_numpy(o) for o in outputs[1:]]


def test_tuple_outputs_and_other_gradient_styles() -> None:
    """torch.func.grad with tuple outputs, torch.autograd.grad, and loss.backward() + .grad."""
    torch.manual_seed(1)  # float32 parity at atol 1e-6: the same inputs whatever ran before

    def sgd(x: torch.Tensor, y: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        w = dict(zip(NAMES, weights, strict=True))
        g = grad(lambda q: F.mse_loss(functional_call(MODEL, q, (x,)), y))(w)
        return tuple(w[k] - 0.1 * g[k] for k in NAMES)

    def input_grad(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_()
        (g,) = torch.autograd.grad((torch.tanh(x @ w) ** 2).sum(), x)
        return g

    step = build_function_step(sgd, [torch.randn(5, 4), torch.randn(5, 3), *PARAMS], dynamic=[(0,), (0,)])
    assert step.output_names == tuple(f"output{i}" for i in range(4))
    assert step.variant.inputs[1].shape[0] == step.variant.inputs[0].shape[0] == "arg0_0"  # proven equal
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    outputs = run(step, {n: a.numpy() for n, a in zip(step.input_names, [x, y, *PARAMS], strict=True)})
    for got, want in zip(outputs, sgd(x, y, *PARAMS), strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)

    def backward_grad(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_()
        (torch.tanh(x @ w) ** 2).mean().backward()
        return w.grad * 1

    step = build_function_step(input_grad, [torch.randn(5, 3), torch.randn(3, 2)], dynamic=[(0,), ()])
    assert step.variant.outputs[0].shape == ("arg0_0", 3)
    assert ports(step.model) == (step.variant.inputs, step.variant.outputs)
    x, w = torch.randn(8, 3), torch.randn(3, 2)
    (got,) = run(step, {"arg0": x.numpy(), "arg1": w.numpy()})
    np.testing.assert_allclose(got, input_grad(x, w).numpy(), rtol=1e-5, atol=1e-6)

    step = build_function_step(backward_grad, [torch.randn(5, 3), torch.randn(3, 2)], dynamic=[(0,)])
    (got,) = run(step, {"arg0": x.numpy(), "arg1": w.numpy()})
    np.testing.assert_allclose(got, backward_grad(x, w).numpy(), rtol=1e-5, atol=1e-6)


BAD = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveMaxPool2d(2))


def test_unexportable_gradient_names_the_closed_over_layer() -> None:
    def weight_grad(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return grad(lambda q: functional_call(BAD, q, (x,)).sum())({"0.weight": w, "0.bias": b})["0.weight"]

    with pytest.raises(TrainingExportError) as info:
        example = [torch.randn(3, 1, 6, 6), BAD[0].weight.detach(), BAD[0].bias.detach()]
        build_function_step(weight_grad, example, dynamic=[(0,)])
    assert info.value.op == "aten.adaptive_max_pool2d_backward.default"
    assert info.value.module == "BAD.1 (AdaptiveMaxPool2d)"


def test_argument_checks_and_autograd_detection() -> None:
    with pytest.raises(ValueError, match="example size 1"):
        build_function_step(lambda x: x * 2, [torch.ones(1, 3)], dynamic=[(0,)])
    with pytest.raises(TypeError, match="must be a tensor"):
        build_function_step(lambda x: x * 2, [3.0])  # type: ignore[list-item]
    assert uses_autograd(fedprox) and not uses_autograd(lambda x: x * 2)


def _tanh_grad(t: torch.Tensor) -> torch.Tensor:
    return grad(lambda u: (u.tanh() * 3).sum())(t)


def test_a_gradient_taken_in_a_helper_builds_as_a_gradient_plan() -> None:
    """The plan's own code names no transform; the helper it calls does: the build still takes the
    gradient-capable pipeline (the plain export fails on torch.func.grad)."""
    from planwire.exporter import func2plan

    def through_helper(x: torch.Tensor) -> torch.Tensor:
        return _tanh_grad(x) * 2

    assert uses_autograd(through_helper)
    plan = func2plan(args_shape=[(-1, 2)], name="grad_in_helper")(through_helper)
    x = torch.randn(5, 2)
    torch.testing.assert_close(plan(x), 6 * (1 - x.tanh() ** 2), rtol=1e-5, atol=1e-6)
