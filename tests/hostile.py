"""A corpus of hostile ONNX plans (issue 11), built with onnx.helper or by hand as protobuf bytes.

Each :class:`Hostile` says what a worker must answer to ``register_plan`` with it: an error ``code`` and
words the message must contain, or ``contained=True`` for plans no static check can judge (their harm
depends on the data: integer division overflow, sizes and trip counts read from an input), which only
running them in a sandbox can catch. Sizes are chosen so that a worker that failed to refuse a plan
would be asked for terabytes, not gigabytes: a wrongly accepted plan fails loudly rather than slowly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

F, I64, I32, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL
OPSET = [helper.make_opsetid("", 18)]
FN_DOMAIN = "local.fns"
FN_OPSETS = [*OPSET, helper.make_opsetid(FN_DOMAIN, 1)]
TIB = 1 << 40


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[], bytes]
    code: str = ""  # the error register_plan must answer
    words: tuple[str, ...] = ()  # in the error message
    contained: bool = False  # only a sandbox can catch it: registers, then harms the worker when run
    run: Callable[[], list] | None = None  # arguments that trigger a contained plan


# --- builders -----------------------------------------------------------------------------------------


def vi(name: str, dtype: int = F, shape: Sequence[int | str] | None = (1,)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, None if shape is None else list(shape))


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto] = (),
    outputs: Sequence[onnx.ValueInfoProto] = (),
    inits: Sequence[onnx.TensorProto] = (),
    *,
    sparse: Sequence[onnx.SparseTensorProto] = (),
    functions: Sequence[onnx.FunctionProto] = (),
    opsets: Sequence[onnx.OperatorSetIdProto] = OPSET,
) -> onnx.ModelProto:
    g = helper.make_graph(
        list(nodes), "hostile", list(inputs), list(outputs), list(inits), sparse_initializer=list(sparse)
    )
    return helper.make_model(g, opset_imports=list(opsets), functions=list(functions), ir_version=9)


def ser(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString(deterministic=True)


def checked(nodes: list, inputs: list, outputs: list, initializers: Sequence = ()) -> bytes:
    """A well-formed opset-17 plan (onnx's checker passes it): the benign side of the corpus' plans."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def i64(name: str, values: Sequence[int], dims: Sequence[int] | None = None) -> TensorProto:
    return helper.make_tensor(name, I64, [len(values)] if dims is None else list(dims), list(values))


def f32(name: str, values: Sequence[float], dims: Sequence[int] | None = None) -> TensorProto:
    return helper.make_tensor(name, F, [len(values)] if dims is None else list(dims), list(values))


def shape_of(x: str) -> onnx.NodeProto:
    """y = Shape(x): a tiny output that still makes the runtime build ``x``."""
    return helper.make_node("Shape", [x], ["y"])


Y_SHAPE = vi("y", I64, [None])  # type: ignore[list-item]


def ext_tensor(name: str, location: str = "secret.txt", dims: Sequence[int] = (9,)) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.UINT8, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


def identity_model(**kw: object) -> onnx.ModelProto:
    return model([helper.make_node("Identity", ["x"], ["y"])], [vi("x")], [vi("y")], **kw)  # type: ignore[arg-type]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def function(name: str, nodes: Sequence[onnx.NodeProto], domain: str = FN_DOMAIN) -> onnx.FunctionProto:
    return helper.make_function(domain, name, ["x"], ["y"], list(nodes), FN_OPSETS)


def fcall(name: str, x: str = "x", y: str = "y") -> onnx.NodeProto:
    return helper.make_node(name, [x], [y], domain=FN_DOMAIN)


def body(nodes: Sequence[onnx.NodeProto], name: str = "body") -> onnx.GraphProto:
    """A Loop body: (i, cond) -> cond."""
    return helper.make_graph(list(nodes), name, [vi("i", I64, []), vi("c_in", B, [])], [vi("c_out", B, [])])


LOOP_BODY = [helper.make_node("Identity", ["c_in"], ["c_out"])]


# --- external data -------------------------------------------------------------------------------------


def ext_initializer() -> bytes:
    return ser(model([helper.make_node("Shape", ["w"], ["y"])], [], [Y_SHAPE], [ext_tensor("w")]))


def ext_constant() -> bytes:
    return ser(
        model([helper.make_node("Constant", [], ["y"], value=ext_tensor("k"))], [], [vi("y", TensorProto.UINT8, [9])])
    )


def ext_sparse() -> bytes:
    values = ext_tensor("sv", dims=[1])
    sp = helper.make_sparse_tensor(values, i64("si", [0]), [4])
    return ser(model([helper.make_node("Shape", ["sv"], ["y"])], [], [Y_SHAPE], sparse=[sp]))


def ext_in_if_branch() -> bytes:
    then = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["t"])], "then", [], [vi("t", TensorProto.UINT8, [9])], [ext_tensor("w")]
    )
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["e"], value=ext_tensor("e0"))], "else", [], [vi("e", TensorProto.UINT8, [9])]
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    return ser(model([node], [vi("c", B, [])], [vi("y", TensorProto.UINT8, [9])]))


