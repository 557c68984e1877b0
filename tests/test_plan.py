"""Plans as users write them (the PySyft 0.2 tutorial cells): build, call, variants, send, repr, errors.

Everything runs real torch exports and real onnxruntime; every result is compared with eager torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import planwire as sy
from planwire.exporter import NOT_BUILT, Plan, PlanBuildError, func2plan
from planwire.transport.spec import PlanSource, PlanVariant, TensorSpec
from planwire.worker import VirtualWorker


@pytest.fixture(scope="module", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLANWIRE_CACHE_DIR", str(tmp_path_factory.mktemp("plan-cache")))
        yield


class Net(Plan):
    """The tutorial's network."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


@pytest.fixture(scope="module")
def double_abs() -> Plan:
    @func2plan(args_shape=[(-1, 1)])
    def plan_double_abs(x):
        x = x + x
        return torch.abs(x)

    return plan_double_abs


@pytest.fixture(scope="module")
def plan_abs() -> Plan:
    @func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x, state):
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    return plan_abs


@pytest.fixture(scope="module")
def net() -> Net:
    torch.manual_seed(0)
    n = Net()
    n.build(torch.tensor([1.0, 2.0]))
    return n


# -- function plans ---------------------------------------------------------------------------------


def test_unbuilt_plan_cannot_be_sent_then_builds_and_runs() -> None:
    @sy.func2plan()
    def plan_double_abs(x):
        x = x + x
        return torch.abs(x)

    assert plan_double_abs.is_built is False
    assert repr(plan_double_abs) == "<Plan plan_double_abs not built>"
    with pytest.raises(RuntimeError) as err:
        plan_double_abs.send(object())
    assert str(err.value) == "A plan needs to be built before being sent to a worker." == NOT_BUILT

    plan_double_abs.build(torch.tensor([1.0, -2.0]))
    assert plan_double_abs.is_built is True
    out = plan_double_abs(torch.tensor([-1.0, 2.0]))
    assert torch.equal(out, torch.tensor([2.0, 4.0]))
    # built without args_shape: the example's shape is fixed
    assert plan_double_abs.variants[0].inputs[0].shape == (2,)


def test_dynamic_axis_is_symbolic_and_runs_at_any_size(double_abs: Plan) -> None:
    spec = double_abs.variants[0].inputs[0]
    assert isinstance(spec.shape[0], str) and spec.shape[1] == 1
    assert double_abs.variants[0].outputs[0].shape[0] == spec.shape[0]
    for n in (0, 1, 2, 5, 64):
        x = torch.randn(n, 1)
        out = double_abs(x)
        assert out.shape == (n, 1)
        torch.testing.assert_close(out, (x + x).abs())
    assert len(double_abs.variants) == 1  # every size used the one dynamic variant


def test_fixed_and_dynamic_arguments() -> None:
    @sy.func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x, y):
        s = x + y
        return torch.abs(s)

    assert plan_sum_abs.is_built
    x = torch.tensor([[1.0, -5.0]])
    for n in (1, 3, 10):
        y = torch.randn(n, 2)
        torch.testing.assert_close(plan_sum_abs(x, y), (x + y).abs())
    # x's size is fixed; a new variant is tried for (2, 2) but the code itself rejects those shapes
    with pytest.raises(TypeError) as err:
        plan_sum_abs(torch.ones(2, 2), torch.ones(3, 2))
    message = str(err.value)
    assert "plan 'plan_sum_abs' does not accept these arguments" in message
    assert "argument 0 ('x'): expected shape [1, 2], got [2, 2] (axis 0)" in message
    assert "fails on them" in message and isinstance(err.value.__cause__, PlanBuildError)
    assert len(plan_sum_abs.variants) == 1


