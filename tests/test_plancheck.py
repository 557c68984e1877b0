"""planwire.transport.plancheck: hostile ONNX plans are rejected before onnxruntime sees them.

The ``onnx`` package is used here only to build models; the checker itself never imports it.
"""

from __future__ import annotations

import mmap
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from planwire.transport import onnxproto, plandomains
from planwire.transport.ortoptions import session_options
from planwire.transport.plancheck import (
    DEFAULT_DOMAINS,
    MAX_DEPTH,
    ML_DOMAINS,
    ModelSummary,
    PlanRejected,
    PlanTooLarge,
    check_model,
)
from tests.hostile import field, varint  # protobuf by hand: the hostile corpus's builders

MB = 1 << 20
F = TensorProto.FLOAT
OPSET = [helper.make_opsetid("", 18)]
FN_OPSETS = [*OPSET, helper.make_opsetid("local.fns", 1)]


# --- builders -------------------------------------------------------------------------------------


def vi(name: str, shape: Sequence[int] = (2,), dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def model(
    nodes: Sequence[onnx.NodeProto],
    *,
    inits: Sequence[onnx.TensorProto] = (),
    sparse: Sequence[onnx.SparseTensorProto] = (),
    inputs: Sequence[str] = ("X",),
    outputs: Sequence[str] = ("Y",),
    opsets: Sequence[onnx.OperatorSetIdProto] = OPSET,
    functions: Sequence[onnx.FunctionProto] = (),
    **kw: object,
) -> onnx.ModelProto:
    g = helper.make_graph(
        list(nodes),
        "main",
        [vi(i) for i in inputs],
        [vi(o) for o in outputs],
        list(inits),
        sparse_initializer=list(sparse),
    )
    return helper.make_model(g, opset_imports=list(opsets), functions=list(functions), ir_version=10, **kw)


def check(m: onnx.ModelProto | bytes, **kw: object) -> ModelSummary:
    data = m.SerializeToString() if isinstance(m, onnx.ModelProto) else m
    kw.setdefault("max_bytes", 256 * MB)
    return check_model(data, **kw)  # type: ignore[arg-type]


def rejected(m: onnx.ModelProto | bytes, match: str, **kw: object) -> str:
    with pytest.raises(PlanRejected, match=match) as e:
        check(m, **kw)
    return str(e.value)


def ext_tensor(name: str, location: str = "secret.txt", *, entries: bool = True, flag: bool = True) -> TensorProto:
    """A tensor whose payload onnxruntime would read from ``location``."""
    t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=[9])
    if flag:
        t.data_location = TensorProto.EXTERNAL
    if entries:
        t.external_data.add(key="location", value=location)
        t.external_data.add(key="length", value="9")
    return t


def const_node(t: TensorProto, out: str = "Y", name: str = "const") -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], name=name, value=t)


def if_node(then_graph: onnx.GraphProto, else_graph: onnx.GraphProto, name: str = "if") -> onnx.NodeProto:
    return helper.make_node("If", ["C"], ["Y"], name=name, then_branch=then_graph, else_branch=else_graph)


def branch(nodes: Sequence[onnx.NodeProto], name: str, inits: Sequence[TensorProto] = ()) -> onnx.GraphProto:
    return helper.make_graph(list(nodes), name, [], [vi("Y" if not nodes else nodes[-1].output[0])], list(inits))


def add_model() -> onnx.ModelProto:
    w = helper.make_tensor("w", F, [2], [1.0, 2.0])
    return model(
        [helper.make_node("Add", ["X", "w"], ["Y"], name="add")],
        inits=[w],
        producer_name="tests",
        producer_version="1.0",
        doc_string="x" * 100,
    )


# --- accepted plans -------------------------------------------------------------------------------