def ext_deep_in_loop() -> bytes:
    inner = body([helper.make_node("Constant", [], ["k"], value=ext_tensor("deep")), *LOOP_BODY], "inner")
    outer = body([helper.make_node("Loop", ["", "c_in"], [], body=inner), *LOOP_BODY], "outer")
    loop = helper.make_node("Loop", ["n", "c"], [], body=outer)
    return ser(
        model(
            [loop, helper.make_node("Identity", ["x"], ["y"])], [vi("n", I64, []), vi("c", B, []), vi("x")], [vi("y")]
        )
    )


def ext_in_function() -> bytes:
    fn = function("Leak", [helper.make_node("Constant", [], ["y"], value=ext_tensor("fk"))])
    return ser(model([fcall("Leak")], [vi("x")], [vi("y", TensorProto.UINT8, [9])], functions=[fn], opsets=FN_OPSETS))


def ext_flag_only() -> bytes:
    t = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[9], data_location=TensorProto.EXTERNAL)
    return ser(model([helper.make_node("Shape", ["w"], ["y"])], [], [Y_SHAPE], [t]))


def ext_mem_addr() -> bytes:
    return ser(model([helper.make_node("Shape", ["w"], ["y"])], [], [Y_SHAPE], [ext_tensor("w", "*/_ORT_MEM_ADDR_/*")]))


def ext_training_info() -> bytes:
    m = identity_model()
    ti = m.training_info.add()
    ti.initialization.CopyFrom(
        helper.make_graph(
            [helper.make_node("Identity", ["w"], ["z"])],
            "init",
            [],
            [vi("z", TensorProto.UINT8, [9])],
            [ext_tensor("w")],
        )
    )
    return ser(m)


# --- foreign domains ----------------------------------------------------------------------------------


def contrib_op() -> bytes:
    node = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    return ser(model([node], [vi("x")], [vi("y")], opsets=[*OPSET, helper.make_opsetid("com.microsoft", 1)]))


def custom_op() -> bytes:
    node = helper.make_node("Steal", ["x"], ["y"], domain="com.evil.ops")
    return ser(model([node], [vi("x")], [vi("y")], opsets=[*OPSET, helper.make_opsetid("com.evil.ops", 1)]))


def foreign_opset_only() -> bytes:
    return ser(identity_model(opsets=[*OPSET, helper.make_opsetid("com.evil.ops", 1)]))


def ml_op() -> bytes:
    node = helper.make_node("Normalizer", ["x"], ["y"], domain="ai.onnx.ml", norm="L2")
    return ser(
        model([node], [vi("x", F, [1, 2])], [vi("y", F, [1, 2])], opsets=[*OPSET, helper.make_opsetid("ai.onnx.ml", 3)])
    )


def function_shadowing_contrib() -> bytes:
    fn = function("Gelu", [helper.make_node("Identity", ["x"], ["y"])], domain="com.microsoft")
    node = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")
    opsets = [*OPSET, helper.make_opsetid("com.microsoft", 1)]
    return ser(model([node], [vi("x")], [vi("y")], functions=[fn], opsets=opsets))


def ort_config() -> bytes:
    m = identity_model()
    helper.set_model_props(m, {"ort_config": '{"session_options": {"intra_op_num_threads": 64}}'})
    return ser(m)


# --- malformed protobuf -------------------------------------------------------------------------------


def garbage() -> bytes:
    return bytes(range(256)) * 4


def truncated() -> bytes:
    data = ser(identity_model())
    return data[: len(data) - 7]


def empty() -> bytes:
    return b""


