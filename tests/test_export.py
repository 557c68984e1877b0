"""The exporter underneath plans: registry and export caches, graph hygiene, files, loading, failures."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from planwire.exporter import (
    LoadedPlan,
    Plan,
    PlanBuildError,
    cache_stats,
    clear_cache,
    func2plan,
    load_plan,
    torch_compat,
)
from planwire.exporter.export import OPSET
from planwire.exporter.verify import compare
from planwire.transport.spec import (
    META_FORMAT,
    META_INPUTS,
    META_KIND,
    META_NAME,
    META_OUTPUTS,
    META_STATE,
    PlanSource,
    plan_id,
)
from planwire.worker import VirtualWorker


@torch.library.custom_op("planwire_test::triple", mutates_args=())
def triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@triple.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


CONFIG = {"scale": 2.0}  # a global the cache key cannot see (dict contents are not fingerprinted)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("export-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLANWIRE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def affine() -> Plan:
    """Two inputs (one dynamic axis), two outputs, float state."""

    @func2plan(args_shape=[(-1, 3), (3,)], state=(torch.tensor([0.5, -1.0, 2.0]),))
    def affine(x, bias, state):
        (w,) = state.read()
        y = x * w + bias
        return y, y.sum(-1)

    return affine


@pytest.fixture(scope="module")
def saved(affine: Plan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return affine.save(tmp_path_factory.mktemp("saved") / "affine.onnx")


# -- registry cache ---------------------------------------------------------------------------------


def test_registry_is_built_once_and_unpatched_after(affine: Plan) -> None:
    from torch.onnx._internal.exporter import _registration

    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    builds = torch_compat.builds
    assert builds >= 1  # the fixture's export built it

    @func2plan(args_shape=[(2,)])
    def f(x):
        return x.sin()

    @func2plan(args_shape=[(2,)])
    def g(x):
        return x.cos()

    assert cache_stats.exports >= 2 and torch_compat.builds == builds  # later exports reuse the registry
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original
    with torch_compat.cached_registry() as active:
        assert active is True
        a = _registration.ONNXRegistry.from_torchlib()
        b = _registration.ONNXRegistry.from_torchlib()
        assert a is not b and a.functions is not b.functions and a.functions == b.functions
        key = next(iter(a.functions))
        a.functions[key].clear()  # what custom_translation_table registration does to a copy
        assert b.functions[key]
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original


# -- skipped decompositions ------------------------------------------------------------------------


class _Net(Plan):
    """The seed's Net: Linear, relu, Linear, log_softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(2, 3)
        self.fc2 = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x))), dim=0)


class _Seq(Plan):
    def __init__(self, *modules: torch.nn.Module, train: bool = False) -> None:
        super().__init__()
        self.m = torch.nn.Sequential(*modules)
        self.train(train)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


