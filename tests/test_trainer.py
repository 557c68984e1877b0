"""Training plans on workers: state lives on the worker, each step is one message, parity with torch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planwire as sy
from planwire.transport import PointerTensor, RemoteError


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 10)
    )


@pytest.fixture(scope="module")
def cnn_plan():
    model = small_cnn()
    plan = sy.training_plan(
        model,
        F.cross_entropy,
        sy.optim.SGD(lr=0.05, momentum=0.9, weight_decay=1e-4),
        args_shape=[(-1, 1, 8, 8), (-1,)],
        args_dtypes=[torch.float32, torch.int64],
        metrics=("accuracy",),
    )
    return plan, model


def eager_steps(model, batches, lr=0.05, accuracies=None):
    """Eager torch steps; the loss of each, and (into ``accuracies``) the accuracy of its forward pass."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if accuracies is not None:
            accuracies.append((logits.argmax(1) == y).float().mean().item())
    return losses


def batches(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def test_steps_on_the_worker_match_eager_torch(worker, cnn_plan):
    plan, model = cnn_plan
    ref = copy.deepcopy(model).train()
    data = batches([3, 7, 16, 5])  # batch sizes other than the traced one
    ptr = plan.send(worker)
    losses, accuracies = [], []
    for x, y in data:
        x_ptr = worker.put(x)  # data already on the device, as with a data owner's tensors
        loss, acc = ptr(x_ptr, y)
        losses.append(loss.get().item())
        accuracies.append(acc.get().item())
    expect_accuracies: list[float] = []
    expect = eager_steps(ref, data, accuracies=expect_accuracies)
    assert losses == pytest.approx(expect, rel=1e-4)
    assert accuracies == pytest.approx(expect_accuracies, abs=1e-6)  # the worker's metric, not just a range
    trained = ptr.state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert [p.shape for p in ptr.parameters()] == [tuple(p.shape) for p in model.parameters()]


def test_hyper_parameters_change_per_call_and_weights_can_be_pushed(worker, cnn_plan):
    plan, model = cnn_plan
    ptr = plan.send(worker)
    ((x, y),) = batches([6], seed=3)
    before = ptr.state_dict()
    ptr(x, y, lr=0.0, momentum=0.0, weight_decay=0.0)[0].get()
    after = ptr.state_dict()
    for name in before:
        if "running" not in name and "num_batches" not in name:  # BatchNorm statistics still update
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    fresh = small_cnn().state_dict()
    fresh = {k: v + 1 if v.is_floating_point() else v for k, v in fresh.items()}
    ptr.load_state_dict(fresh, reset_optimizer=True)
    for name, value in ptr.state_dict().items():
        torch.testing.assert_close(value, fresh[name], msg=name)


def test_hyper_overrides_apply_to_one_call_and_free_releases_all_state(worker, cnn_plan):
    plan, model = cnn_plan
    ref = copy.deepcopy(model).train()
    data = batches([5, 6, 4], seed=4)
    ptr = plan.send(worker)
    assert len(worker.search(f"plan:{plan.name}")) == len(ptr.keys) + len(plan.step.hyper)  # state, default hyper
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for (x, y), lr in zip(data, (0.05, 0.2, 0.05), strict=True):  # the middle step alone overrides lr
        loss = ptr(x, y, lr=lr)[0] if lr != 0.05 else ptr(x, y)[0]
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        expect = F.cross_entropy(ref(x), y)
        expect.backward()
        opt.step()
        assert loss.get().item() == pytest.approx(expect.item(), rel=1e-4)
    trained = ptr.state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-6, msg=name)
    ptr.free()
    worker.flush()
    assert worker.search(f"plan:{plan.name}") == []


def test_clear_errors_for_bad_batches_and_weights(worker, cnn_plan):
    plan, _ = cnn_plan
    ptr = plan.send(worker)
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(TypeError, match=r"targets argument 1 \('arg1'\): expected dtype int64, got float32"):
        ptr(x, torch.zeros(4))
    with pytest.raises(TypeError, match=r"input argument 0 \('arg0'\): expected shape \[\?, 1, 8, 8\]"):
        ptr(torch.randn(4, 1, 9, 9), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(TypeError, match="unknown hyper-parameters"):
        ptr(x, torch.zeros(4, dtype=torch.int64), beta=1.0)
    with pytest.raises(KeyError, match="missing"):
        ptr.load_state_dict({})
    sd = ptr.state_dict()
    sd["5.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="5.weight"):
        ptr.load_state_dict(sd)


def test_a_step_without_its_state_fails_naming_what_is_missing(worker, cnn_plan):
    plan, _ = cnn_plan
    ptr = plan.send(worker)
    first = ptr.parameters()[0]  # deleted behind the pointer's back, as another client could
    worker.delete(PointerTensor(worker, first.key, first.dtype, first.shape, owned=False))
    loss, _ = ptr(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RemoteError, match="param.0.weight"):
        loss.get()
