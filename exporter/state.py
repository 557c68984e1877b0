"""The tensors a function plan carries with it (PySyft's ``plan.state``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class State(torch.nn.Module):
    """Ordered tensors held as buffers ``0, 1, ...``: they export as initializers ``state.0, state.1, ...``.

    The plan function receives this object as its last argument and unpacks it with :meth:`read`.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        super().__init__()
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"plan state item {i} must be a torch.Tensor, got {type(t).__name__}")
            self.register_buffer(str(i), t.detach().clone())

    def read(self) -> list[torch.Tensor]:
        """The state tensors, in the order they were given."""
        return list(self.buffers(recurse=False))

    def __len__(self) -> int:
        return len(self._buffers)