def test_clean_model_summary_and_runs() -> None:
    m = add_model()
    helper.set_model_props(m, {"planwire.name": "demo", "note": "héllo"})
    data = m.SerializeToString()
    s = check_model(data, max_bytes=len(data))
    assert s == ModelSummary(
        size_bytes=len(data),
        ir_version=10,
        producer_name="tests",
        producer_version="1.0",
        opsets={"": 18},
        node_count=1,
        expanded_node_count=1,
        initializer_count=1,
        initializer_bytes=m.graph.initializer[0].ByteSize(),
        function_count=0,
        metadata_props={"planwire.name": "demo", "note": "héllo"},
    )
    sess = ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"X": np.ones(2, np.float32)})[0], [2.0, 3.0])


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: memoryview(np.frombuffer(b, np.uint8))])
def test_accepts_buffer_types(wrap) -> None:
    assert check(wrap(add_model().SerializeToString())).node_count == 1


def test_subgraphs_counted_and_ai_onnx_alias() -> None:
    then = branch([helper.make_node("Identity", ["X"], ["t"], domain="ai.onnx")], "then")
    other = branch([helper.make_node("Neg", ["X"], ["e"])], "else")
    m = model([if_node(then, other)], inputs=["X", "C"], opsets=[helper.make_opsetid("ai.onnx", 18)])
    s = check(m)
    assert (s.node_count, s.opsets) == (3, {"ai.onnx": 18})
    assert check(m, allowed_domains=frozenset({""})).node_count == 3  # "" and "ai.onnx" are one domain


def test_sparse_initializer_counted() -> None:
    values = helper.make_tensor("sp", F, [1], [5.0])
    indices = helper.make_tensor("sp_idx", TensorProto.INT64, [1], [1])
    sp = helper.make_sparse_tensor(values, indices, [2])
    m = model([helper.make_node("Add", ["X", "sp"], ["Y"])], sparse=[sp])
    s = check(m)
    assert (s.initializer_count, s.initializer_bytes) == (1, sp.ByteSize())


def test_torch_dynamo_export_passes() -> None:
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.nn.functional.gelu(self.lin(x)).sum(-1)

    x, net = torch.randn(2, 4), Tiny().eval()
    prog = torch.onnx.export(net, (x,), dynamo=True, verbose=False)
    data = prog.model_proto.SerializeToString()
    s = check_model(data, max_bytes=MB)
    assert s.producer_name == "pytorch" and set(s.opsets) <= DEFAULT_DOMAINS and s.initializer_count >= 2
    sess = ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, net(x).detach().numpy(), rtol=1e-5, atol=1e-6)


# --- external data --------------------------------------------------------------------------------


def test_notes_attack_external_initializer_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTES.md: loading from bytes, onnxruntime reads a plain external-data file name from the cwd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_bytes(b"TOPSECRET")
    m = model([helper.make_node("Identity", ["w"], ["Y"])], inits=[ext_tensor("w")], inputs=[])
    m.graph.output[0].CopyFrom(vi("Y", (9,), TensorProto.UINT8))
    data = m.SerializeToString()
    with pytest.raises(PlanRejected) as e:
        check_model(data, max_bytes=MB)
    assert str(e.value) == "initializer 'w' uses external data (location 'secret.txt')"
    # For the record: onnxruntime itself would have handed the file back as the plan's output.
    (leaked,) = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {})
    assert leaked.tobytes() == b"TOPSECRET"


def test_external_flag_or_entries_alone_rejected() -> None:
    m = model([helper.make_node("Identity", ["w"], ["Y"])], inits=[ext_tensor("w", entries=False)], inputs=[])
    assert rejected(m, "external") == "initializer 'w' uses external data (data_location EXTERNAL)"
    m = model([helper.make_node("Identity", ["w"], ["Y"])], inits=[ext_tensor("w", "a.bin", flag=False)], inputs=[])
    rejected(m, r"^initializer 'w' uses external data \(location 'a.bin'\)$")


