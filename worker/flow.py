"""Private data and the worker's errors: a failed run's message without onnxruntime's text.

Which outputs of a plan depend on which inputs is computed once, when the plan is registered, by
:func:`planwire.transport.dataflow.analyze` (the contract layer: the exporter's review uses it too); it is
re-exported here for the worker's modules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from planwire.transport.dataflow import Flow, analyze

__all__ = ["Flow", "analyze", "redacted"]

_ORT_NODE = re.compile(r"running (\w[\w.:]*) node\. Name:'([^']{0,200})'")


def redacted(plan: str, worker: str, error: BaseException, args: Sequence[np.ndarray]) -> str:
    """A failed run's message without onnxruntime's text, which may quote tensor values (a bad Reshape
    prints its shape input): the op and node it names, and the shapes and dtypes of the arguments."""
    found = _ORT_NODE.search(str(error))
    where = f" in node {found.group(2)!r} (op {found.group(1)})" if found else ""
    shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in args)
    return (
        f"plan {plan!r} failed on worker {worker!r}{where} on arguments {shapes}; onnxruntime's message is "
        "withheld because the run read private data (it may quote tensor values): the worker's log has it"
    )
