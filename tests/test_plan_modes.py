"""Plans built from layers in training mode (BatchNorm, Dropout) and in eval mode.

A plan computes what eager torch computes for the call, in the mode its layers are in: BatchNorm in
training mode normalizes with the batch's own statistics (torch.onnx's torchlib exports it with the
running ones; planwire's translation fixes that). A plan updates no running statistics, and building one
never changes the user's module: one TrainingModeWarning says so, naming the layers.
"""

from __future__ import annotations

import copy
import functools
import types
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from planwire.exporter import Plan, TrainingModeWarning, func2plan
from planwire.exporter.export import export_model
from planwire.exporter.plan import eager


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLANWIRE_CACHE_DIR", str(tmp_path_factory.mktemp("plan-cache")))
        yield


class _Wrap(Plan):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _with_stats(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Running statistics far from any batch's, so normalizing with the wrong ones shows."""
    with torch.no_grad():
        bn.running_mean.uniform_(2.0, 3.0)
        bn.running_var.uniform_(4.0, 5.0)
    return bn


def _buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in module.named_buffers()}


def _eager(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eager torch's output for ``x``, leaving the module's buffers as they were."""
    saved = copy.deepcopy(module.state_dict())
    with torch.no_grad():
        out = module(x)
    module.load_state_dict(saved)
    return out


def _assert_same_buffers(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = dict(module.named_buffers())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed"


_TRAINING_BATCH_NORMS = {
    "BatchNorm1d on (N, C)": (lambda: nn.Sequential(nn.Linear(4, 6), _with_stats(nn.BatchNorm1d(6))), (8, 4), "1"),
    "BatchNorm1d on (N, C, L)": (lambda: nn.Sequential(_with_stats(nn.BatchNorm1d(3))), (4, 3, 5), "0"),
    "conv, BatchNorm2d without affine, momentum=None": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), _with_stats(nn.BatchNorm2d(3, affine=False, momentum=None))),
        (4, 2, 6, 6),
        "1",
    ),
}


@pytest.mark.parametrize("case", list(_TRAINING_BATCH_NORMS))
def test_training_mode_batch_norm_computes_the_batch_statistics(case: str) -> None:
    make, shape, layer = _TRAINING_BATCH_NORMS[case]
    torch.manual_seed(0)
    model = make()
    plan = _Wrap(model)  # nn.Module's default: training mode
    before = _buffers(model)
    with pytest.warns(TrainingModeWarning, match=rf"'model\.{layer}' \(BatchNorm\dd\).*running_mean") as caught:
        plan.build(torch.randn(*shape), dynamic_axes=[(0,)])
    assert len([w for w in caught if w.category is TrainingModeWarning]) == 1
    _assert_same_buffers(model, before)  # neither tracing nor the verification runs moved a statistic
    for batch in (2, 5, 17):
        x = torch.randn(batch, *shape[1:])
        got = plan(x)
        want = _eager(model, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, _eager(copy.deepcopy(model).eval(), x), atol=1e-2)  # not the running ones
    _assert_same_buffers(model, before)  # nor did running the plan


def test_eval_mode_batch_norm_uses_the_running_statistics_without_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _with_stats(nn.BatchNorm1d(6)), nn.Dropout(0.5)).eval()
    plan = _Wrap(model).eval()
    before = _buffers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingModeWarning)
        plan.build(torch.randn(8, 4), dynamic_axes=[(0,)])
    _assert_same_buffers(model, before)
    x = torch.randn(3, 4)
    torch.testing.assert_close(plan(x), _eager(model, x), rtol=1e-5, atol=1e-5)


def test_training_mode_is_part_of_the_cache_key() -> None:
    """The same weights built in eval then training mode give two graphs, each right for its mode."""
    torch.manual_seed(0)
    model = nn.Sequential(_with_stats(nn.BatchNorm1d(5)))
    x = torch.randn(6, 5)
    plan = _Wrap(model).eval()
    plan.build(x, dynamic_axes=[(0,)])
    torch.testing.assert_close(plan(x), _eager(model, x), rtol=1e-5, atol=1e-5)
    plan.train()
    with pytest.warns(TrainingModeWarning):
        plan.build(x, dynamic_axes=[(0,)])
    torch.testing.assert_close(plan(x), _eager(model, x), rtol=1e-5, atol=1e-5)
    assert abs(float(plan(x).mean())) < 1e-5  # batch statistics: each channel's mean is the bias, 0


def test_function_plan_reading_a_training_mode_model_leaves_its_statistics_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), _with_stats(nn.BatchNorm1d(3)), nn.ReLU())
    before = _buffers(net)

    with pytest.warns(TrainingModeWarning, match=r"'net\.1' \(BatchNorm1d\)"):

        @func2plan(args_shape=[(-1, 4)])
        def scores(x):
            return net(x) * 2

    _assert_same_buffers(net, before)  # the eager reference runs of the build restored them
    x = torch.randn(7, 4)
    torch.testing.assert_close(scores(x), _eager(net, x) * 2, rtol=1e-5, atol=1e-5)


def test_functional_batch_norm_in_training_mode_on_plan_state() -> None:
    """``F.batch_norm(..., training=True)`` with running statistics in the plan's state: the graph
    normalizes with the batch's statistics, and the state is not updated by building or running."""

    @func2plan(args_shape=[(-1, 3, 4)], state=[torch.full((3,), 2.0), torch.full((3,), 4.0)])
    def norm(x, state):
        running_mean, running_var = state.read()
        return F.batch_norm(x, running_mean, running_var, training=True, momentum=0.5)

    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(norm(x), F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    running_mean, running_var = norm.state.read()
    assert torch.equal(running_mean, torch.full((3,), 2.0)) and torch.equal(running_var, torch.full((3,), 4.0))


def test_training_translation_returns_torchs_running_statistics() -> None:
    """The translation's running-statistics outputs follow torch's update (unbiased variance, momentum):
    exported here as graph outputs through a module that returns them."""

    class Update(nn.Module):
        def forward(self, x, mean, var):
            out, _, _, new_mean, new_var = torch.ops.aten._native_batch_norm_legit_functional(
                x, None, None, mean, var, True, 0.3, 1e-5
            )
            return out, new_mean, new_var

    x, mean, var = torch.randn(6, 3, 2), torch.rand(3), torch.rand(3) + 1
    with eager():
        proto = export_model(
            Update(),
            [x, mean, var],
            plan="update",
            input_names=["x", "mean", "var"],
            output_names=["out", "new_mean", "new_var"],
            dynamic=[{0}, set(), set()],
        )
    import onnxruntime as ort

    got = ort.InferenceSession(proto.SerializeToString()).run(
        None, {"x": x.numpy(), "mean": mean.numpy(), "var": var.numpy()}
    )
    want_mean, want_var = mean.clone(), var.clone()
    want = F.batch_norm(x, want_mean, want_var, training=True, momentum=0.3)
    for g, w in zip(got, (want, want_mean, want_var), strict=True):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)


def test_training_mode_dropout_says_so_and_stays_random() -> None:
    plan = _Wrap(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0), nn.Dropout(0.5)))
    with pytest.warns(TrainingModeWarning, match=r"'model\.2' \(Dropout\).*fresh random") as caught:
        plan.build(torch.randn(3, 4), dynamic_axes=[(0,)])
    assert "model.1" not in str(caught[0].message)  # p=0 drops nothing: not worth a word
    x = torch.randn(64, 4)
    out = plan(x)
    linear = plan.model[0](x).detach()
    dropped = out == 0
    assert 0.3 < float(dropped.float().mean()) < 0.7
    torch.testing.assert_close(out[~dropped], (linear * 2)[~dropped], rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():  # said once per plan, not per rebuild
        warnings.simplefilter("error", TrainingModeWarning)
        plan.build(torch.randn(3, 4), dynamic_axes=[(0,)])


def test_function_plan_with_random_dropout_says_so() -> None:
    with pytest.warns(TrainingModeWarning, match=r"'noisy' draws random numbers.*training=False"):

        @func2plan(args_shape=[(-1, 8)])
        def noisy(x):
            return F.dropout(x, 0.5) + 1  # F.dropout's training defaults to True

    out = noisy(torch.ones(32, 8))
    assert set(out.unique().tolist()) == {1.0, 3.0}  # dropped, or kept and scaled by 1 / (1 - p)

    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingModeWarning)

        @func2plan(args_shape=[(-1, 8)])
        def quiet(x):
            return F.dropout(x, 0.5, training=False) + 1

    torch.testing.assert_close(quiet(torch.ones(3, 8)), torch.full((3, 8), 2.0))


