"""PySyft-style conveniences on torch tensors: ``tensor.tag(...)`` and ``tensor.send(worker)``.

Nothing is patched on import: :class:`TorchHook` adds the two methods to ``torch.Tensor`` when created.
The module-level :func:`tag` and :func:`send` do the same without touching torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from planwire.transport.arrays import set_tags, tags_of


def tag(tensor: torch.Tensor, *tags: str) -> torch.Tensor:
    """Attach search tags to ``tensor`` (kept on the object, sent with it); returns the tensor."""
    return set_tags(tensor, tags)


def send(tensor: torch.Tensor, worker: Any, *, tags: Any = None, key: str | None = None) -> Any:
    """Store ``tensor`` on ``worker`` (``worker.put``); tags default to the tensor's own. A PointerTensor."""
    return worker.put(tensor, tags=tuple(tags) if tags is not None else (tags_of(tensor) or None), key=key)


@dataclass
class LocalWorker:
    """This process, as PySyft called it; planwire keeps no tensors here, so it only has an id."""

    id: str = "me"
    is_client_worker: bool = True


class TorchHook:
    """``TorchHook(torch)`` adds ``Tensor.tag(*tags)`` and ``Tensor.send(worker)``; idempotent."""

    def __init__(self, torch_module: ModuleType = torch) -> None:
        if torch_module is not torch:
            raise TypeError("TorchHook expects the torch module: TorchHook(torch)")
        self.torch = torch_module
        self.local_worker = LocalWorker()
        torch.Tensor.tag = tag  # type: ignore[attr-defined]
        torch.Tensor.send = send  # type: ignore[attr-defined]
