"""Training-step plans in plain onnxruntime against eager torch + torch.optim, step for step.

Every test builds the plan once (export costs seconds), then for several seeds runs K steps in
onnxruntime, feeding each step's updated state into the next, at batch sizes other than the traced one,
beside K eager steps of the same model with torch.optim: loss, metrics, every parameter and buffer must
agree (rtol 1e-4). Layers are grouped into a few small models; losses are parametrized over one MLP.

Dropout in train mode draws its mask inside the ONNX graph, so it cannot match torch's mask: it is
checked exactly at p=0 (inside the MLP) and statistically at p>0 (test_dropout_*): the masks recovered
from the gradient are 0 or 1/(1-p), drop about a fraction p, differ between runs, and are the same in
the forward and the backward pass.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planwire.exporter import cache
from planwire.exporter.errors import PlanBuildError
from planwire.exporter.metadata import ports
from planwire.exporter.optim import SGD, Adam, Optimizer
from planwire.exporter.training import TrainingExportError, TrainingStep, build_training_step
from planwire.transport.spec import META_INPUTS, META_KIND, META_OUTPUTS

RTOL, ATOL = 1e-4, 1e-6
SIZES = (3, 7, 2)  # batch sizes of the K steps: the plans are traced with batch 5 or more
STEPS = 3
SEEDS = (0, 1)

TorchOpt = Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]
OPTIMIZERS: dict[str, tuple[Optimizer, TorchOpt]] = {
    "sgd": (
        SGD(0.05, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False),
    ),
    "adam": (
        Adam(0.01, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01, foreach=False),
    ),
}


def session(step: TrainingStep) -> ort.InferenceSession:
    return ort.InferenceSession(step.data, providers=["CPUExecutionProvider"])


def check_parity(
    make_model: Callable[[], nn.Module],
    loss: Callable[..., torch.Tensor],
    optimizer: str,
    args_shape: Sequence[Sequence[int]],
    batch: Callable[[int, torch.Generator], list[torch.Tensor]],
    *,
    args_dtypes: Sequence[torch.dtype] | None = None,
    metrics: Sequence[str] = (),
    train: bool = True,
) -> TrainingStep:
    """Build once, then K onnxruntime steps == K torch steps for each seed; returns the plan."""
    ours, make_torch = OPTIMIZERS[optimizer]
    torch.manual_seed(100)
    step = build_training_step(make_model(), loss, ours, args_shape, args_dtypes, metrics, train=train)
    sess = session(step)
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = make_model().train(train)
        state = step.initial_state(model)
        reference = make_torch(list(p for p in model.parameters() if p.requires_grad))
        gen = torch.Generator().manual_seed(seed)
        for k in range(STEPS):
            args = batch(SIZES[k % len(SIZES)], gen)
            outputs = sess.run(None, step.feeds(args, state))
            named = dict(zip(step.output_names, outputs, strict=True))
            state = step.advance(state, outputs)

            reference.zero_grad()
            output = model(*args[:-1])
            value = loss(output, args[-1])
            value.backward()
            reference.step()

            where = f"seed {seed} step {k}"
            np.testing.assert_allclose(named["loss"], value.item(), rtol=RTOL, atol=ATOL, err_msg=where)
            if "metric.accuracy" in named:
                target = args[-1]
                predicted = output.argmax(1) if not target.is_floating_point() else (output > 0).float()
                accuracy = (predicted == target).float().mean().item()
                np.testing.assert_allclose(named["metric.accuracy"], accuracy, rtol=1e-6, err_msg=where)
            for name, tensor in model.named_parameters():
                role = "param" if tensor.requires_grad else "frozen"
                np.testing.assert_allclose(
                    state[f"{role}.{name}"], tensor.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{name} ({where})"
                )
            for name, tensor in model.named_buffers():
                np.testing.assert_allclose(
                    state[f"buffer.{name}"], tensor.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{name} ({where})"
                )
    return step


def images(shape: tuple[int, ...], classes: int) -> Callable[[int, torch.Generator], list[torch.Tensor]]:
    """Batches of standard-normal inputs of ``shape`` (batch axis excluded) with class targets."""

    def batch(n: int, gen: torch.Generator) -> list[torch.Tensor]:
        return [torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)]

    return batch


# --------------------------------------------------------------------------------------------------
# Layer coverage


class CNN(nn.Module):
    """Conv2d (padding, dilation, groups, stride), BatchNorm2d, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
    Flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 12 -> 6
            nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, stride=2, padding=1),  # 6 -> 3
            nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),  # 3 -> 4
            nn.AdaptiveAvgPool2d(3),  # 4 -> 3, overlapping windows
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(54, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Signal(nn.Module):
    """Conv1d (stride, padding, dilation, groups), ConvTranspose1d, Tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=1),  # 16 -> 8
            nn.Tanh(),
            nn.ConvTranspose1d(4, 4, 3, stride=2, padding=1, output_padding=1),  # 8 -> 16
            nn.Conv1d(4, 4, 3, dilation=2, groups=4),  # 16 -> 12
            nn.Flatten(),
            nn.Linear(48, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP(nn.Module):
    """Linear, LayerNorm, GELU, Dropout (p=0: exact), Tanh, Sigmoid, Softmax, LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 16),
            nn.LayerNorm(16),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(16, 8),
            nn.Tanh(),
            nn.Linear(8, 8),
            nn.Sigmoid(),
            nn.Softmax(dim=1),
            nn.Linear(8, 4),
            nn.LogSoftmax(dim=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Bag(nn.Module):
    """Embedding over token ids, mean-pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 5)
        self.fc = nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(tokens).mean(1))


def tokens(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randint(0, 10, (n, 6), generator=gen), torch.randint(0, 3, (n,), generator=gen)]


def vectors(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(n, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_cnn_conv_batchnorm_pooling(optimizer: str) -> None:
    step = check_parity(
        CNN, F.cross_entropy, optimizer, [(-1, 1, 12, 12), (-1,)], images((1, 12, 12), 3), metrics=("accuracy",)
    )
    assert set(step.buffers) == {
        "buffer.features.1.running_mean",
        "buffer.features.1.running_var",
        "buffer.features.1.num_batches_tracked",
    }
    assert {step.bindings[f"new.{b}"] for b in step.buffers} == set(step.buffers)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_conv1d_and_transposed_conv(optimizer: str) -> None:
    check_parity(Signal, F.cross_entropy, optimizer, [(-1, 2, 16), (-1,)], images((2, 16), 3))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_mlp_activations_and_norms(optimizer: str) -> None:
    check_parity(MLP, F.nll_loss, optimizer, [(-1, 6), (-1,)], vectors, metrics=("accuracy",))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_embedding(optimizer: str) -> None:
    check_parity(Bag, F.cross_entropy, optimizer, [(-1, 6), (-1,)], tokens, args_dtypes=[torch.int64] * 2)


class Sequence(nn.Module):
    """TransformerEncoderLayer (multi-head attention through scaled_dot_product_attention, 3-d linear,
    LayerNorm, GELU) and an LSTM over embedded tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", batch_first=True)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(self.encoder(self.emb(tokens)))[0][:, -1])


def test_sequence_model_attention_and_lstm() -> None:
    """SGD only: the attention key bias has an exactly zero gradient, which Adam (g / (|g| + eps))
    turns into +-lr steps of float noise, different in any two correct implementations."""
    check_parity(Sequence, F.cross_entropy, "sgd", [(-1, 6), (-1,)], tokens, args_dtypes=[torch.int64] * 2)


# --------------------------------------------------------------------------------------------------
# Losses


def small() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def classes(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)]