def test_ort_mem_addr_location_rejected() -> None:
    t = ext_tensor("w", "*/_ORT_MEM_ADDR_/*")
    rejected(model([helper.make_node("Identity", ["w"], ["Y"])], inits=[t], inputs=[]), "_ORT_MEM_ADDR_")


def test_external_data_location_truncation_trick() -> None:
    """data_location = 2**32 + 1 parses as int32 1 (EXTERNAL) in C++; appended as a merged second graph."""
    base = model([helper.make_node("Identity", ["X"], ["Y"])])
    plain = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[1], raw_data=b"\0").SerializeToString()
    hostile = plain + varint(14 << 3 | 0) + varint(2**32 + 1)
    data = base.SerializeToString() + field(7, field(5, hostile))
    assert len(onnx.ModelProto.FromString(data).graph.initializer) == 1  # protobuf merges the two graphs
    rejected(data, r"^initializer 'w' uses external data \(data_location EXTERNAL\)$")


@pytest.mark.parametrize("kind", ["t", "tensors", "sparse_tensor", "sparse_tensors"])
def test_external_data_in_node_attribute(kind: str) -> None:
    t = ext_tensor("c", "k.bin")
    if kind == "t":
        node = const_node(t)
    elif kind == "tensors":
        node = helper.make_node("Constant", [], ["Y"], name="const", value_tensors=[t])
    else:
        sp = helper.make_sparse_tensor(t, helper.make_tensor("i", TensorProto.INT64, [1], [0]), [9])
        node = helper.make_node(
            "Constant", [], ["Y"], name="const", **{f"value_{kind}": sp if kind[-1] == "r" else [sp]}
        )
    msg = rejected(model([node], inputs=[]), "uses external data")
    assert "'c' uses external data (location 'k.bin') (in node 'const' (op Constant) > attribute " in msg


def test_external_data_in_sparse_initializer() -> None:
    values = ext_tensor("sp", "v.bin")
    sp = helper.make_sparse_tensor(values, helper.make_tensor("i", TensorProto.INT64, [1], [0]), [9])
    rejected(
        model([helper.make_node("Identity", ["sp"], ["Y"])], sparse=[sp], inputs=[]),
        r"^sparse initializer values 'sp' uses external data \(location 'v.bin'\)$",
    )
    idx = ext_tensor("idx", "i.bin")
    sp = helper.make_sparse_tensor(helper.make_tensor("sp", F, [1], [1.0]), idx, [9])
    rejected(
        model([helper.make_node("Identity", ["sp"], ["Y"])], sparse=[sp], inputs=[]),
        r"^sparse initializer indices 'idx' uses external data",
    )


def test_external_data_in_if_subgraph_initializer() -> None:
    then = branch([helper.make_node("Identity", ["w"], ["t"])], "then", inits=[ext_tensor("w")])
    other = branch([helper.make_node("Identity", ["X"], ["e"])], "else")
    msg = rejected(model([if_node(then, other)], inputs=["X", "C"]), "external")
    assert msg == (
        "initializer 'w' uses external data (location 'secret.txt') "
        "(in node 'if' (op If) > attribute 'then_branch' > graph 'then')"
    )


def test_external_data_deep_in_loop_inside_scan_inside_if() -> None:
    inner = branch([const_node(ext_tensor("deep"), "c", name="k")], "loop_body")
    loop = helper.make_node(
        "Loop",
        [
            "M",
            "",
        ],
        ["c"],
        name="loop",
        body=inner,
    )
    scan = helper.make_node("Scan", ["S"], ["c"], name="scan", num_scan_inputs=1, body=branch([loop], "scan_body"))
    then = branch([scan], "then")
    msg = rejected(model([if_node(then, branch([], "else"))], inputs=["X", "C"]), "external")
    assert msg.endswith(
        "(in node 'if' (op If) > attribute 'then_branch' > graph 'then'"
        " > node 'scan' (op Scan) > attribute 'body' > graph 'scan_body'"
        " > node 'loop' (op Loop) > attribute 'body' > graph 'loop_body'"
        " > node 'k' (op Constant) > attribute 'value')"
    )