def test_state_plan_matches_tutorial_and_builds_int64_variant(plan_abs: Plan) -> None:
    variant = plan_abs.variants[0]
    assert [(s.dtype, s.shape) for s in variant.inputs] == [("float", (1,))]
    torch.testing.assert_close(plan_abs(torch.tensor([-3.0])), torch.tensor([4.0]))
    # The tutorial calls it with int64 of another size: a second variant, exactly eager torch's result.
    out = plan_abs(torch.tensor([-1, 0]))
    assert out.dtype == torch.int64 and torch.equal(out, torch.tensor([2, 1]))
    assert len(plan_abs.variants) == 2
    assert [(s.dtype, s.shape) for s in plan_abs.variants[1].inputs] == [("int64", (2,))]
    # state is a named initializer in both graphs, not folded into the Cast the float variant needs
    for v in plan_abs.variants:
        model = onnx.load_from_string(v.data)
        assert [t.name for t in model.graph.initializer] == ["state.0"]
        assert {p.key: p.value for p in model.metadata_props}["planwire.state"] == '["state.0"]'
    assert [n.op_type for n in _model(plan_abs).graph.node] == ["Abs", "Cast", "Add"]
    assert plan_abs.variant_for([("int64", (2,))]) is plan_abs.variants[1]
    assert repr(plan_abs).endswith(" +1 variants>")


def test_variants_keep_dynamic_axes_where_rank_matches(double_abs: Plan) -> None:
    @func2plan(args_shape=[(-1, 3)])
    def scale(x):
        return x * 3

    out = scale(torch.arange(12).reshape(4, 3))
    assert out.dtype == torch.int64 and torch.equal(out, torch.arange(12).reshape(4, 3) * 3)
    assert len(scale.variants) == 2
    assert isinstance(scale.variants[1].inputs[0].shape[0], str)
    scale(torch.ones(7, 3, dtype=torch.int64))  # same int64 variant, other batch size
    assert len(scale.variants) == 2
    # another rank: no axis is inherited, a fixed-shape variant
    torch.testing.assert_close(scale(torch.ones(2, 2, 3)), torch.full((2, 2, 3), 3.0))
    assert scale.variants[2].inputs[0].shape == (2, 2, 3)


def test_several_inputs_and_outputs_every_dtype() -> None:
    for dtype in (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool):

        @func2plan(args_shape=[(-1, 3), (3,)], args_dtypes=[dtype, dtype])
        def mix(x, y):
            if x.dtype == torch.bool:
                return x & y, x | y, x ^ y
            return x * y + x, (x - y).abs(), torch.maximum(x, y)

        for n in (1, 4):
            if dtype.is_floating_point:
                x, y = torch.randn(n, 3, dtype=dtype), torch.randn(3, dtype=dtype)
            elif dtype == torch.bool:
                x, y = torch.rand(n, 3) > 0.5, torch.tensor([True, False, True])
            else:
                x, y = torch.randint(-9, 9, (n, 3), dtype=dtype), torch.randint(-9, 9, (3,), dtype=dtype)
            got, want = mix(x, y), mix.eager(x, y)
            assert len(got) == 3
            for g, w in zip(got, want, strict=True):
                assert g.dtype == dtype and g.shape == w.shape
                if dtype == torch.float16:
                    torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)
                else:
                    torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        assert len(mix.variants) == 1


def test_aliased_unused_and_scalar_ports() -> None:
    """Outputs that are an input or repeat a value, an unused input, 0-d tensors: ports keep their names."""

    @func2plan(args_shape=[(-1, 2), (), (3,)])
    def odd(x, s, unused):
        y = x * s
        return x, y, y, s + 1

    variant = odd.variants[0]
    assert [i.name for i in variant.inputs] == ["x", "s", "unused"]
    assert [o.name for o in variant.outputs] == ["output_0", "output_1", "output_2", "output_3"]
    x, s = torch.randn(5, 2), torch.tensor(3.0)
    got = odd(x, s, torch.zeros(3))
    assert torch.equal(got[0], x) and torch.equal(got[1], x * 3) and torch.equal(got[2], x * 3)
    assert got[3].shape == () and got[3].item() == 4.0