def regression(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(n, 4, generator=gen), torch.randn(n, 3, generator=gen)]


def multilabel(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n, 3), generator=gen).float()]


LOSSES = {
    "cross_entropy": (F.cross_entropy, classes, (-1,), ("accuracy",)),
    "nll_loss": (F.nll_loss, classes, (-1,), ("accuracy",)),
    "mse_loss": (F.mse_loss, regression, (-1, 3), ()),
    "l1_loss": (F.l1_loss, regression, (-1, 3), ()),
    "bce_with_logits": (F.binary_cross_entropy_with_logits, multilabel, (-1, 3), ("accuracy",)),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("loss", LOSSES)
def test_loss(loss: str, optimizer: str) -> None:
    fn, batch, target_shape, metrics = LOSSES[loss]
    step = check_parity(small, fn, optimizer, [(-1, 4), target_shape], batch, metrics=metrics)
    assert step.metrics == tuple(f"metric.{m}" for m in metrics)


# --------------------------------------------------------------------------------------------------
# Modes, frozen parameters, hyper-parameters


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.stem.requires_grad_(False)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.stem(x))))


def classes_some_ignored(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    x, y = classes(n, gen)
    y[::3] = -100  # the default ignore_index
    return [x, y]


CLASS_LOSSES = {  # the lean nll_loss backward (one-hot select) and torch's path for class weights
    "ignored targets": (F.cross_entropy, classes_some_ignored),
    "ignore_index inside the classes, sum": (
        lambda o, t: F.cross_entropy(o, t, ignore_index=1, reduction="sum"),
        classes,
    ),
    "nll_loss, none + mean": (lambda o, t: F.nll_loss(o.log_softmax(1), t, reduction="none").mean(), classes),
    "class weights, label smoothing": (
        lambda o, t: F.cross_entropy(o, t, weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1),
        classes_some_ignored,
    ),
}


@pytest.mark.parametrize("loss", CLASS_LOSSES)
def test_class_index_loss_variants(loss: str) -> None:
    fn, batch = CLASS_LOSSES[loss]
    check_parity(small, fn, "sgd", [(-1, 4), (-1,)], batch, args_dtypes=[torch.float32, torch.int64])


def test_eval_mode_and_frozen_parameters() -> None:
    """train=False: BatchNorm uses and keeps its running stats (no buffer outputs); frozen params are read."""

    def make() -> nn.Module:
        model = Frozen()
        with torch.no_grad():  # non-trivial running statistics
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
        return model

    step = check_parity(make, F.cross_entropy, "sgd", [(-1, 4), (-1,)], classes, train=False)
    assert step.frozen == ("frozen.stem.weight", "frozen.stem.bias")
    assert not any(v.startswith("buffer.") for v in step.bindings.values())
    assert [s.role for s in step.variant.inputs].count("frozen") == 2


def test_hyper_parameters_change_per_call_without_rebuild() -> None:
    torch.manual_seed(0)
    model = small()
    step = build_training_step(model, F.cross_entropy, SGD(0.1, momentum=0.9), [(-1, 4), (-1,)])
    assert list(step.hyper) == ["hyper.lr", "hyper.momentum", "hyper.weight_decay"]
    assert all(v.dtype == np.float64 and v.shape == () for v in step.hyper.values())
    sess, state = session(step), step.initial_state()
    reference = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for lr, momentum, decay in [(0.1, 0.9, 0.0), (0.02, 0.5, 0.1), (0.3, 0.0, 0.01)]:
        group = reference.param_groups[0]
        group.update(lr=lr, momentum=momentum, weight_decay=decay)
        args = classes(4, gen)
        outputs = sess.run(None, step.feeds(args, state, lr=lr, momentum=momentum, weight_decay=decay))
        state = step.advance(state, outputs)
        reference.zero_grad()
        F.cross_entropy(model(args[0]), args[1]).backward()
        reference.step()
        for name, p in model.named_parameters():
            np.testing.assert_allclose(state[f"param.{name}"], p.detach().numpy(), rtol=RTOL, atol=ATOL)
    with pytest.raises(KeyError, match="betas"):
        step.feeds(args, state, betas=0.9)


def test_load_into_copies_trained_state_back() -> None:
    torch.manual_seed(0)
    model = Frozen()
    step = build_training_step(model, F.cross_entropy, Adam(0.1), [(-1, 4), (-1,)])
    sess, state = session(step), step.initial_state()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        state = step.advance(state, sess.run(None, step.feeds(classes(6, gen), state)))
    assert state["optim.step"] == 2
    step.load_into(model, state)
    np.testing.assert_array_equal(model.head.weight.detach().numpy(), state["param.head.weight"])
    np.testing.assert_array_equal(model.bn.running_var.numpy(), state["buffer.bn.running_var"])
    assert model.bn.num_batches_tracked.item() == 2


# --------------------------------------------------------------------------------------------------
# Dropout (random inside the graph)


def recovered_masks(p: float, module: nn.Module, shape: tuple[int, ...], runs: int = 3) -> list[np.ndarray]:
    """Run a dropout + linear read-out plan on ones; each run's weight gradient is its scaled mask.

    loss = sum(w * dropout(1)) so d loss / d w = mask / (1 - p); SGD with lr=1 makes it w - w'. Also
    checks that the loss equals sum(w * mask/(1-p)): forward and backward used the same mask.
    """
    width = int(np.prod(shape))
    model = nn.Sequential(module, nn.Flatten(), nn.Linear(width, 1, bias=False))
    step = build_training_step(
        model, lambda out, _: out.sum(), SGD(1.0), [(-1, *shape), (-1,)], [torch.float32, torch.float32]
    )
    sess = session(step)
    w = step.state["param.2.weight"].astype(np.float64)
    masks = []
    for _ in range(runs):
        args = [np.ones((1, *shape), np.float32), np.zeros(1, np.float32)]
        named = dict(zip(step.output_names, sess.run(None, step.feeds(args)), strict=True))
        grad = w - named["new.param.2.weight"]
        np.testing.assert_allclose(named["loss"], (w * grad).sum(), rtol=1e-4, atol=1e-5)
        masks.append(grad.reshape(shape))
    return masks


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_draws_a_fresh_scaled_mask_each_run(p: float) -> None:
    masks = recovered_masks(p, nn.Dropout(p), (4096,))
    for mask in masks:
        kept = mask > 0.5 / (1 - p)
        np.testing.assert_allclose(mask[kept], 1 / (1 - p), rtol=1e-5)
        np.testing.assert_allclose(mask[~kept], 0, atol=1e-5)
        assert abs((~kept).mean() - p) < 0.04  # 5 binomial standard deviations at n=4096
    assert not np.array_equal(masks[0] > 0, masks[1] > 0)


def test_dropout2d_drops_whole_channels() -> None:
    masks = recovered_masks(0.5, nn.Dropout2d(0.5), (256, 2, 2), runs=2)
    for mask in masks:
        per_channel = mask.reshape(256, 4)
        np.testing.assert_allclose(per_channel, per_channel[:, :1].repeat(4, 1), atol=1e-5)
        assert 0.35 < (per_channel[:, 0] < 1).mean() < 0.65
    assert not np.array_equal(masks[0] > 1, masks[1] > 1)


# --------------------------------------------------------------------------------------------------
# The plan itself: ports, metadata, dynamic axes; errors


def test_ports_metadata_and_dynamic_batch() -> None:
    torch.manual_seed(0)
    step = build_training_step(
        Frozen(), F.cross_entropy, Adam(), [(-1, 4), (-1,)], metrics=("accuracy",), name="frozen-adam"
    )
    roles = [s.role for s in step.variant.inputs]
    order = ["arg", "hyper", "param", "frozen", "buffer", "optim"]
    assert roles == sorted(roles, key=order.index), "inputs grouped by role in the documented order"
    assert step.args == ("arg0", "arg1") and step.variant.inputs[0].shape == ("batch", 4)
    assert step.variant.inputs[1].shape == ("batch",)
    assert step.optim[-1] == "optim.step"
    assert [s.name for s in step.variant.outputs[:2]] == ["loss", "metric.accuracy"]
    for out, bound in step.bindings.items():
        assert out == f"new.{bound}" and bound in step.input_names
    assert set(step.bindings.values()) == {*step.params, *step.buffers, *step.optim}

    meta = {p.key: p.value for p in step.model.metadata_props}
    assert meta[META_KIND] == "training" and meta["planwire.name"] == "frozen-adam"
    outputs = json.loads(meta[META_OUTPUTS])
    assert {o["name"]: o["binds"] for o in outputs if "binds" in o} == step.bindings
    assert [o["role"] for o in outputs[:2]] == ["loss", "metric"]
    inputs = json.loads(meta[META_INPUTS])
    assert [i["name"] for i in inputs] == list(step.input_names)
    assert inputs[0]["shape"] == ["batch", 4] and inputs[2] == {
        "name": "hyper.lr",
        "role": "hyper",
        "dtype": "double",
        "shape": [],
    }
    training = json.loads(meta["planwire.training"])
    assert training["optimizer"]["name"] == "adam" and training["loss"] == "cross_entropy"

    assert ports(step.model) == (step.variant.inputs, step.variant.outputs)  # what a worker reads
    graph = step.model.graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
    assert not {"Gradient", "Dropout"} & {n.op_type for n in graph.node}
    bn = [n for n in graph.node if n.op_type == "BatchNormalization"]
    training_mode = [a.i for n in bn for a in n.attribute if a.name == "training_mode"]
    assert not any(training_mode), "BatchNormalization only in inference mode (statistics are explicit ops)"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = session(step)
    for n in (2, 5, 33):  # the same session at any batch size
        args = [np.random.default_rng(n).standard_normal((n, 4)).astype(np.float32), np.zeros(n, np.int64)]
        loss = sess.run(["loss"], step.feeds(args))[0]
        assert np.isfinite(loss) and loss.shape == ()


class Unsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveMaxPool2d(2))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def test_unexportable_gradient_names_the_op_and_the_layer() -> None:
    with pytest.raises(TrainingExportError) as info:
        build_training_step(Unsupported(), F.cross_entropy, SGD(), [(-1, 1, 8, 8), (-1,)])
    error = info.value
    assert isinstance(error, PlanBuildError)
    assert error.op == "aten.adaptive_max_pool2d_backward.default"
    assert error.module == "features.1 (AdaptiveMaxPool2d)"
    assert "adaptive_max_pool2d_backward" in str(error) and "features.1 (AdaptiveMaxPool2d)" in str(error)
    assert error.__cause__ is not None