def ort_format() -> bytes:
    return b"\x00\x00\x00\x00ORTM" + bytes(64)


def nesting_bomb() -> bytes:
    t = field(1, varint(1 << 3) + b"\x01")
    for _ in range(2_000):
        t = field(4, field(1, t))
    graph = field(1, field(4, b"Neg") + field(1, b"x") + field(2, b"y")) + field(11, field(1, b"x") + field(2, t))
    return field(7, graph)


def length_past_end() -> bytes:
    return ser(identity_model()) + field(7, b"")[:1] + varint(1 << 20)


# --- sizes the plan fixes ------------------------------------------------------------------------------


def constant_of_shape_bomb() -> bytes:
    return ser(
        model(
            [helper.make_node("ConstantOfShape", ["s"], ["big"]), shape_of("big")],
            [],
            [Y_SHAPE],
            [i64("s", [1 << 20, 1 << 20])],
        )
    )


def constant_fold_bomb() -> bytes:
    """The issue's 132-byte plan: constants onnxruntime folds while loading (here 4 GiB of them)."""
    nodes = [
        helper.make_node("ConstantOfShape", ["s"], ["z"], value=f32("v", [1.0], [1])),
        helper.make_node("Add", ["z", "z"], ["big"]),
        shape_of("big"),
    ]
    return ser(model(nodes, [], [Y_SHAPE], [i64("s", [1 << 30])]))


def constant_node_shape_bomb() -> bytes:
    """The shape comes from a Constant node's value_ints, not an initializer."""
    nodes = [
        helper.make_node("Constant", [], ["s"], value_ints=[1 << 16, 1 << 16, 1 << 16]),
        helper.make_node("ConstantOfShape", ["s"], ["big"]),
        shape_of("big"),
    ]
    return ser(model(nodes, [], [Y_SHAPE]))


def expand_bomb() -> bytes:
    nodes = [helper.make_node("Expand", ["one", "s"], ["big"]), shape_of("big")]
    return ser(model(nodes, [], [Y_SHAPE], [f32("one", [1.0]), i64("s", [1 << 21, 1 << 21])]))


def tile_bomb() -> bytes:
    nodes = [helper.make_node("Tile", ["x", "r"], ["big"]), shape_of("big")]
    return ser(model(nodes, [vi("x", F, [1, 1])], [Y_SHAPE], [i64("r", [1 << 21, 1 << 21])]))


def range_bomb() -> bytes:
    scalars = [helper.make_tensor(n, I64, [], [v]) for n, v in (("a", 0), ("b", 1 << 42), ("d", 1))]
    nodes = [helper.make_node("Range", ["a", "b", "d"], ["big"]), shape_of("big")]
    return ser(model(nodes, [], [Y_SHAPE], scalars))


def resize_sizes_bomb() -> bytes:
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["big"])
    return ser(
        model([node, shape_of("big")], [vi("x", F, [1, 1, 2, 2])], [Y_SHAPE], [i64("sizes", [1, 1, 1 << 20, 1 << 20])])
    )


def resize_scales_bomb() -> bytes:
    node = helper.make_node("Resize", ["x", "", "scales"], ["big"])
    inits = [f32("x", [1.0, 2.0, 3.0, 4.0], [1, 1, 2, 2]), f32("scales", [1.0, 1.0, 1e6, 1e6])]
    return ser(model([node, shape_of("big")], [], [Y_SHAPE], inits))


def sparse_bomb() -> bytes:
    """493-byte plans of sparse initializers passed 6 GiB while loading: this one asks for 4 TiB."""
    sp = helper.make_sparse_tensor(f32("sp", [5.0]), i64("i", [1]), [1 << 20, 1 << 20])
    return ser(model([shape_of("sp")], [], [Y_SHAPE], sparse=[sp]))


def declared_huge_initializer() -> bytes:
    t = TensorProto(name="w", data_type=F, dims=[1 << 20, 1 << 20])  # no data at all
    return ser(model([shape_of("w")], [], [Y_SHAPE], [t]))


# --- time ----------------------------------------------------------------------------------------------


def loop_trip_bomb() -> bytes:
    loop = helper.make_node("Loop", ["n", ""], [], body=body(LOOP_BODY))
    return ser(
        model(
            [loop, helper.make_node("Identity", ["x"], ["y"])],
            [vi("x")],
            [vi("y")],
            [helper.make_tensor("n", I64, [], [10**12])],
        )
    )


