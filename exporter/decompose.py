"""Former home of the no-op decomposition skip, now in :mod:`planwire.exporter.torch_compat`.

Kept as a name only, so ``decompose.skipped``/``decompose.decomposed`` (read by the build benchmark)
still read the live counters.
"""

from __future__ import annotations

from typing import Any

from planwire.exporter import torch_compat


def __getattr__(name: str) -> Any:
    return getattr(torch_compat, name)