def test_wrong_target_dtype_is_a_type_error_naming_the_targets() -> None:
    with pytest.raises(TypeError, match=r"targets \(args_dtypes\[1\]\) must be int64.*int32"):
        build_training_step(small(), F.cross_entropy, SGD(), [(-1, 4), (-1,)], [torch.float32, torch.int32])
    with pytest.raises(TypeError, match=r"targets .* int64 class indices for nll_loss"):
        build_training_step(small(), F.nll_loss, SGD(), [(-1, 4), (-1,)], [torch.float32, torch.float32])
    with pytest.raises(TypeError, match=r"targets \(args_dtypes\[1\]\) must be floating point for mse_loss"):
        build_training_step(small(), nn.MSELoss(), SGD(), [(-1, 4), (-1, 3)], [torch.float32, torch.int64])


def test_bad_arguments_are_reported_before_tracing() -> None:
    with pytest.raises(ValueError, match="'accuracy' needs a classification loss"):
        build_training_step(small(), F.mse_loss, SGD(), [(-1, 4), (-1, 3)], metrics=("accuracy",))
    with pytest.raises(ValueError, match="unknown metric"):
        build_training_step(small(), F.cross_entropy, SGD(), [(-1, 4), (-1,)], metrics=("f1",))
    with pytest.raises(ValueError, match="scalar"):
        build_training_step(
            small(), lambda o, t: (o - t) ** 2, SGD(), [(-1, 4), (-1, 3)], [torch.float32, torch.float32]
        )