def loop_endless() -> bytes:
    loop = helper.make_node("Loop", ["", ""], [], body=body(LOOP_BODY))
    return ser(model([loop, helper.make_node("Identity", ["x"], ["y"])], [vi("x")], [vi("y")]))


def loop_true_condition_bomb() -> bytes:
    inits = [helper.make_tensor("n", I64, [], [10**12]), helper.make_tensor("t", B, [], [True])]
    loop = helper.make_node("Loop", ["n", "t"], [], body=body(LOOP_BODY))
    return ser(model([loop, helper.make_node("Identity", ["x"], ["y"])], [vi("x")], [vi("y")], inits))


def nested_functions(levels: int = 18) -> bytes:
    """The issue's 1.3 KiB plan: each function calls the one below twice (minutes to load)."""
    fns = [function("F0", [helper.make_node("Neg", ["x"], ["y"])])]
    for i in range(1, levels):
        fns.append(function(f"F{i}", [fcall(f"F{i - 1}", "x", "t"), fcall(f"F{i - 1}", "t", "y")]))
    return ser(model([fcall(f"F{levels - 1}")], [vi("x")], [vi("y")], functions=fns, opsets=FN_OPSETS))


def wide_functions() -> bytes:
    """Only 5 levels deep, but each calls the next 40 times: 2.5 million nodes once inlined."""
    fns = [function("W0", [helper.make_node("Neg", ["x"], ["y"])])]
    for i in range(1, 5):
        chain = [fcall(f"W{i - 1}", "x" if j == 0 else f"t{j - 1}", f"t{j}" if j < 39 else "y") for j in range(40)]
        fns.append(function(f"W{i}", chain))
    return ser(model([fcall("W4")], [vi("x")], [vi("y")], functions=fns, opsets=FN_OPSETS))


def recursive_functions() -> bytes:
    a = function("A", [fcall("B")])
    b = function("B", [fcall("A")])
    return ser(model([fcall("A")], [vi("x")], [vi("y")], functions=[a, b], opsets=FN_OPSETS))


def many_nodes(n: int = 100_001) -> bytes:
    """A chain of ``n`` Identity nodes, written directly as protobuf (onnx.helper is slow at this size)."""
    nodes = b"".join(
        field(
            1,
            field(1, b"x" if i == 0 else b"v%d" % (i - 1))
            + field(2, b"y" if i == n - 1 else b"v%d" % i)
            + field(4, b"Identity"),
        )
        for i in range(n)
    )
    m = identity_model()
    m.graph.ClearField("node")
    head = ser(m)
    return head + field(7, nodes)  # protobuf merges the second graph field into the first


# --- only containment can catch these --------------------------------------------------------------------


def int_div_overflow(dtype: int = I64) -> bytes:
    """INT_MIN / -1 raises SIGFPE inside onnxruntime's kernel: 80 bytes that kill the process."""
    node = helper.make_node("Div", ["a", "b"], ["y"])
    return ser(model([node], [vi("a", dtype, [1]), vi("b", dtype, [1])], [vi("y", dtype, [1])]))


def data_dependent_shape() -> bytes:
    """ConstantOfShape of a shape the client sends: its size is unknowable before the run."""
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["big"]), shape_of("big")]
    return ser(model(nodes, [vi("s", I64, [2])], [Y_SHAPE]))


def data_dependent_loop() -> bytes:
    """A Loop of as many trips as the client sends, carrying ``x`` (a Loop needs an output to be valid)."""
    carry = helper.make_graph(
        [*LOOP_BODY, helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [vi("i", I64, []), vi("c_in", B, []), vi("x_in")],
        [vi("c_out", B, []), vi("x_out")],
    )
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], body=carry)
    return ser(model([loop], [vi("n", I64, []), vi("x")], [vi("y")]))


def _int_min(dtype: type) -> list:
    import numpy as np

    info = np.iinfo(dtype)
    return [np.array([info.min], dtype), np.array([-1], dtype)]


def _huge_shape() -> list:
    import numpy as np

    return [np.array([1 << 22, 1 << 22], np.int64)]  # 64 TiB of floats: the allocation fails at once


def _long_loop() -> list:
    import numpy as np

    return [np.array(10**12, np.int64), np.ones(1, np.float32)]


BAD, BIG = "bad_plan", "plan_too_large"