def local_function(
    nodes: Sequence[onnx.NodeProto], name: str = "F", domain: str = "local.fns", **kw
) -> onnx.FunctionProto:
    return helper.make_function(domain, name, ["x"], ["y"], list(nodes), FN_OPSETS, **kw)


def call(name: str = "F", domain: str = "local.fns", **kw: object) -> onnx.NodeProto:
    return helper.make_node(name, ["X"], ["Y"], domain=domain, name=f"call_{name}", **kw)


def test_external_data_in_function_body() -> None:
    f = local_function([const_node(ext_tensor("fc"), "y", name="fk")])
    msg = rejected(model([call()], opsets=FN_OPSETS, functions=[f]), "external")
    assert msg.endswith("(in function 'local.fns::F' > node 'fk' (op Constant) > attribute 'value')")


def test_external_data_in_function_default_attribute() -> None:
    f = local_function([helper.make_node("Identity", ["x"], ["y"])])
    f.attribute_proto.append(helper.make_attribute("default_t", ext_tensor("dflt")))
    rejected(
        model([call()], opsets=FN_OPSETS, functions=[f]),
        r"'dflt' uses external data .*function 'local.fns::F'",
    )


def test_external_data_in_training_info() -> None:
    m = add_model()
    ti = m.training_info.add()
    ti.initialization.CopyFrom(branch([helper.make_node("Identity", ["w"], ["Y"])], "init", inits=[ext_tensor("w")]))
    rejected(m, r"uses external data .*\(in training_info\[0\] initialization\)$")


# --- domains --------------------------------------------------------------------------------------


def test_disallowed_node_domain() -> None:
    m = model(
        [helper.make_node("Foo", ["X"], ["Y"], name="n3", domain="com.evil")],
        opsets=[*OPSET, helper.make_opsetid("com.evil", 1)],
    )
    msg = rejected(m, "not allowed")
    assert msg == "node 'n3' (op Foo) uses domain 'com.evil' which is not allowed; allowed: '', 'ai.onnx'"


def test_disallowed_contrib_domain_even_without_opset_import() -> None:
    m = model([helper.make_node("Gelu", ["X"], ["Y"], domain="com.microsoft")])
    rejected(m, r"^node #0 \(op Gelu\) uses domain 'com.microsoft' which is not allowed")


def test_disallowed_opset_domain() -> None:
    m = model([helper.make_node("Neg", ["X"], ["Y"])], opsets=[*OPSET, helper.make_opsetid("com.microsoft", 1)])
    assert rejected(m, "opset") == "opset_import domain 'com.microsoft' is not allowed; allowed: '', 'ai.onnx'"


def test_disallowed_domain_inside_subgraph() -> None:
    then = branch([helper.make_node("Bad", ["X"], ["t"], name="bad", domain="com.microsoft")], "then")
    msg = rejected(model([if_node(then, branch([], "else"))], inputs=["X", "C"]), "not allowed")
    assert msg.endswith("(in node 'if' (op If) > attribute 'then_branch' > graph 'then')")


def test_ml_domain_is_opt_in() -> None:
    node = helper.make_node("Normalizer", ["X"], ["Y"], domain="ai.onnx.ml", norm="L1")
    m = model([node], opsets=[*OPSET, helper.make_opsetid("ai.onnx.ml", 3)])
    rejected(m, "uses domain 'ai.onnx.ml' which is not allowed")
    assert check(m, allowed_domains=ML_DOMAINS).opsets == {"": 18, "ai.onnx.ml": 3}


def test_domain_must_be_utf8() -> None:
    data = model([helper.make_node("Neg", ["X"], ["Y"])]).SerializeToString()
    node = field(4, b"Neg") + field(7, b"\xff\xfe")
    rejected(data + field(7, field(1, node)), "not valid UTF-8")


# --- local functions ------------------------------------------------------------------------------