def test_build_check_catches_a_wrong_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the core decompositions the exported cross-entropy gradient is wrong (NOTES.md): the
    build's own onnxruntime-vs-eager check must refuse the plan."""
    from planwire.exporter.training import decompositions, trace

    only_ours = dict(decompositions.BACKWARD_DECOMPOSITIONS)
    monkeypatch.setattr(trace, "training_decompositions", lambda: only_ours)
    monkeypatch.setenv("PLANWIRE_CACHE_DIR", "")
    with pytest.raises(PlanBuildError, match=r"new\.param\..*differs from eager torch"):
        build_training_step(small(), F.cross_entropy, SGD(0.5), [(-1, 4), (-1,)], name="wrong-grad")


def test_rebuilding_the_same_step_reuses_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANWIRE_CACHE_DIR", "")
    torch.manual_seed(3)
    first = build_training_step(small(), F.mse_loss, SGD(0.1), [(-1, 4), (-1, 3)], name="a")
    exports = cache.stats.exports
    second = build_training_step(small(), F.mse_loss, SGD(0.2), [(-1, 4), (-1, 3)], name="b")
    assert cache.stats.exports == exports  # same graph (values are inputs): no new export
    assert first.data != second.data  # ... but each plan carries its own name and defaults
    assert second.hyper["hyper.lr"] == 0.2
