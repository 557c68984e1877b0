"""Exact rewrites of a traced training graph that make its ONNX translation cheaper in onnxruntime.

They run on the ``make_fx`` graph, after the decompositions and before the export, and each one
computes the same values as the graph it replaces (ties and infinities included).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

aten = torch.ops.aten


def _is_zero_scalar(node: object) -> bool:
    """Whether ``node`` is a 0-d constant zero (``aten.scalar_tensor(0)``), or the number 0."""
    if isinstance(node, int | float):
        return node == 0
    return (
        isinstance(node, Node)
        and node.target is aten.scalar_tensor.default
        and isinstance(node.args[0], int | float)
        and node.args[0] == 0
    )


def _pooled_output(indices: object, pool_input: Node) -> Node | None:
    """The forward output (getitem 0) of the ``max_pool2d_with_indices`` of ``pool_input`` whose indices
    (getitem 1) are ``indices``: the window maxima that a pool backward's gradients go to."""
    if not (isinstance(indices, Node) and indices.target is operator.getitem and indices.args[1] == 1):
        return None
    pool = indices.args[0]
    if not (isinstance(pool, Node) and pool.target is aten.max_pool2d_with_indices.default):
        return None
    if pool.args[0] is not pool_input:
        return None
    return next((u for u in pool.users if u.target is operator.getitem and u.args[1] == 0), None)


def _relu_mask(node: Node) -> tuple[Node, Node] | None:
    """``(le, unpooled)`` when ``node`` is ReLU's backward (torch's ``threshold_backward``,
    ``where(le(x, t), 0, unpooled)``) applied to a pool backward's output ``unpooled``."""
    if node.target is not aten.where.self or node.kwargs or len(node.args) != 3:
        return None
    le, zero, unpooled = node.args
    if not (isinstance(le, Node) and le.target is aten.le.Scalar and not le.kwargs and _is_zero_scalar(zero)):
        return None
    if not isinstance(unpooled, Node) or unpooled.kwargs:
        return None
    if unpooled.target is not aten.max_pool2d_with_indices_backward.default:
        return None
    return le, unpooled


def mask_before_unpool(gm: GraphModule) -> int:
    """ReLU's backward after a max-pool's, moved to the pooled side: ``where(x <= t, 0, pool_bwd(g, x))``
    becomes ``pool_bwd(where(pooled <= t, 0, g), x)``; returns how many were rewritten.

    The pool backward puts each window's gradient at the element that holds the window's maximum
    (``pooled``) and zero elsewhere, so masking on ``x <= t`` equals masking the pooled gradient on
    ``pooled <= t``. Only for the ``max_pool2d_with_indices_backward`` ops left in the graph (windows that
    tile the input, see ``pool_backward.max_pool2d_backward_onnx``), where no element gets two windows'
    gradients. The mask then covers a quarter (a 2x2 pool) of the elements.
    """
    rewritten = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        found = _relu_mask(node)
        if found is None:
            continue
        le, unpooled = found
        x, _threshold = le.args
        grad, pool_input, *pool_args, indices = unpooled.args
        if x is not pool_input:
            continue
        pooled = _pooled_output(indices, x)
        if pooled is None:
            continue
        env: dict[Node, Node] = {x: pooled, unpooled: grad}
        with graph.inserting_before(node):  # after everything it reads (the zero may follow the pool backward)
            for old in (le, node):
                env[old] = graph.node_copy(old, lambda n, env=env: env.get(n, n))
            new = graph.call_function(unpooled.target, (env[node], pool_input, *pool_args, indices))
        new.meta.update({k: v for k, v in unpooled.meta.items() if k != "val"})
        for old in (le, node):
            _fake_value(env[old])
        new.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()
        gm.recompile()
    return rewritten


def _fake_value(node: Node) -> None:
    """``meta["val"]`` (a fake tensor) of a copied node, computed from its inputs' as the tracer would."""
    vals = []
    args, kwargs = map_arg((node.args, node.kwargs), lambda n: (vals.append(n.meta.get("val")), n.meta.get("val"))[1])
    fake_mode = next((getattr(v, "fake_mode", None) for v in vals if getattr(v, "fake_mode", None)), None)
    if fake_mode is None or any(v is None for v in vals):
        node.meta.pop("val", None)
        return
    with fake_mode:
        node.meta["val"] = node.target(*args, **kwargs)