def test_local_function_accepted_and_runs() -> None:
    inner = local_function([helper.make_node("Neg", ["x"], ["y"])], name="G")
    outer = local_function(
        [helper.make_node("G", ["x"], ["t"], domain="local.fns"), helper.make_node("Abs", ["t"], ["y"])]
    )
    m = model([call()], opsets=FN_OPSETS, functions=[outer, inner])
    data = m.SerializeToString()
    s = check_model(data, max_bytes=MB)
    assert (s.node_count, s.expanded_node_count, s.function_count) == (1, 2, 2)
    assert s.opsets == {"": 18, "local.fns": 1}
    sess = ort.InferenceSession(data, session_options(1), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"X": np.array([-1, 2], np.float32)})[0], [1, 2])


def test_function_shadowing_contrib_op_rejected() -> None:
    """A 'local function' com.microsoft::Gelu would not run its body: onnxruntime picks the contrib op."""
    f = local_function([helper.make_node("Neg", ["x"], ["y"])], name="Gelu", domain="com.microsoft")
    m = model(
        [call("Gelu", "com.microsoft")],
        opsets=[*OPSET, helper.make_opsetid("com.microsoft", 1)],
        functions=[f],
    )
    rejected(m, r"^function 'com.microsoft::Gelu' uses domain 'com.microsoft', which is reserved")
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"X": np.array([1.0, 2.0], np.float32)}
    )[0]
    assert got[0] > 0  # Gelu(1) ~ 0.84, not the body's Neg(1) = -1


@pytest.mark.parametrize(
    "domain",
    [
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "com.microsoft.nchwc",
        "com.ms.internal.nhwc",
        "org.pytorch.aten",
        "ai.onnx.preview.training",
    ],
)
def test_function_in_reserved_domain_rejected(domain: str) -> None:
    f = local_function([helper.make_node("Neg", ["x"], ["y"])], name="Fn", domain=domain)
    rejected(model([helper.make_node("Neg", ["X"], ["Y"])], functions=[f]), "reserved for built-in operators")


def test_every_onnxruntime_domain_is_reserved() -> None:
    schemas = pytest.importorskip("onnxruntime.capi.onnxruntime_pybind11_state").get_all_operator_schema()
    domains = {s.domain for s in schemas}
    assert "com.microsoft" in domains
    assert all(plandomains.reserved(d) for d in domains), domains


def test_function_body_checked_for_domains() -> None:
    f = local_function([helper.make_node("Gelu", ["x"], ["y"], name="g", domain="com.microsoft")])
    msg = rejected(model([call()], opsets=FN_OPSETS, functions=[f]), "not allowed")
    assert msg.endswith("(in function 'local.fns::F')")
    f = helper.make_function(
        "local.fns",
        "F",
        ["x"],
        ["y"],
        [helper.make_node("Neg", ["x"], ["y"])],
        [*OPSET, helper.make_opsetid("com.evil", 1)],
    )
    rejected(model([call()], opsets=FN_OPSETS, functions=[f]), "opset_import domain 'com.evil' is not allowed")


def test_call_to_undefined_function_rejected() -> None:
    f = local_function([helper.make_node("Neg", ["x"], ["y"])])
    rejected(
        model([call("Nope")], opsets=FN_OPSETS, functions=[f]),
        r"calls 'local.fns::Nope', which is not a function defined in the plan",
    )
    f.overload = "v2"  # functions match on (domain, name, overload)
    rejected(model([call()], opsets=FN_OPSETS, functions=[f]), "not a function defined")
    assert check(model([call(overload="v2")], opsets=FN_OPSETS, functions=[f])).expanded_node_count == 1


def test_duplicate_function_rejected() -> None:
    f = local_function([helper.make_node("Neg", ["x"], ["y"])])
    rejected(model([call()], opsets=FN_OPSETS, functions=[f, f]), "defined twice")