CORPUS: list[Hostile] = [
    # external data everywhere
    Hostile("external initializer", ext_initializer, BAD, ("'w' uses external data", "secret.txt")),
    Hostile("external Constant value", ext_constant, BAD, ("external data",)),
    Hostile("external sparse values", ext_sparse, BAD, ("external data",)),
    Hostile("external data in an If branch", ext_in_if_branch, BAD, ("external data", "(op If)")),
    Hostile("external data two Loops deep", ext_deep_in_loop, BAD, ("'deep' uses external data",)),
    Hostile("external data in a function", ext_in_function, BAD, ("external data", "function")),
    Hostile("external flag without location", ext_flag_only, BAD, ("data_location EXTERNAL",)),
    Hostile("external data in raw memory", ext_mem_addr, BAD, ("_ORT_MEM_ADDR_",)),
    Hostile("external data in training_info", ext_training_info, BAD, ("training_info",)),
    # foreign domains
    Hostile("contrib op", contrib_op, BAD, ("com.microsoft", "not allowed")),
    Hostile("custom op domain", custom_op, BAD, ("com.evil.ops",)),
    Hostile("foreign opset import", foreign_opset_only, BAD, ("opset_import domain 'com.evil.ops'",)),
    Hostile("ai.onnx.ml op (off by default)", ml_op, BAD, ("ai.onnx.ml",)),
    Hostile("function shadowing a contrib op", function_shadowing_contrib, BAD, ("reserved",)),
    Hostile("ort_config metadata", ort_config, BAD, ("ort_config",)),
    # malformed protobuf
    Hostile("garbage bytes", garbage, BAD, ("malformed plan",)),
    Hostile("truncated model", truncated, BAD, ("malformed plan",)),
    Hostile("empty bytes", empty, BAD, ("no graph",)),
    Hostile("ORT flatbuffer", ort_format, BAD, ("ORTM",)),
    Hostile("2,000 nested types", nesting_bomb, BAD, ("nested deeper",)),
    Hostile("length past the end", length_past_end, BAD, ("malformed plan",)),
    # sizes the plan fixes
    Hostile("ConstantOfShape bomb", constant_of_shape_bomb, BIG, ("ConstantOfShape", "1048576")),
    Hostile("constant-folding bomb", constant_fold_bomb, BIG, ("ConstantOfShape",)),
    Hostile("ConstantOfShape of a Constant node", constant_node_shape_bomb, BIG, ("ConstantOfShape", "65536")),
    Hostile("Expand bomb", expand_bomb, BIG, ("Expand",)),
    Hostile("Tile bomb", tile_bomb, BIG, ("Tile",)),
    Hostile("Range bomb", range_bomb, BIG, ("Range",)),
    Hostile("Resize sizes bomb", resize_sizes_bomb, BIG, ("Resize",)),
    Hostile("Resize scales bomb", resize_scales_bomb, BIG, ("Resize",)),
    Hostile("sparse initializer bomb", sparse_bomb, BIG, ("densifies",)),
    Hostile("declared huge initializer", declared_huge_initializer, BIG, ("initializer 'w'",)),
    # time
    Hostile("Loop of 1e12 trips", loop_trip_bomb, BIG, ("Loop", "1000000000000")),
    Hostile("Loop of 1e12 trips, constant true condition", loop_true_condition_bomb, BIG, ("Loop",)),
    Hostile("Loop without end", loop_endless, BIG, ("never ends",)),
    Hostile("18 levels of nested functions", nested_functions, BIG, ("nests", "levels")),
    Hostile("wide function expansion", wide_functions, BIG, ("expands to more than",)),
    Hostile("recursive functions", recursive_functions, BAD, ("recursively",)),
    Hostile("100,001 nodes", many_nodes, BIG, ("more than 100000 nodes",)),
    # only containment can catch these
    Hostile(
        "int64 Div(INT64_MIN, -1)", int_div_overflow, contained=True, run=lambda: _int_min(__import__("numpy").int64)
    ),
    Hostile(
        "int32 Div(INT32_MIN, -1)",
        lambda: int_div_overflow(I32),
        contained=True,
        run=lambda: _int_min(__import__("numpy").int32),
    ),
    Hostile("shape read from the data", data_dependent_shape, contained=True, run=_huge_shape),
    Hostile("trip count read from the data", data_dependent_loop, contained=True, run=_long_loop),
]
