"""Exact rewrites of a traced training graph that make its ONNX translation cheaper in onnxruntime.

They run on the ``make_fx`` graph, after the decompositions and before the export, and each one
computes the same values as the graph it replaces (ties and infinities included).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

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


def mask_before_unpool(gm: GraphModule) -> int:
    """ReLU's backward after a max-pool's, moved to the pooled side: ``where(x <= t, 0, pool_bwd(g, x))``
    becomes ``pool_bwd(where(pooled <= t, 0, g), x)``; returns how many were rewritten.

    The pool backward puts each window's gradient at the element that holds the window's maximum
    (``pooled``) and zero elsewhere, so masking on ``x <= t`` equals masking the pooled gradient on
    ``pooled <= t``. Only for the ``max_pool2d_with_indices_backward`` ops left in the graph (windows that
    tile the input, see ``decompositions.max_pool2d_backward_onnx``), where no element gets two windows'
    gradients. The select then runs over a quarter (a 2x2 pool) of the elements: in onnxruntime a Where
    over a ReLU mask is branchy and data-dependent, the most expensive elementwise op of a small CNN step.
    """
    rewritten = 0
    for where in list(gm.graph.nodes):
        if where.target is not aten.where.self or len(where.args) != 3 or where.kwargs:
            continue
        cond, zero, unpooled = where.args
        if not (isinstance(cond, Node) and isinstance(unpooled, Node) and _is_zero_scalar(zero)):
            continue
        if cond.target is not aten.le.Scalar or unpooled.target is not aten.max_pool2d_with_indices_backward.default:
            continue
        x, threshold = cond.args
        grad, pool_input, *pool_args, indices = unpooled.args
        if x is not pool_input or unpooled.kwargs or cond.kwargs:
            continue
        pooled = _pooled_output(indices, x)
        if pooled is None:
            continue
        graph = gm.graph
        with graph.inserting_before(where):  # after everything it reads (the zero may follow the pool backward)
            mask = graph.call_function(aten.le.Scalar, (pooled, threshold))
            masked = graph.call_function(aten.where.self, (mask, zero, grad))
            new = graph.call_function(unpooled.target, (masked, pool_input, *pool_args, indices))
        for node, like in ((mask, cond), (masked, where), (new, unpooled)):
            node.meta.update({k: v for k, v in like.meta.items() if k != "val"})
        _fake_values(mask, masked, new, pooled, threshold, zero, grad, where)
        where.replace_all_uses_with(new)
        graph.erase_node(where)
        rewritten += 1
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return rewritten


def _fake_values(
    mask: Node, masked: Node, new: Node, pooled: Node, threshold: object, zero: object, grad: Node, where: Node
) -> None:
    """``meta["val"]`` (fake tensors) of the new nodes, computed as the tracer would have."""
    pooled_val, grad_val = pooled.meta.get("val"), grad.meta.get("val")
    fake_mode = getattr(pooled_val, "fake_mode", None)
    if fake_mode is None or grad_val is None:
        return
    zero_val = zero.meta.get("val") if isinstance(zero, Node) else zero
    with fake_mode:
        mask.meta["val"] = aten.le.Scalar(pooled_val, threshold)
        masked.meta["val"] = aten.where.self(mask.meta["val"], zero_val, grad_val)
    new.meta["val"] = where.meta.get("val")