def test_recursive_functions_rejected() -> None:
    f = local_function([helper.make_node("F", ["x"], ["y"], domain="local.fns")])
    rejected(model([call()], opsets=FN_OPSETS, functions=[f]), "recursively: 'local.fns::F'")
    a = local_function([helper.make_node("B", ["x"], ["y"], domain="local.fns")], name="A")
    b = local_function([helper.make_node("A", ["x"], ["y"], domain="local.fns")], name="B")
    rejected(model([call("A")], opsets=FN_OPSETS, functions=[a, b]), "recursively")


def test_function_expansion_bomb_rejected() -> None:
    fns = [local_function([helper.make_node("Neg", ["x"], ["y"])], name="F0")]
    for i in range(1, 60):  # F_i calls F_{i-1} twice: 2**59 nodes once inlined
        prev = f"F{i - 1}"
        fns.append(
            local_function(
                [
                    helper.make_node(prev, ["x"], ["t"], domain="local.fns"),
                    helper.make_node(prev, ["t"], ["y"], domain="local.fns"),
                ],
                name=f"F{i}",
            )
        )
    m = model([call("F59")], opsets=FN_OPSETS, functions=fns)
    with pytest.raises(PlanTooLarge, match="expands to more than 100000 nodes"):
        check(m, max_function_depth=64)
    assert check(m, max_nodes=2**61, max_function_depth=64).expanded_node_count == 2**59
    # The default nesting cap refuses it first, naming the function and the limit.
    with pytest.raises(PlanTooLarge, match=r"'local.fns::F8' nests 9 levels of function calls, more than .* 8$"):
        check(m)


# --- size -----------------------------------------------------------------------------------------


def test_oversize_rejected_before_parsing(tmp_path: Path) -> None:
    data = add_model().SerializeToString()
    with pytest.raises(PlanRejected, match=rf"^plan is {len(data)} B, over the worker limit of 100 B$"):
        check_model(data, max_bytes=100)
    # A 3.1 GiB "plan" (sparse file, mapped, never read): rejected on size alone.
    path = tmp_path / "huge.bin"
    with path.open("wb") as fh:
        fh.truncate(int(3.1 * 1024**3))
    errors = []
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for limit in (256 * MB, 1 << 40):
            try:
                check_model(memoryview(mm), max_bytes=limit)
            except PlanRejected as e:  # caught here so no traceback keeps the mapping exported
                errors.append(str(e))
    assert errors == [
        "plan is 3.1 GiB, over the worker limit of 256 MiB",
        "plan is 3.1 GiB, over protobuf's 2 GiB limit",
    ]


def sparse_bomb(dims: Sequence[int]) -> onnx.ModelProto:
    values = helper.make_tensor("sp", F, [1], [5.0])
    sp = helper.make_sparse_tensor(values, helper.make_tensor("i", TensorProto.INT64, [1], [1]), list(dims))
    return model([helper.make_node("Shape", ["sp"], ["Y"])], sparse=[sp], inputs=[])


def test_sparse_tensor_densify_bomb_rejected() -> None:
    """onnxruntime densifies sparse initializers while loading: ~100 bytes could ask for 2 GiB."""
    assert check(sparse_bomb([1 << 20]), max_bytes=4 * MB).initializer_count == 1  # 4 MiB dense: fits
    rejected(sparse_bomb([1 << 20, 2]), r"^sparse initializer 'sp' densifies to more than 4 MiB", max_bytes=4 * MB)
    rejected(sparse_bomb([2**62, 4]), "densifies to more than")
    rejected(sparse_bomb([4, -1]), "densifies to a negative size")
    rejected(sparse_bomb([1] * 65), "dims has more than 64 entries")
    # The same in a node attribute and with packed dims (hand-encoded).
    values = varint(2 << 3) + b"\x01" + field(8, b"v")  # data_type FLOAT, name "v"
    sparse = field(1, values) + field(3, varint(1 << 30) + varint(16))
    attr = field(1, b"sparse_value") + field(22, sparse)
    node = field(4, b"Constant") + field(2, b"Y") + field(5, attr)
    data = model([]).SerializeToString() + field(7, field(1, node))
    rejected(data, r"^sparse tensor 'v' densifies to more than 256 MiB, over the worker limit \(in node #0")
    # Two occurrences of the singular sparse_value field are merged by protobuf: dims [2**16] + [2**16].
    half = field(1, values) + field(3, varint(1 << 16))
    attr = field(1, b"sparse_value") + field(22, half) + field(22, half)
    data = model([]).SerializeToString() + field(7, field(1, field(4, b"Constant") + field(5, attr)))
    rejected(data, "densifies to more than 4 MiB", max_bytes=4 * MB)


