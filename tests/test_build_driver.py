"""The one build driver (exporter/build.py): every kind of plan is cached, stamped and verified alike.

Properties guarded here: a build whose verification fails leaves nothing in the cache (plain plans and
training plans); every kind of plan carries metadata from the one writer (its format from one constant);
a build stores its export under exactly one key (a gradient function used to be cached twice).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from planwire.exporter import PlanBuildError, cache, func2plan, metadata
from planwire.exporter.errors import root_cause
from planwire.exporter.onnx_passes import has_random_ops, iter_nodes
from planwire.exporter.optim import SGD
from planwire.exporter.training import build_function_step, build_training_step, decompositions
from planwire.exporter.training import trace as training_trace
from planwire.transport.spec import META_FORMAT, META_KIND, META_OUTPUTS


def _meta(data: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}


@pytest.fixture
def disk_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh on-disk cache directory for the test's builds."""
    monkeypatch.setenv("PLANWIRE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_a_plan_that_fails_verification_is_not_cached(disk_cache: Path) -> None:
    """The plan's Python reads a counter that every call bumps, so the traced graph (one call's
    constant) differs from the eager references (other calls'): verification fails, nothing is kept."""
    calls = [0.0]

    def drifting(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1.0
        return x * calls[0]

    before = set(cache.keys())
    with pytest.raises(PlanBuildError, match=r"output 'output'.*differs from eager torch"):
        func2plan(args_shape=[(-1, 3)], name="drifting")(drifting)
    assert calls[0] >= 3  # the references and the export did run
    assert set(cache.keys()) == before
    assert list(disk_cache.iterdir()) == []


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_a_training_step_that_fails_verification_is_not_cached(
    disk_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the core decompositions the exported cross-entropy gradient is wrong (NOTES.md)."""
    only_ours = dict(decompositions.BACKWARD_DECOMPOSITIONS)
    monkeypatch.setattr(training_trace, "training_decompositions", lambda: only_ours)
    before = set(cache.keys())
    exports = cache.stats.exports
    with pytest.raises(PlanBuildError, match=r"new\.param\..*differs from eager torch"):
        build_training_step(_tiny(), F.cross_entropy, SGD(0.5), [(-1, 4), (-1,)], name="wrong-grad-uncached")
    assert cache.stats.exports == exports + 1  # it was exported, then refused
    assert set(cache.keys()) == before
    assert list(disk_cache.iterdir()) == []


def test_every_kind_of_plan_is_stamped_by_the_one_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format version comes from metadata.FORMAT for plain, gradient-function and training plans
    (a second writer with its own constant would keep writing "1"), cached builds included."""
    monkeypatch.setattr(metadata, "FORMAT", "test-format")

    @func2plan(args_shape=[(-1, 3)], name="stamped_plain")
    def plain(x: torch.Tensor) -> torch.Tensor:
        return x.exp() + 1

    @func2plan(args_shape=[(-1, 3)], name="stamped_grad")
    def gradient(x: torch.Tensor) -> torch.Tensor:
        return torch.func.grad(lambda t: (t.sin() ** 2).sum())(x)

    function = build_function_step(lambda x: {"y": x.cos()}, [torch.randn(3, 2)], dynamic=[[0]], name="stamped_fn")
    step = build_training_step(_tiny(), F.cross_entropy, SGD(0.1), [(-1, 4), (-1,)], name="stamped_step")
    kinds = {}
    for data in (plain.variants[0].data, gradient.variants[0].data, function.data, step.data):
        meta = _meta(data)
        assert meta[META_FORMAT] == "test-format"
        kinds[meta["planwire.name"]] = meta[META_KIND]
    assert kinds == {
        "stamped_plain": "function",
        "stamped_grad": "function",
        "stamped_fn": "function",
        "stamped_step": "training",
    }
    outputs = json.loads(_meta(step.data)[META_OUTPUTS])
    assert {o["name"]: o["binds"] for o in outputs if "binds" in o} == step.bindings
    x = torch.randn(5, 3)
    torch.testing.assert_close(gradient(x), 2 * x.sin() * x.cos())


def test_one_build_is_cached_under_one_key(disk_cache: Path) -> None:
    """A plain plan, a gradient function plan and a training step each add exactly one cache entry, and
    a rebuild is served from it (no export)."""

    def grad_plan() -> object:
        @func2plan(args_shape=[(-1, 2)], name="one_key_grad")
        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(lambda t: (t.tanh() * 3).sum())(x)

        return f

    def plain_plan() -> object:
        @func2plan(args_shape=[(-1, 2)], name="one_key_plain")
        def g(x: torch.Tensor) -> torch.Tensor:
            return x.tanh() * 7

        return g

    def training() -> object:
        model = nn.Sequential(nn.Linear(3, 2))
        return build_training_step(model, F.mse_loss, SGD(0.1), [(-1, 3), (-1, 2)], name="one_key_step")

    for make in (plain_plan, grad_plan, training):
        before = set(cache.keys())
        make()
        added = set(cache.keys()) - before
        assert len(added) == 1, make.__name__
        assert sorted(p.stem for p in disk_cache.glob("*.onnx")) == sorted(added)
        for p in disk_cache.glob("*.onnx"):
            p.unlink()
        exports = cache.stats.exports
        make()
        assert cache.stats.exports == exports, f"{make.__name__}: a rebuild exported again"
        assert set(cache.keys()) - before == added


def test_graph_walks_see_subgraphs() -> None:
    """A random op inside an If branch makes the plan random (compared by dtype and shape only)."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    branch = helper.make_graph([helper.make_node("RandomUniform", [], ["y"], shape=[2])], "then", [], [out])
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=helper.make_tensor("c", TensorProto.FLOAT, [2], [1, 2]))],
        "else",
        [],
        [out],
    )
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)], "g", [cond], [out]
    )
    model = helper.make_model(graph)
    assert sorted(n.op_type for n in iter_nodes(model.graph)) == ["Constant", "If", "RandomUniform"]
    assert has_random_ops(model)
    del model.graph.node[0].attribute[:]
    assert not has_random_ops(model)


def test_root_cause_is_the_innermost_first_line() -> None:
    try:
        try:
            raise ValueError("  inner\nmore detail")
        except ValueError as e:
            raise RuntimeError("the exporter's advice") from e
    except RuntimeError as outer:
        assert root_cause(outer) == "ValueError: inner"


def test_the_export_rewrite_rules_are_part_of_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """decompose's rules shape exported graphs: an edited rule changes every cache key (no old graph)."""
    from planwire.exporter import build

    assert "def _batch_norm" in build.rewrites_source() and "RULES" in build.rewrites_source()
    before = build.cache_key("plan-function", "same", "parts")
    monkeypatch.setattr(build, "rewrites_source", lambda: "an edited rule")
    assert build.cache_key("plan-function", "same", "parts") != before
