"""Functions the torch.distributed.rpc peer runs (importable by both ranks). Same maths as bench.plans."""

from __future__ import annotations

import torch

from bench.plans import CONST


def tiny(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


def echo(x: torch.Tensor) -> torch.Tensor:
    return x


def op(name: str, x: torch.Tensor) -> torch.Tensor:
    """One elementwise op of the cycle (op-by-op execution: one rpc per op)."""
    if name == "tanh":
        return torch.tanh(x)
    return x * CONST[name] if name == "mul" else x + CONST[name]


def hold(x: torch.Tensor) -> torch.Tensor:
    """Keep ``x`` on the peer (the value of an RRef)."""
    return x


def op_rref(name: str, ref) -> torch.Tensor:  # noqa: ANN001 - an RRef owned by this peer
    """One op on a tensor that stays on the peer: the result is the value of a new RRef."""
    return op(name, ref.local_value())