def test_field_count_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxproto, "MAX_FIELDS", 10_000)  # the reader's cap (plancheck re-exports it)
    attr = field(1, b"value_ints") + (varint(8 << 3) + b"\x01") * 20_000  # unpacked ints: 2 bytes each
    node = field(4, b"Constant") + field(2, b"Y") + field(5, attr)
    data = model([]).SerializeToString() + field(7, field(1, node))
    rejected(data, "plan has more than 10000 protobuf fields")


def test_large_initializer_scanned_without_copying() -> None:
    big = TensorProto(name="big", data_type=TensorProto.UINT8, dims=[100 * MB], raw_data=bytes(100 * MB))
    data = model([helper.make_node("Identity", ["big"], ["Y"])], inits=[big], inputs=[]).SerializeToString()
    del big
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        s = check_model(data, max_bytes=len(data))
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s.initializer_bytes > 100 * MB
    assert peak < MB, f"check_model allocated {peak} bytes: raw_data was copied"
    print(f"scanned a {len(data) / MB:.0f} MiB plan in {elapsed * 1e3:.2f} ms, peak Python allocation {peak} B")


# --- malformed input ------------------------------------------------------------------------------


def rich_model() -> onnx.ModelProto:
    """A model touching most message kinds: functions, subgraphs, sparse and dense initializers, metadata."""
    f = local_function([helper.make_node("Neg", ["x"], ["y"], name="fn_neg")])
    then = branch(
        [helper.make_node("F", ["X"], ["t"], domain="local.fns")],
        "then",
        inits=[helper.make_tensor("tw", F, [1], [3.0])],
    )
    sp = helper.make_sparse_tensor(
        helper.make_tensor("sp", F, [1], [5.0]), helper.make_tensor("i", TensorProto.INT64, [1], [1]), [2]
    )
    nodes = [const_node(helper.make_tensor("c", F, [2], [1.0, 2.0]), "K"), if_node(then, branch([], "else"))]
    m = model(
        nodes,
        inits=[helper.make_tensor("w", F, [2], [1.0, 2.0])],
        sparse=[sp],
        inputs=["X", "C"],
        opsets=FN_OPSETS,
        functions=[f],
        producer_name="rich",
    )
    helper.set_model_props(m, {"k": "v"})
    return m


def test_truncated_at_every_cut_point() -> None:
    data = rich_model().SerializeToString()
    assert check(data).function_count == 1
    passed = []
    for cut in range(len(data)):
        try:
            check(data[:cut])
        except PlanRejected:
            continue
        # Only a cut between two top-level fields after the graph leaves a valid (smaller) model.
        parsed = onnx.ModelProto.FromString(data[:cut])
        assert parsed.HasField("graph")
        passed.append(cut)
    assert len(passed) <= 4, passed


