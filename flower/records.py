"""Training-plan state <-> Flower records, both ways, checked against the plan's ports.

An ``ArrayRecord`` holds a plan's weights (parameters, frozen parameters, buffers) keyed by module path,
the same keys as ``model.state_dict()``: a Flower server can start from ``ArrayRecord(model.state_dict())``
and read ``result.arrays.to_torch_state_dict()`` at the end. The optimizer state never travels: each
round starts it afresh on the client, as Flower's PyTorch clients do with a new optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from planwire.flower.ports import PlanPorts
from planwire.transport import dtypes


def state_to_arrays(ports: PlanPorts, state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The weights in ``state`` (keyed by plan input name, e.g. ``param.head.weight``) as an ArrayRecord."""
    return ArrayRecord(
        array_dict={path: Array(np.ascontiguousarray(state[spec.name])) for path, spec in ports.weights.items()}
    )


def arrays_to_state(ports: PlanPorts, record: ArrayRecord, *, what: str = "arrays") -> dict[str, np.ndarray]:
    """The plan's weights from ``record`` keyed by plan input name (floats cast to the plan's precision);
    ValueError naming the first array that is missing, unexpected, of another dtype or shape, or not finite."""
    wanted = ports.weights
    missing, unexpected = set(wanted) - set(record), set(record) - set(wanted)
    if missing or unexpected:
        raise ValueError(
            f"{what} do not fit plan {ports.name!r}: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    state = {}
    for path, spec in wanted.items():
        array = record[path]
        if not isinstance(array, Array):
            raise ValueError(f"{what}[{path!r}] is a {type(array).__name__}, not an Array")
        value = array.numpy()
        want = dtypes.to_numpy(spec.dtype)
        # Floats are cast to the plan's dtype: FedOpt strategies (FedAdam, ...) compute in float64.
        same = value.dtype.newbyteorder("=") == want or (value.dtype.kind == "f" and want.kind == "f")
        if not same or value.shape != spec.shape:
            raise ValueError(
                f"{what}[{path!r}] is {value.dtype}{list(value.shape)}, plan {ports.name!r} holds "
                f"{want}{list(spec.shape)}"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ValueError(f"{what}[{path!r}] holds NaN or infinite values")
        state[spec.name] = value.astype(want, copy=False)
    return state


__all__ = ["arrays_to_state", "state_to_arrays"]