def test_args_dtypes_accepts_names_and_a_single_dtype() -> None:
    @func2plan(args_shape=[(2,), (2,)], args_dtypes="int32")
    def add(x, y):
        return x + y

    assert [s.dtype for s in add.variants[0].inputs] == ["int32", "int32"]
    out = add(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([3, 4], dtype=torch.int32))
    assert out.dtype == torch.int32 and out.tolist() == [4, 6]


def test_local_call_builds_from_the_call_tensors() -> None:
    table = torch.randn(3, 2)

    @func2plan()
    def lookup(idx):
        return F.embedding(idx, table)  # random indices in [0, 5) would be out of range

    idx = torch.tensor([2, 0, 1, 2])
    assert not lookup.is_built
    torch.testing.assert_close(lookup(idx), table[idx])
    assert lookup.is_built and [s.shape for s in lookup.variants[0].inputs] == [(4,)]


def test_wrong_argument_count_is_a_type_error(double_abs: Plan) -> None:
    with pytest.raises(TypeError, match="plan 'plan_double_abs' takes 1 arguments, got 2"):
        double_abs(torch.ones(2, 1), torch.ones(2, 1))


# -- class plans ------------------------------------------------------------------------------------


def test_class_plan_parity_and_state(net: Net) -> None:
    x = torch.tensor([-1.0, 2.0])
    torch.testing.assert_close(net(x), net.eager(x).detach())
    assert net.kind == "module"
    meta = {p.key: p.value for p in _model(net).metadata_props}
    assert meta["planwire.kind"] == "module"
    assert sorted(eval(meta["planwire.state"])) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    inits = {t.name for t in _model(net).graph.initializer}
    assert {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"} <= inits


def test_class_plan_dynamic_batch() -> None:
    class Classifier(Plan):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.norm = nn.BatchNorm1d(4)
            self.drop = nn.Dropout(0.5)
            self.head = nn.Linear(4, 3)

        def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.drop(self.norm(self.emb(tokens).mean(1)))
            logits = self.head(h)
            return logits, logits.argmax(-1)

    torch.manual_seed(1)
    model = Classifier().eval()
    model.build(torch.randint(0, 10, (2, 5)), dynamic_axes=[(0, 1)])
    spec = model.variants[0].inputs[0]
    assert spec.dtype == "int64" and all(isinstance(d, str) for d in spec.shape)
    for b, t in ((1, 1), (3, 7), (16, 2)):
        tokens = torch.randint(0, 10, (b, t))
        logits, labels = model(tokens)
        want_logits, want_labels = model.eager(tokens)
        torch.testing.assert_close(logits, want_logits.detach(), rtol=1e-5, atol=1e-5)
        assert labels.dtype == torch.int64 and torch.equal(labels, want_labels)
    assert len(model.variants) == 1


def test_training_mode_dropout_stays_random() -> None:
    class Drop(Plan):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x) + 1

    plan = Drop()  # nn.Module default: training mode, so the graph keeps a random Dropout
    plan.build(torch.ones(3, 4), dynamic_axes=[(0,)])
    out = plan(torch.full((64, 32), 3.0))
    assert out.shape == (64, 32)
    assert set(out.unique().tolist()) == {1.0, 7.0}  # dropped, or kept and scaled by 1 / (1 - p)


def test_nested_plan_is_traced_as_torch_code() -> None:
    class Inner(Plan):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    class Outer(Plan):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()
            self.scale = 2.0

        def forward(self, x):
            return self.inner(x) * self.scale

    torch.manual_seed(2)
    outer = Outer()
    outer.build(torch.randn(4, 3))
    x = torch.randn(4, 3)
    torch.testing.assert_close(outer(x), outer.eager(x).detach())
    assert "inner.lin.weight" in {t.name for t in _model(outer).graph.initializer}


