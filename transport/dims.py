"""A plan's declared dims with their symbols bound: ``["N", "2*N"]`` with N = 3 is ``(3, 6)``.

A declared shape names its dynamic axes by symbol, or by an arithmetic expression of symbols (torch.export
writes dims such as ``2*s0``). Given the symbols' values (from a call's arguments), :func:`bind` gives the
concrete shape, or None where a dim stays unknown. Expressions are read with ``ast`` and evaluated by hand
(integers, + - * / // % and unary minus only; nothing is ever executed). Used by transport/estimate.py.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping

from planwire.transport.graph import Declared, Dims


def _eval_dim(d: int | str | None, env: Mapping[str, int]) -> int | None:
    """A declared dim with its symbols bound: an int, a known symbol, or an arithmetic expression of them
    (torch.export writes dims such as ``2*s0``); None when unknown."""
    if isinstance(d, int):
        return d if d >= 0 else None
    if not d:
        return None
    if d in env:
        return env[d]
    if len(d) > 200:
        return None
    try:
        tree = ast.parse(d, mode="eval")
    except SyntaxError:
        return None

    def ev(n: ast.AST) -> int:
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return n.value
        if isinstance(n, ast.Name) and n.id in env:
            return env[n.id]
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if isinstance(n, ast.BinOp):
            a, b = ev(n.left), ev(n.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            if type(n.op) in ops:
                return ops[type(n.op)]
            if isinstance(n.op, (ast.FloorDiv, ast.Div)) and b:
                return a // b
            if isinstance(n.op, ast.Mod) and b:
                return a % b
        raise ValueError(d)

    try:
        value = ev(tree)
    except (ValueError, RecursionError):
        return None
    return value if value >= 0 else None


def bind(declared: Declared | None, env: Mapping[str, int]) -> Dims | None:
    """The concrete shape of ``declared`` given the symbols' values ``env``; None when a dim is unknown."""
    if declared is None:
        return None
    dims = [_eval_dim(d, env) for d in declared]
    return None if any(d is None for d in dims) else tuple(dims)  # type: ignore[misc]