def test_random_garbage_rejected() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(3000):
        n = int(rng.integers(0, 512))
        with pytest.raises(PlanRejected):
            check(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


def test_mutated_models_never_crash() -> None:
    data = bytearray(rich_model().SerializeToString())
    rng = np.random.default_rng(99)
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(3000):
        mutant = bytearray(data)
        for pos in rng.integers(0, len(mutant), int(rng.integers(1, 4))):
            mutant[pos] = int(rng.integers(0, 256))
        try:
            check(bytes(mutant))
            outcomes["ok"] += 1
        except PlanRejected:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 0 and outcomes["ok"] > 0


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x08", "truncated varint at byte 1"),
        (b"\x08" + b"\xff" * 11, "varint longer than 10 bytes"),
        (b"\x3a" + varint(2**60), "runs past the end"),
        (b"\x38\x01", "field 7 of ModelProto has wire type varint"),
        (b"\x0b", "invalid wire type 3"),
        (b"\x0f", "invalid wire type 7"),
        (b"\x02\x00", "invalid field number 0"),
        (field(99, b""), "unknown field 99 in ModelProto"),
        (field(7, varint(200 << 3 | 0) + b"\x01"), "unknown field 200 in GraphProto"),
        (field(7, field(5, field(4, b"\0\0\0"))), "packed field 4 of TensorProto ends in a partial element"),
        (
            field(7, field(5, field(7, b"\x01\x8f"))),
            "packed field 7 of TensorProto ends in a partial element",
        ),
        (b"", "not an ONNX model: no graph"),
        (field(2, b"pytorch"), "not an ONNX model: no graph"),
    ],
)
def test_malformed_protobuf(raw: bytes, match: str) -> None:
    rejected(raw, match)


def test_deep_nesting_bombs() -> None:
    # 2,000 nested TypeProto.sequence_type in a graph input: protobuf-valid, rejected at MAX_DEPTH.
    t = field(1, varint(1 << 3) + b"\x01")  # tensor_type { elem_type: FLOAT }
    for _ in range(2_000):
        t = field(4, field(1, t))  # sequence_type { elem_type: t }
    graph = field(1, field(4, b"Neg") + field(1, b"X") + field(2, b"Y")) + field(11, field(1, b"X") + field(2, t))
    rejected(field(7, graph), f"nested deeper than {MAX_DEPTH}")
    # Nested If nodes, built with onnx: 30 levels of node > attribute > graph.
    g = branch([helper.make_node("Neg", ["X"], ["Y"])], "leaf")
    for i in range(30):
        g = branch([if_node(g, branch([], "else"), name=f"if{i}")], f"g{i}")
    rejected(model(list(g.node), inputs=["X", "C"]), "nested deeper than")


def test_ort_format_rejected_and_never_loaded(tmp_path: Path) -> None:
    m = model([helper.make_node("Neg", ["X"], ["Y"])])
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "m.ort")
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.log_severity_level = 3
    ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ort_bytes = (tmp_path / "m.ort").read_bytes()
    assert ort_bytes[4:8] == b"ORTM"
    rejected(ort_bytes, "ORT-format identifier")
    # A protobuf-valid model with 'ORTM' at offset 4 (a polyglot's shape) is refused as well.
    poly = field(2, b"\0\0ORTM") + m.SerializeToString()
    assert onnx.ModelProto.FromString(poly).graph.node[0].op_type == "Neg"
    rejected(poly, "ORT-format identifier")
    # Belt and braces: with the shared session options onnxruntime only parses ONNX protobuf.
    ort.InferenceSession(ort_bytes, providers=["CPUExecutionProvider"])  # default: sniffed and loaded
    with pytest.raises(Exception, match="protobuf parsing failed"):
        ort.InferenceSession(ort_bytes, session_options(1), providers=["CPUExecutionProvider"])


def test_names_in_messages_are_sanitized() -> None:
    m = model([helper.make_node("Foo", ["X"], ["Y"], name="evil\nINFO forged log line", domain="com.evil")])
    msg = rejected(m, "not allowed")
    assert "\n" not in msg and "evil\\nINFO" in msg


def test_ort_config_metadata_rejected() -> None:
    m = add_model()
    helper.set_model_props(m, {"ort_config": '{"session_options": {}}'})
    rejected(m, "metadata_props key 'ort_config'")