def test_rebuild_after_training_ships_new_weights(net: Net) -> None:
    model = Net()
    model.build(torch.tensor([1.0, 2.0]))
    before = model.variants[0].id
    with torch.no_grad():
        model.fc2.bias.add_(1.5)
    model.build(torch.tensor([1.0, 2.0]))
    assert model.variants[0].id != before
    x = torch.tensor([0.5, -0.5])
    torch.testing.assert_close(model(x), model.eager(x).detach())


# -- display ----------------------------------------------------------------------------------------


def test_repr_and_code(double_abs: Plan, net: Net) -> None:
    text = repr(double_abs)
    pattern = (
        r"<Plan plan_double_abs id:[0-9a-f]{12} built "
        r"\(x: float32\[\?, 1\]\) -> \(output: float32\[\?, 1\]\); 0 parameters, \d+ B>"
    )
    assert re.fullmatch(pattern, text), text
    assert double_abs.id == double_abs.variants[0].id[:12]
    assert str(double_abs) == text  # print(plan) is the summary too; the graph is plan.code
    code = double_abs.code
    assert "Add (x, x)" in code and "= Abs (" in code
    assert repr(net).startswith("<Net Net id:") and "(x: float32[2]) -> (output: float32[2])" in repr(net)
    assert "LogSoftmax" in net.code


def test_plan_is_a_plan_source(double_abs: Plan, net: Net) -> None:
    assert isinstance(double_abs, PlanSource) and isinstance(net, PlanSource)
    assert double_abs.name == "plan_double_abs" and net.name == "Net"


# -- errors -----------------------------------------------------------------------------------------


def test_impure_function_fails_verification() -> None:
    calls = [0]

    def impure(x):
        calls[0] += 1
        return x + calls[0]

    with pytest.raises(PlanBuildError, match=r"plan 'impure' output 'output' .*differs from eager") as err:
        func2plan(args_shape=[(2,)])(impure)
    assert err.value.plan == "impure"


def test_eager_failure_names_the_shapes() -> None:
    message = r"plan 'baked' fails in eager torch on example arguments \(float\[5, 2\]\)"
    with pytest.raises(PlanBuildError, match=message):

        @func2plan(args_shape=[(-1, 2)])
        def baked(x):
            return x.reshape(3, 2)  # only works for the traced size

    assert isinstance(PlanBuildError("m", plan="p"), RuntimeError)


def test_plan_must_return_tensors() -> None:
    with pytest.raises(PlanBuildError, match="returns float as output 0; plans return tensors"):

        @func2plan(args_shape=[(2,)])
        def not_tensor(x):
            return 1.0


def test_func2plan_needs_parentheses() -> None:
    with pytest.raises(TypeError, match="parentheses"):
        func2plan(lambda x: x)  # type: ignore[arg-type]


# -- hook and workers -------------------------------------------------------------------------------


def test_hook_tag_and_send() -> None:
    hook = sy.TorchHook(torch)
    hook.local_worker.is_client_worker = False
    assert hook.local_worker.id == "me" and hook.local_worker.is_client_worker is False
    t = torch.tensor([-1, 2.0])
    assert t.tag("input_data", "x") is t
    assert t._planwire_tags == ("input_data", "x")
    worker = VirtualWorker(hook, id="hooked")
    ptr = t.send(worker)
    assert ptr.tags == ("input_data", "x")
    assert worker.search("x")[0].key == ptr.key
    assert torch.equal(ptr.get(), t)
    u = sy.tag(torch.ones(2), "plain")
    ptr2 = sy.send(u, worker)
    assert ptr2.tags == ("plain",) and torch.equal(ptr2.get(), torch.ones(2))


