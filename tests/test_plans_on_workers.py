"""Exporter-built plans sent to every kind of worker (in-process, tcp, ipc): parity with eager torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planwire as sy
from planwire.transport.arrays import set_tags


@pytest.fixture(scope="module")
def plans():
    @sy.func2plan(args_shape=[(-1, 3), (3,)])
    def affine_stats(x, b):
        y = x * 2.0 + b
        return y, y.sum(dim=1), (y > 0)

    @sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x, state):
        (bias,) = state.read()
        return x.abs() + bias

    @sy.func2plan()
    def scaled(x):
        return x * 3

    class Net(sy.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(2, 3), nn.Linear(3, 2)

        def forward(self, x):
            return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=-1)

    torch.manual_seed(0)
    net = Net()
    net.build(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), dynamic_axes=[{0}])
    return affine_stats, plan_abs, scaled, net


def test_several_outputs_and_dynamic_axes(worker, plans):
    affine_stats = plans[0]
    ptr = affine_stats.send(worker)
    b = worker.put(torch.tensor([0.5, -1.0, 0.0]))
    for n in (1, 2, 7):
        x = torch.randn(n, 3)
        y, s, pos = ptr(worker.put(x), b)
        want = x * 2.0 + torch.tensor([0.5, -1.0, 0.0])
        torch.testing.assert_close(y.get(), want)
        torch.testing.assert_close(s.get(), want.sum(dim=1))
        assert torch.equal(pos.get(), want > 0) and pos.dtype == "bool"


def test_state_plan_and_variant_built_for_the_callers_dtype(worker, plans):
    plan_abs = plans[1]
    ptr = plan_abs.send(worker)
    assert torch.equal(ptr(torch.tensor([-3.0])).get(), torch.tensor([4.0]))
    x_ptr = sy.send(torch.tensor([-1, 0]), worker)  # int64, size 2: a new variant is built and sent
    assert torch.equal(ptr(x_ptr).get(), torch.tensor([2, 1]))
    assert len(plan_abs.variants) >= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32])
def test_variants_per_dtype_on_workers(worker, plans, dtype):
    scaled = plans[2]
    x = torch.arange(-3, 3).to(dtype)
    if not scaled.is_built:
        scaled.build(x)
    got = scaled.send(worker)(worker.put(x)).get()
    assert got.dtype == dtype and torch.equal(got, x * 3)


def test_module_plan_on_the_workers_own_data(worker_factory, plans):
    net = plans[3]
    data = set_tags(torch.tensor([[-1.0, 2.0], [0.5, 0.5], [3.0, -2.0]]), ["input_data"])
    w = worker_factory("device_1", data=(data,), public=True)  # public: the result may come back
    got = net.send(w)(w.search("input_data")[0]).get()
    torch.testing.assert_close(got, net.eager(data).detach())


def test_saved_plan_loads_and_runs_remotely(worker, plans, tmp_path):
    affine_stats = plans[0]
    path = affine_stats.save(tmp_path / "affine.onnx")
    loaded = sy.load_plan(path)
    x = torch.randn(4, 3)
    b = torch.zeros(3)
    y, _, _ = loaded.send(worker)(x, b)
    torch.testing.assert_close(y.get(), x * 2.0)
    with pytest.raises(TypeError, match=r"argument 0 \('x'\): expected dtype float32, got int64"):
        loaded.send(worker)(torch.ones(4, 3, dtype=torch.int64), b)


def test_func2plan_with_torch_func_grad_trains_like_autograd(worker):
    """A hand-written FedProx step: torch.func.grad_and_value over functional_call, exported by func2plan."""
    from torch.func import functional_call, grad_and_value

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}

    @sy.func2plan(args_shape=[(-1, 3), (-1, 2), (2, 3), (2,)])
    def fedprox_step(x, y, w, b):
        def objective(p):
            prox = sum(((p[k] - anchor[k]) ** 2).sum() for k in p)
            return F.mse_loss(functional_call(model, p, (x,)), y) + 0.05 * prox

        g, loss = grad_and_value(objective)({"weight": w, "bias": b})
        return loss, w - 0.1 * g["weight"], b - 0.1 * g["bias"]

    ptr = fedprox_step.send(worker)
    w_ptr, b_ptr = worker.put(anchor["weight"]), worker.put(anchor["bias"])
    ref = {k: v.clone().requires_grad_(True) for k, v in anchor.items()}
    for n in (3, 9, 4):  # batch sizes other than the traced one
        x, y = torch.randn(n, 3), torch.randn(n, 2)
        loss_ptr, w_ptr, b_ptr = ptr(x, y, w_ptr, b_ptr)
        prox = sum(((ref[k] - anchor[k]) ** 2).sum() for k in ref)
        loss = F.mse_loss(x @ ref["weight"].T + ref["bias"], y) + 0.05 * prox
        gw, gb = torch.autograd.grad(loss, [ref["weight"], ref["bias"]])
        with torch.no_grad():
            ref = {
                "weight": (ref["weight"] - 0.1 * gw).requires_grad_(True),
                "bias": (ref["bias"] - 0.1 * gb).requires_grad_(True),
            }
        torch.testing.assert_close(loss_ptr.get(), loss.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_ptr.get(), ref["weight"].detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b_ptr.get(), ref["bias"].detach(), rtol=1e-4, atol=1e-6)