def _stats(bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.nn.Module:
    """A batch norm layer with random running statistics (and affine weights, if any)."""
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        if bn.weight is not None:
            bn.weight.normal_()
            bn.bias.normal_()
    return bn


class _BatchNormReshape(Plan):
    """bench/build.py's plan needing decompositions: BatchNorm (eval), relu, reshape, flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = _stats(torch.nn.BatchNorm1d(8))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(x)).reshape(-1, 2, 4).flatten(1)


def _fn(function):  # noqa: ANN001, ANN202
    return lambda: Plan(function)


_FLOAT = torch.randn(4, 8)
_IMAGE = torch.randn(4, 3, 5, 5)
# (plan, example, the path torch.onnx's decomposition step takes: "skip" when it provably has nothing to
# do, "local" when planwire.exporter.decompose rewrites the few nodes that need it, "torch" otherwise)
_DECOMP_CASES = {
    "elementwise": (_fn(lambda x: torch.relu(x * 2.0 + 1.5)), _FLOAT, "skip"),
    "dead code and sizes": (_fn(lambda x: [x.sin() * 3, x + x.shape[0] // 2][1]), _FLOAT, "skip"),
    "seed net": (_Net, torch.randn(4, 2), "skip"),
    "mlp": (lambda: _Seq(torch.nn.Linear(8, 5), torch.nn.GELU(), torch.nn.LayerNorm(5)), _FLOAT, "skip"),
    "float16": (_fn(lambda x: torch.sigmoid(x).abs() * 2), _FLOAT.half(), "skip"),
    "integers": (_fn(lambda x: (x * 3 // 2) % 4 + x.argmax(-1, keepdim=True)), torch.randint(0, 9, (4, 8)), "skip"),
    "where/cat/topk": (
        _fn(lambda x: torch.where(x > 0, torch.cat([x, -x], 1)[:, :8], x.exp()).topk(3)[0]),
        _FLOAT,
        "skip",
    ),
    "reshape": (_fn(lambda x: x.reshape(-1, 4, 2).sum(1)), _FLOAT, "local"),
    "reshape by a size": (_fn(lambda x: x.reshape(x.shape[0], 2, 4).sum(1) * x.shape[0]), _FLOAT, "local"),
    "batch norm": (lambda: _Seq(_stats(torch.nn.BatchNorm1d(8))), _FLOAT, "local"),
    "batch norm 2d, no affine, flatten": (
        lambda: _Seq(_stats(torch.nn.BatchNorm2d(3, affine=False)), torch.nn.ReLU(), torch.nn.Flatten()),
        _IMAGE,
        "local",
    ),
    "conv, batch norm, flatten": (
        lambda: _Seq(
            torch.nn.Conv2d(3, 4, 3), _stats(torch.nn.BatchNorm2d(4)), torch.nn.Flatten(), torch.nn.Linear(36, 2)
        ),
        _IMAGE,
        "local",
    ),
    "flatten inner axes, twice": (_fn(lambda x: x.flatten(1, 2).flatten(-2) + x.flatten(2).sum()), _IMAGE, "local"),
    "bench: batch norm, relu, reshape, flatten": (_BatchNormReshape, _FLOAT, "local"),
    "dropout and contiguous outside training": (
        _fn(lambda x: F.dropout(x, 0.5, training=False).reshape(-1, 2, 4).transpose(1, 2).contiguous() * 2),
        _FLOAT,
        "local",
    ),
    "resnet head: conv, batch norm, global pooling, dropout, linear": (
        lambda: _Seq(
            torch.nn.Conv2d(3, 4, 3),
            _stats(torch.nn.BatchNorm2d(4)),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d((1, 1)),
            torch.nn.Flatten(),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(4, 2),
        ),
        _IMAGE,
        "local",
    ),
    "adaptive pooling to 2x2": (_fn(lambda x: F.adaptive_avg_pool2d(x, 2)), _IMAGE, "torch"),
    "flatten over the batch axis": (_fn(lambda x: x.flatten() * 2), _FLOAT, "torch"),
    "reshape of a transpose (copies)": (_fn(lambda x: x.t().reshape(-1) * 2), _FLOAT, "torch"),
    "batch norm without running statistics": (
        lambda: _Seq(torch.nn.BatchNorm1d(8, track_running_stats=False)),
        _FLOAT,
        "torch",
    ),
    "reshape beside an op without rule": (_fn(lambda x: x.reshape(-1, 2, 4).clone().add_(1)), _FLOAT, "torch"),
    "in-place (functionalized)": (_fn(lambda x: x.clone().add_(1).mul_(2)), _FLOAT, "torch"),
    "dropout in training (not preservable)": (lambda: _Seq(torch.nn.Dropout(0.5), train=True), _FLOAT, "torch"),
    "batch norm in training (batch statistics)": (
        lambda: _Seq(_stats(torch.nn.BatchNorm1d(8)), train=True),
        _FLOAT,
        "torch",
    ),
}


def _canonical(model: onnx.ModelProto, keep: list[str]) -> bytes:
    """The graph with node names dropped and inner value names (which follow FX node names) numbered.

    Graph inputs, outputs and the kept state initializers keep their names.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    assert not model.graph.metadata_props
    ports = {v.name for v in [*model.graph.input, *model.graph.output]} | set(keep)
    names: dict[str, str] = {}
    for name in [t.name for t in model.graph.initializer] + [o for n in model.graph.node for o in n.output]:
        if name not in ports:
            names.setdefault(name, f"v{len(names)}")
    for node in model.graph.node:
        node.name = ""
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    for value in [*model.graph.value_info, *model.graph.initializer]:
        value.name = names.get(value.name, value.name)
    return model.SerializeToString(deterministic=True)


@pytest.mark.parametrize("case", list(_DECOMP_CASES))
def test_skipped_decompositions_give_the_same_graph(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from contextlib import nullcontext

    from torch.onnx._internal.exporter import _fx_passes

    from planwire.exporter import export
    from planwire.exporter.plan import eager

    make, example, path = _DECOMP_CASES[case]
    original = _fx_passes.decompose_with_registry
    models = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(export, "skip_noop_decompositions", lambda **_: nullcontext(False))
        torch.manual_seed(0)
        plan = make()
        before = torch_compat.skipped, torch_compat.rewritten, torch_compat.decomposed
        with eager():
            models.append(
                export.export_model(
                    plan,
                    [example],
                    plan=case,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic=[{0}],
                    keep=plan._state_names(),
                )
            )
        after = torch_compat.skipped, torch_compat.rewritten, torch_compat.decomposed
        counts = tuple(n - b for n, b in zip(after, before, strict=True))
        if fast:
            assert counts == {"skip": (1, 0, 0), "local": (1, 1, 0), "torch": (0, 0, 1)}[path]
        else:
            assert counts == (0, 0, 0)
        assert _fx_passes.decompose_with_registry is original
    assert _canonical(models[0], plan._state_names()) == _canonical(models[1], plan._state_names())
    make().build(example, dynamic_axes=[[0]])  # which verifies the graph against eager torch


def test_a_failing_check_takes_the_normal_path(monkeypatch: pytest.MonkeyPatch) -> None:

    def broken(*args: object) -> bool:
        raise AttributeError("an internal moved")

    monkeypatch.setattr(torch_compat, "nothing_to_decompose", broken)
    skipped, decomposed = torch_compat.skipped, torch_compat.decomposed

    @func2plan(args_shape=[(-1, 4)])
    def f(x):
        return x.tanh() * 0.25

    assert (torch_compat.skipped, torch_compat.decomposed) == (skipped, decomposed + 1)
    x = torch.randn(5, 4)
    torch.testing.assert_close(f(x), x.tanh() * 0.25)


def test_a_failing_local_decomposition_takes_the_normal_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from planwire.exporter import decompose

    def broken(*args: object) -> None:
        raise AttributeError("an internal moved")

    monkeypatch.setattr(decompose, "decompose_locally", broken)
    before = torch_compat.skipped, torch_compat.decomposed
    plan = _BatchNormReshape()
    plan.build(_FLOAT, dynamic_axes=[[0]])
    assert (torch_compat.skipped, torch_compat.decomposed) == (before[0], before[1] + 1)
    x = torch.randn(7, 8)
    torch.testing.assert_close(plan(x), plan.eager(x))


def test_local_decomposition_works_on_a_copy_and_checks_its_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from planwire.exporter import decompose

    program = torch.export.export(_BatchNormReshape(), (_FLOAT,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    captured = [str(n.target) for n in program.graph.nodes]
    reg = torch_compat.onnx_registry(OPSET)
    result = decompose.decompose_locally(program, reg)
    assert result is not None and result is not program
    assert [str(n.target) for n in program.graph.nodes] == captured  # the normal path still has the original
    assert "aten.batch_norm.default" in captured and "aten.flatten.using_ints" in captured
    targets = [str(n.target) for n in result.graph.nodes if n.op == "call_function"]
    assert targets == [
        "aten.sym_size.int",
        "aten._native_batch_norm_legit_no_training.default",
        "<built-in function getitem>",
        "aten.relu.default",
        "aten.view.default",
        "aten.view.default",
    ]
    x = torch.randn(5, 8)
    torch.testing.assert_close(result.module()(x), program.module()(x))

    # a rule whose result torch's step would still decompose is refused: the normal path takes over
    def keeps_reshape(node):  # noqa: ANN001, ANN202
        return lambda graph, new, env: decompose._call(
            graph, new, torch.ops.aten.reshape.default, (env[node.args[0]], node.args[1]), new.meta["val"]
        )

    monkeypatch.setitem(decompose.RULES, torch.ops.aten.reshape.default, keeps_reshape)
    assert decompose.decompose_locally(program, reg) is None
    monkeypatch.delitem(decompose.RULES, torch.ops.aten.reshape.default)
    assert decompose.plan_rewrites(program, reg) is None  # a node without rule
    assert decompose.decompose_locally(program, reg) is None


def test_nothing_to_decompose_rejects_control_flow_and_mutated_buffers() -> None:
    from torch.onnx._internal.exporter import _registration

    from planwire.exporter.torch_compat import nothing_to_decompose

    with torch_compat.cached_registry():
        reg = _registration.ONNXRegistry.from_torchlib(opset_version=OPSET)

    class Cond(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN202
            return torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))

    class Counter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x):  # noqa: ANN001, ANN202
            self.n.add_(1)
            return x + self.n

    class Plain(torch.nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN202
            return (x + 1).relu()

    x = torch.randn(3)
    assert nothing_to_decompose(torch.export.export(Plain(), (x,)), reg)
    assert not nothing_to_decompose(torch.export.export(Cond(), (x,)), reg)
    assert not nothing_to_decompose(torch.export.export(Counter(), (x,)), reg)
    assert not nothing_to_decompose(torch.export.export(Plain(), (x,)), object())  # unknown registry layout


# -- export cache -----------------------------------------------------------------------------------


def _plan_scaled(k: float) -> Plan:
    @func2plan(args_shape=[(-1,)], state=(torch.tensor(k),))
    def scaled(x, state):
        (s,) = state.read()
        return x * s

    return scaled


def test_rebuild_hits_memory_then_disk_cache(cache_dir: Path) -> None:
    first = _plan_scaled(2.0)
    exports = cache_stats.exports
    hits = cache_stats.memory_hits
    second = _plan_scaled(2.0)
    assert (cache_stats.exports, cache_stats.memory_hits) == (exports, hits + 1)
    assert second.variants[0].data == first.variants[0].data
    files = list(cache_dir.glob("*.onnx"))
    assert files and all(f.stat().st_size > 0 for f in files)

    clear_cache()  # memory only: a new process would find the files
    assert cache_stats.exports == cache_stats.memory_hits == cache_stats.disk_hits == 0
    third = _plan_scaled(2.0)
    assert (cache_stats.exports, cache_stats.disk_hits) == (0, 1)
    assert third.id == first.id
    torch.testing.assert_close(third(torch.arange(4.0)), torch.arange(4.0) * 2)


def test_changed_state_or_code_misses_the_cache() -> None:
    _plan_scaled(3.0)
    exports = cache_stats.exports
    other = _plan_scaled(4.0)  # same code, other state value
    assert cache_stats.exports == exports + 1
    torch.testing.assert_close(other(torch.ones(3)), torch.full((3,), 4.0))

    def make(offset: float) -> Plan:
        @func2plan(args_shape=[(2,)])
        def shifted(x):
            return x + offset  # a closure value: part of the key

        return shifted

    make(1.0)
    before = cache_stats.exports
    assert make(1.0) is not None and cache_stats.exports == before
    torch.testing.assert_close(make(5.0)(torch.zeros(2)), torch.full((2,), 5.0))
    assert cache_stats.exports == before + 1


class _Peered(Plan):
    """Two layers that name each other in plain lists: a cycle the cache key's walk must end."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)
        self.a.peers, self.b.peers = [self.b], [self.a]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_modules_naming_each_other_build() -> None:
    torch.manual_seed(0)
    plan = _Peered()
    plan.build(torch.randn(2, 3), dynamic_axes=[(0,)])
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(plan(x), plan.b(plan.a(x)), rtol=1e-5, atol=1e-6)


def test_a_module_deep_in_containers_keys_the_cache() -> None:
    """Containers nest without a depth bound in the key (only plain objects' attributes are bounded): a weight
    changed four containers down is a new key, not a stale hit that verification has to catch."""
    net = nn.Linear(2, 2)
    config = {"stages": [{"blocks": ({"layer": net},)}]}

    def make() -> Plan:
        @func2plan(args_shape=[(2,)])
        def deep(x):
            return config["stages"][0]["blocks"][0]["layer"](x)

        return deep

    make()
    exports, hits = cache_stats.exports, cache_stats.memory_hits
    with torch.no_grad():
        net.weight.add_(1.0)
    plan = make()
    assert (cache_stats.exports, cache_stats.memory_hits) == (exports + 1, hits)  # a new key: no stale hit
    with torch.no_grad():
        torch.testing.assert_close(plan(torch.ones(2)), net(torch.ones(2)))


def test_stale_cache_entry_is_detected_and_reexported() -> None:
    def build() -> Plan:
        @func2plan(args_shape=[(3,)])
        def configured(x):
            return x * CONFIG["scale"]

        return configured

    CONFIG["scale"] = 2.0
    build()
    exports = cache_stats.exports
    CONFIG["scale"] = 3.0
    plan = build()  # same key, but the cached graph multiplies by 2: verification rejects it
    assert cache_stats.exports == exports + 1
    torch.testing.assert_close(plan(torch.ones(3)), torch.full((3,), 3.0))


def test_disk_cache_can_be_disabled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``PLANWIRE_CACHE_DIR=""`` writes no file anywhere: not in the default ~/.cache/planwire (HOME is
    tmp_path here), not relative to the working directory (also tmp_path), and a process that starts
    over (memory cleared) exports again instead of finding the bytes on disk."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLANWIRE_CACHE_DIR", "")

    def build() -> Plan:
        @func2plan(args_shape=[(2,)])
        def nodisk(x):
            return x - 1

        return nodisk

    clear_cache()
    first = build()
    assert (cache_stats.exports, cache_stats.disk_hits) == (1, 0)  # a real export, offered to the cache
    assert build().id == first.id and cache_stats.memory_hits == 1  # the memory cache still works
    clear_cache()  # as a new process: only a disk entry could answer now
    again = build()
    assert (cache_stats.exports, cache_stats.disk_hits) == (1, 0) and again.id == first.id
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == []

    monkeypatch.delenv("PLANWIRE_CACHE_DIR")  # the control: the default directory is where we looked
    clear_cache()
    build()
    assert [p.parent.relative_to(tmp_path) for p in tmp_path.rglob("*.onnx")] == [Path(".cache/planwire")]


# -- graph hygiene ----------------------------------------------------------------------------------


def test_exported_graph_is_standard_and_self_contained() -> None:
    class Block(Plan):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.norm(x)
            a, _ = self.attn(h, h, h, need_weights=False)
            return F.gelu(a) + x

    torch.manual_seed(0)
    block = Block().eval()
    block.build(torch.randn(2, 5, 8), dynamic_axes=[(0, 1)])
    model = onnx.load_from_string(block.variants[0].data)
    assert not model.functions
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {OPSET}
    assert OPSET >= 18
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    # no exporter debug info (FX dumps, stack traces with local paths) travels with the plan
    assert all(not n.metadata_props and not n.doc_string for n in model.graph.node)
    assert not model.graph.metadata_props  # torch.export's signature text names FX nodes and symbols
    assert b"stack_trace" not in block.variants[0].data and b".py" not in block.variants[0].data
    onnx.checker.check_model(model, full_check=True)
    for b, t in ((1, 1), (3, 9)):
        x = torch.randn(b, t, 8)
        torch.testing.assert_close(block(x), block.eager(x).detach(), rtol=1e-5, atol=1e-5)


def test_float16_outputs_keep_their_dtype() -> None:
    """torch 2.13 drops the final down-cast of type-promoted float16 outputs; the exporter restores it."""

    @func2plan(args_shape=[(-1, 4)], args_dtypes=torch.float16)
    def half(x):
        return x.abs(), x.sum(0)

    assert [s.dtype for s in half.variants[0].outputs] == ["float16", "float16"]
    x = torch.randn(5, 4, dtype=torch.float16)
    for g, w in zip(half(x), half.eager(x), strict=True):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)


def test_state_initializers_are_named_and_kept(affine: Plan) -> None:
    model = onnx.load_from_string(affine.variants[0].data)
    init = {t.name: t for t in model.graph.initializer}
    assert "state.0" in init
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(init["state.0"]), [0.5, -1.0, 2.0])


# -- files ------------------------------------------------------------------------------------------


def test_saved_file_runs_in_plain_onnxruntime(affine: Plan, saved: Path) -> None:
    sess = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "bias"]
    assert [o.name for o in sess.get_outputs()] == ["output_0", "output_1"]
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    b = np.array([1.0, 2.0, 3.0], np.float32)
    y, s = sess.run(None, {"x": x, "bias": b})
    want = x * np.array([0.5, -1.0, 2.0], np.float32) + b
    np.testing.assert_allclose(y, want, rtol=1e-6)
    np.testing.assert_allclose(s, want.sum(-1), rtol=1e-5)
    assert saved.read_bytes() == affine.variants[0].data


def test_saved_metadata(saved: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(saved)).metadata_props}
    assert meta[META_NAME] == "affine" and meta[META_FORMAT] == "1" and meta[META_KIND] == "function"
    inputs = json.loads(meta[META_INPUTS])
    assert [(i["name"], i["role"], i["dtype"]) for i in inputs] == [("x", "arg", "float"), ("bias", "arg", "float")]
    assert isinstance(inputs[0]["shape"][0], str) and inputs[0]["shape"][1] == 3 and inputs[1]["shape"] == [3]
    outputs = json.loads(meta[META_OUTPUTS])
    assert [(o["name"], o["role"], o["dtype"]) for o in outputs] == [
        ("output_0", "output", "float"),
        ("output_1", "output", "float"),
    ]
    assert outputs[0]["shape"][0] == inputs[0]["shape"][0]
    assert json.loads(meta[META_STATE]) == ["state.0"]


def test_load_round_trip(affine: Plan, saved: Path) -> None:
    for loaded in (load_plan(saved), load_plan(saved.read_bytes())):
        assert isinstance(loaded, LoadedPlan) and isinstance(loaded, PlanSource)
        assert loaded.name == "affine" and loaded.kind == "function" and loaded.state_names == ("state.0",)
        assert loaded.id == affine.id and loaded.variants[0].id == plan_id(saved.read_bytes())
        assert repr(loaded).startswith("<LoadedPlan affine id:" + affine.id)
        for n in (1, 4):
            x, b = torch.randn(n, 3), torch.randn(3)
            for got, want in zip(loaded(x, b), affine.eager(x, b), strict=True):
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            (torch.ones(2, 3, dtype=torch.int64), torch.ones(3)),
            "plan 'affine' does not accept these arguments: argument 0 ('x'): expected dtype float32, got int64",
        ),
        ((torch.ones(3), torch.ones(3)), "argument 0 ('x'): expected rank 2 [?, 3], got shape [3]"),
        ((torch.ones(2, 3), torch.ones(4)), "argument 1 ('bias'): expected shape [3], got [4] (axis 0)"),
        ((torch.ones(2, 3),), "expected 2 arguments, got 1"),
    ],
)
def test_loaded_plan_mismatch_is_a_type_error(saved: Path, args: tuple, message: str) -> None:
    loaded = load_plan(saved)
    with pytest.raises(TypeError) as err:
        loaded(*args)
    assert message in str(err.value)
    assert len(loaded.variants) == 1


def test_loaded_unbuilt_behaviour_and_send(affine: Plan, saved: Path) -> None:
    """A loaded plan has no Python code: a call of another rank is refused instead of building a variant,
    and send() registers the very bytes on a worker, where pointer calls run them."""
    loaded = load_plan(saved)
    with pytest.raises(TypeError, match=r"argument 0 \('x'\): expected rank 2"):
        loaded(torch.ones(3), torch.ones(3))
    assert [v.id for v in loaded.variants] == [v.id for v in affine.variants]  # nothing built
    with VirtualWorker(id="loader") as w:
        ptr = loaded.send(w)
        assert ptr is w.plan_pointer(loaded) and ptr.source is loaded
        x, b = torch.randn(5, 3), torch.tensor([1.0, 2.0, 3.0])
        y, total = ptr(w.put(x), w.put(b))
        want_y, want_total = affine.eager(x, b)
        torch.testing.assert_close(y.get(), want_y)
        torch.testing.assert_close(total.get(), want_total)
        y2, _ = loaded(w.put(x), b)  # a call with a pointer runs on that pointer's worker
        torch.testing.assert_close(y2.get(), want_y)


def test_plain_onnx_file_loads_with_file_name(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Neg", ["x"], ["y"])], "g", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    path = tmp_path / "negate.onnx"
    onnx.save(model, path)
    plan = load_plan(path)
    assert plan.name == "negate" and plan.signature() == "(x: float32[?]) -> (y: float32[?])"
    assert torch.equal(plan(torch.tensor([1.0, -2.0])), torch.tensor([-1.0, 2.0]))


def test_external_data_is_rejected(tmp_path: Path) -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])
    w = onnx.numpy_helper.from_array(np.ones(2, np.float32), "w")
    w.data_location = onnx.TensorProto.EXTERNAL
    w.ClearField("raw_data")
    w.external_data.add(key="location", value="secret.bin")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    data = onnx.helper.make_model(graph).SerializeToString()
    with pytest.raises(ValueError, match="not a loadable plan"):
        load_plan(data)


# -- failures ---------------------------------------------------------------------------------------


def test_unsupported_op_names_plan_and_op() -> None:
    with pytest.raises(PlanBuildError) as err:

        @func2plan(args_shape=[(2,)])
        def uses_triple(x):
            return triple(x) + 1

    e = err.value
    assert isinstance(e, RuntimeError)
    assert e.plan == "uses_triple" and e.op == "planwire_test.triple.default"
    lines = str(e).splitlines()
    assert lines[0] == (
        "plan 'uses_triple' could not be exported to ONNX at op planwire_test.triple.default: "
        "it has no ONNX translation"
    )
    assert re.fullmatch(r"  at tests/test_export\.py:\d+: return triple\(x\) \+ 1", lines[1]), lines[1]
    assert "custom_translation_table" in lines[2] and len(lines) == 4
    assert isinstance(e.__cause__, torch.onnx.OnnxExporterError)


def test_compare_tolerances() -> None:
    a = np.array([1.0, 2.0, np.nan], np.float32)
    compare([a + 1e-6], [a], plan="p", names=["y"])
    with pytest.raises(PlanBuildError, match=r"plan 'p' output 'y' differs from eager .*1 of 3 elements"):
        compare([a + np.array([0, 1e-3, 0], np.float32)], [a], plan="p", names=["y"])
    with pytest.raises(PlanBuildError, match="ONNX gives int32, eager torch int64"):
        compare([np.zeros(2, np.int32)], [np.zeros(2, np.int64)], plan="p", names=["y"])
    with pytest.raises(PlanBuildError, match=r"shape \[3\], eager torch \[2\]"):
        compare([np.zeros(3)], [np.zeros(2)], plan="p", names=["y"])
    with pytest.raises(PlanBuildError, match="differs"):
        compare([np.array([1, 2])], [np.array([1, 3])], plan="p", names=["y"])