def test_tutorial_on_virtual_workers(net: Net, plan_abs: Plan) -> None:
    hook = sy.TorchHook(torch)
    x11 = torch.tensor([-1, 2.0]).tag("input_data")
    x21 = torch.tensor([-1, 2.0]).tag("input_data")
    # the tutorial's toy data is public: results computed from private data would not come back
    device_1 = VirtualWorker(hook, id="device_1", data=(x11,), public=True)
    device_2 = VirtualWorker(hook, id="device_2", data=(x21,), public=True)

    @sy.func2plan()
    def plan_double_abs(x):
        x = x + x
        return torch.abs(x)

    plan_double_abs.build(torch.tensor([1.0, -2.0]))
    pointer_plan = plan_double_abs.send(device_1)
    result = pointer_plan(device_1.search("input_data")[0])
    assert torch.equal(result.get(), torch.tensor([2.0, 4.0]))
    # a plan called on a pointer goes to the pointer's worker
    assert torch.equal(plan_double_abs(device_1.search("input_data")[0]).get(), torch.tensor([2.0, 4.0]))

    want = net.eager(torch.tensor([-1, 2.0])).detach()
    for device in (device_1, device_2):
        ptr = net.send(device)(device.search("input_data")[0])
        torch.testing.assert_close(ptr.get(), want)

    x_ptr = torch.tensor([-1, 0]).send(device_1)
    assert torch.equal(plan_abs.send(device_1)(x_ptr).get(), torch.tensor([2, 1]))


def _model(plan: Plan) -> onnx.ModelProto:
    return onnx.load_from_string(plan.variants[0].data)


def test_a_variant_remembers_answers_only_for_int_sizes_so_equal_hashing_sizes_get_their_own() -> None:
    variant = PlanVariant(b"graph", (TensorSpec("x", "float", (2, 4)), TensorSpec("n", "int64", ("batch",))), ())
    assert variant.mismatch([("float", (2.0, 3.0)), ("int64", (5,))]) == (
        "argument 0 ('x'): expected shape [2, 4], got [2.0, 3.0] (axis 1)"
    )
    # (2, 3) == (2.0, 3.0) and hashes alike: the answer quotes the shape as this call gave it
    assert variant.mismatch([("float", (2, 3)), ("int64", (5,))]) == (
        "argument 0 ('x'): expected shape [2, 4], got [2, 3] (axis 1)"
    )
    assert variant.mismatch([("float", (True, 4)), ("int64", (5,))]) == (
        "argument 0 ('x'): expected shape [2, 4], got [True, 4] (axis 0)"
    )
    assert variant.mismatch([("float", (2, 4)), ("int64", (7,))]) is None
    assert variant.mismatch([("float", [2, 4]), ("int64", [7])]) is None  # lists: answered, not remembered
    assert list(variant._fits) == [(("float", (2, 3)), ("int64", (5,))), (("float", (2, 4)), ("int64", (7,)))]


def test_a_rebuilt_plan_runs_its_new_graph_on_a_worker_it_was_sent_to() -> None:
    """A PointerPlan reuses the variant it chose for a repeated signature only while the source still has it:
    ``build`` replaces every variant, and the next call runs the new graph (review: it ran the old weights)."""

    class Scale(Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    plan = Scale()
    with torch.no_grad():
        plan.fc.weight.fill_(1.0)
    plan.build(torch.ones(1, 2), dynamic_axes=[[0]])
    worker = VirtualWorker(id="rebuilt")
    x = worker.put(torch.ones(3, 2))
    pointer = plan.send(worker)
    assert pointer(x).get(keep=True).flatten().tolist() == [2.0, 2.0, 2.0]
    with torch.no_grad():
        plan.fc.weight.fill_(5.0)
    plan.build(torch.ones(1, 2), dynamic_axes=[[0]])
    assert plan.send(worker) is pointer
    assert pointer(x).get(keep=True).flatten().tolist() == [10.0, 10.0, 10.0]
    assert plan(x).get(keep=True).flatten().tolist() == [10.0, 10.0, 10.0]