def test_two_threads_building_over_one_training_mode_model_both_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The export switches BatchNorm's track_running_stats off while it runs: another thread's build
    over the same model must still see the layer in training mode (flags read under the export lock,
    before the build), and the flag is back once both are done. (The messages are taken where they are
    made: the warnings module's own catch_warnings is not thread-safe, and the exporter uses it.)"""
    import threading

    from planwire.exporter import modes

    made: list[str] = []
    real = modes.training_mode_warning

    def recording(*args: object, **kwargs: object) -> str | None:
        message = real(*args, **kwargs)  # type: ignore[arg-type]
        made.append(message or "")
        return message

    monkeypatch.setattr(modes, "training_mode_warning", recording)
    # Tracing in two threads at once trips CPython 3.11's AST recursion check: the second build starts
    # once the first is exporting, inside the export lock that also serializes torch's tracing.
    from planwire.exporter import plan as plan_module

    exporting = threading.Event()
    real_export = plan_module.export_model

    def export_model(*args: object, **kwargs: object) -> object:
        exporting.set()
        return real_export(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(plan_module, "export_model", export_model)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _with_stats(nn.BatchNorm1d(6)))
    plans = [_Wrap(model), _Wrap(model)]
    for i, plan in enumerate(plans):
        plan.name = f"threads_{i}"
    errors: list[BaseException] = []

    def build(plan: Plan) -> None:
        try:
            plan.build(torch.randn(8, 4), dynamic_axes=[(0,)])
        except BaseException as e:  # reported below
            errors.append(e)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        threads = [threading.Thread(target=build, args=(p,)) for p in plans]
        threads[0].start()
        assert exporting.wait(timeout=600)  # the second build starts while the first exports (flags off)
        threads[1].start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(2):
        assert any(f"'threads_{i}'" in m and "'model.1' (BatchNorm1d)" in m for m in made), made
    assert model[1].track_running_stats


def test_a_thread_running_the_model_during_a_build_updates_its_running_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a build exports a training-mode BatchNorm (tracing it as tracking no statistics), another thread
    runs the same model eagerly: it sees the layer tracking, and its running statistics update."""
    import threading

    from planwire.exporter import plan as plan_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _with_stats(nn.BatchNorm1d(6)))
    bn = model[1]
    seen: list[object] = []

    def eager_step() -> None:
        try:
            before, count = bn.running_mean.clone(), int(bn.num_batches_tracked)
            with torch.no_grad():
                model(torch.randn(8, 4))
            seen.extend([bn.track_running_stats, not torch.equal(bn.running_mean, before)])
            seen.append(int(bn.num_batches_tracked) - count)
        except BaseException as e:  # reported below
            seen.append(e)

    real_export = plan_module.export_model

    def export_model(*args: object, **kwargs: object) -> object:
        other = threading.Thread(target=eager_step)  # while the build holds the layer's export view
        other.start()
        other.join()
        return real_export(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(plan_module, "export_model", export_model)
    plan = _Wrap(model)
    plan.name = "eager_beside"
    with pytest.warns(TrainingModeWarning):
        plan.build(torch.randn(8, 4), dynamic_axes=[(0,)])
    assert seen == [True, True, 1]
    assert bn.track_running_stats and "track_running_stats" not in nn.modules.batchnorm._BatchNorm.__dict__
    x = torch.randn(5, 4)
    torch.testing.assert_close(plan(x), _eager(model, x), rtol=1e-5, atol=1e-5)


def test_the_export_view_holds_under_torch_exports_strict_mode_too() -> None:
    """torch.onnx.export falls back to torch.export's strict mode (dynamo), which traces the view's descriptor
    itself: it must read it off there as well (a momentum=None BatchNorm cannot be captured tracking)."""
    from planwire.exporter import modes

    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=None))
    with modes.exportable([("model", model)]):
        program = torch.export.export(model, (torch.randn(8, 4),), strict=True)
    assert model[1].track_running_stats and int(model[1].num_batches_tracked) == 0
    x = torch.randn(8, 4)  # (the program is captured for this batch size)
    torch.testing.assert_close(program.module()(x), _eager(model, x), rtol=1e-5, atol=1e-5)


_INDIRECT_NET = nn.Sequential(nn.Linear(4, 3), _with_stats(nn.BatchNorm1d(3)))
_INDIRECT_MODELS = {"m": nn.Sequential(_with_stats(nn.BatchNorm1d(4)))}


def _indirect_helper(x: torch.Tensor) -> torch.Tensor:
    return _INDIRECT_NET(x)


class _ListHolder(Plan):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.models = [net]  # a plain list: not a registered submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.models[0](x)


class _Holder:
    """A plain object holding a model: neither a container nor a Plan."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net


_HELD = _Holder(nn.Sequential(nn.Linear(4, 3), _with_stats(nn.BatchNorm1d(3))))


def _through_holder(x: torch.Tensor) -> torch.Tensor:
    return _HELD.net(x) - 1


def _through_closure_holder(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    config = types.SimpleNamespace(scale=3.0, model=net)

    def through(x: torch.Tensor) -> torch.Tensor:
        return config.model(x) * config.scale

    return through


def _apply(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x) + 2


_PARTIAL = functools.partial(_apply, nn.Sequential(nn.Linear(4, 3), _with_stats(nn.BatchNorm1d(3))))
_BOUND = nn.Sequential(nn.Linear(4, 3), _with_stats(nn.BatchNorm1d(3))).forward


def _through_partial(x: torch.Tensor) -> torch.Tensor:
    return _PARTIAL(x)


def _through_method(x: torch.Tensor) -> torch.Tensor:
    return _BOUND(x)


def _through_helper(x: torch.Tensor) -> torch.Tensor:
    return _indirect_helper(x) * 2


def _through_dict(x: torch.Tensor) -> torch.Tensor:
    return _INDIRECT_MODELS["m"](x) + 1


@pytest.mark.parametrize(
    "how", ["helper", "dict", "plan list", "object attribute", "closure object attribute", "partial", "bound method"]
)
def test_modules_reached_indirectly_warn_and_keep_their_statistics(how: str) -> None:
    """A model reached through a helper function, a dict, a plain list on a Plan, or an attribute of a plain
    object (a global, a closure variable): the build warns, computes the batch statistics, and leaves the
    running statistics as they were."""
    torch.manual_seed(0)
    if how == "helper":
        model, fn, layer = _INDIRECT_NET, _through_helper, r"'_INDIRECT_NET\.1'"
    elif how == "dict":
        model, fn, layer = _INDIRECT_MODELS["m"], _through_dict, r"\"_INDIRECT_MODELS\['m'\]\.0\""
    elif how == "object attribute":
        model, fn, layer = _HELD.net, _through_holder, r"'_HELD\.net\.1'"
    elif how == "partial":
        model, fn, layer = _PARTIAL.args[0], _through_partial, r"'_PARTIAL\.args\[0\]\.1'"
    elif how == "bound method":
        model, fn, layer = _BOUND.__self__, _through_method, r"'_BOUND\.__self__\.1'"
    elif how == "closure object attribute":
        model = nn.Sequential(nn.Linear(4, 4), _with_stats(nn.BatchNorm1d(4)))
        fn, layer = _through_closure_holder(model), r"'config\.model\.1'"
    else:
        model, fn, layer = nn.Sequential(nn.Linear(4, 4), _with_stats(nn.BatchNorm1d(4))), None, r"'models\[0\]\.1'"
    before = _buffers(model)
    with pytest.warns(TrainingModeWarning, match=layer + r" \(BatchNorm1d\)"):
        if fn is None:
            plan: Plan = _ListHolder(model)
            plan.name = "indirect_list"
            plan.build(torch.randn(6, 4), dynamic_axes=[(0,)])
        else:
            plan = func2plan(args_shape=[(-1, 4)], name=f"indirect_{how}")(fn)
    _assert_same_buffers(model, before)
    x = torch.randn(5, 4)
    want = _eager(model, x)
    want = {
        "helper": want * 2,
        "dict": want + 1,
        "object attribute": want - 1,
        "closure object attribute": want * 3,
        "partial": want + 2,
    }.get(how, want)
    torch.testing.assert_close(plan(x), want, rtol=1e-5, atol=1e-5)
    _assert_same_buffers(model, before)


def test_a_mutated_constant_export_error_names_the_fix() -> None:
    """A training-mode BatchNorm reached in a way planwire does not follow (an object's attribute): the
    export error says to call .eval() or make the model a Plan attribute."""
    from planwire.exporter import PlanBuildError

    class Holder:
        net = nn.Sequential(nn.BatchNorm1d(3))

    holder = Holder()
    with pytest.raises(PlanBuildError, match=r"(?s)is mutated.*\.eval\(\).*attribute of the Plan"):

        @func2plan(args_shape=[(-1, 3)], name="mutated_constant")
        def f(x: torch.Tensor) -> torch.Tensor:
            return holder.net(x)


def test_a_parameter_of_a_model_held_by_an_object_is_part_of_the_cache_key() -> None:
    """``holder.net``'s weights changed in place: the rebuild is a new export under a new key, neither served
    from the cache nor found stale there by the verification."""
    from planwire.exporter import cache_stats

    torch.manual_seed(0)
    holder = _Holder(nn.Sequential(nn.Linear(4, 4)).eval())

    def build() -> Plan:
        @func2plan(args_shape=[(-1, 4)], name="held_key")
        def f(x: torch.Tensor) -> torch.Tensor:
            return holder.net(x)

        return f

    build()
    hits, exports = (cache_stats.memory_hits, cache_stats.disk_hits), cache_stats.exports
    with torch.no_grad():
        holder.net[0].weight.add_(0.5)
    plan = build()
    assert (cache_stats.memory_hits, cache_stats.disk_hits) == hits
    assert cache_stats.exports == exports + 1
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(plan(x), holder.net(x), rtol=1e-5, atol=1e-5)


_KEYED_MODELS = {"m": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))}


def _read_keyed(x: torch.Tensor) -> torch.Tensor:
    return _KEYED_MODELS["m"](x)


def test_a_model_inside_a_dict_is_part_of_the_cache_key() -> None:
    """Built in training mode (a random Dropout graph, cached), then .eval(): the rebuild must not serve
    the cached random graph (random graphs verify shapes only)."""
    torch.manual_seed(0)
    with pytest.warns(TrainingModeWarning):
        func2plan(args_shape=[(-1, 4)], name="keyed")(_read_keyed)
    _KEYED_MODELS["m"].eval()
    try:
        plan = func2plan(args_shape=[(-1, 4)], name="keyed")(_read_keyed)
        x = torch.randn(3, 4)
        with torch.no_grad():
            want = _KEYED_MODELS["m"](x)
        torch.testing.assert_close(plan(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plan(x), want, rtol=1e-5, atol=1e-5)
    finally:
        _KEYED_MODELS["m"].train()
