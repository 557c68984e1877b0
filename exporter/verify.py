"""The check every build runs once: does the ONNX graph compute what eager torch computes?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from planwire.exporter import runtime
from planwire.exporter.errors import PlanBuildError
from planwire.transport.dtypes import human, to_wire
from planwire.transport.spec import PlanVariant

# Relative tolerance per float dtype (a few hundred ulps of float32, a few of float16); integers and
# bools must match exactly. The absolute tolerance is the same number scaled by the output's magnitude.
TOLERANCE = {"float": 1e-5, "double": 1e-10, "float16": 4e-3}


def compare(
    got: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    *,
    plan: str,
    names: Sequence[str],
    values: bool = True,
    what: str = "",
) -> None:
    """PlanBuildError naming the first output whose dtype, shape or values differ from eager torch."""
    if len(got) != len(expected):
        raise PlanBuildError(f"plan {plan!r}: ONNX gives {len(got)} outputs, torch {len(expected)}", plan=plan)
    for name, g, e in zip(names, got, expected, strict=True):
        where = f"plan {plan!r} output {name!r}{what}"
        if g.dtype != e.dtype:
            why = f"ONNX gives {human(to_wire(g.dtype))}, eager torch {human(to_wire(e.dtype))}"
            raise PlanBuildError(f"{where}: {why}", plan=plan)
        if g.shape != e.shape:
            why = f"ONNX gives shape {list(g.shape)}, eager torch {list(e.shape)}"
            raise PlanBuildError(f"{where}: {why}", plan=plan)
        if not values or g.size == 0:
            continue
        tol = TOLERANCE.get(to_wire(e.dtype))
        if tol is None:
            bad = g != e
        else:
            g64, e64 = g.astype(np.float64), e.astype(np.float64)
            finite = e64[np.isfinite(e64)]
            scale = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
            bad = ~np.isclose(g64, e64, rtol=tol, atol=tol * scale, equal_nan=True)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise PlanBuildError(
                f"{where} differs from eager torch{' beyond tolerance ' + str(tol) if tol else ''}: "
                f"{int(bad.sum())} of {bad.size} elements, first at {list(index)}: "
                f"ONNX {g[index]!r} vs torch {e[index]!r}",
                plan=plan,
            )


def verify_variant(
    variant: PlanVariant,
    checks: Sequence[tuple[Sequence[np.ndarray], Sequence[np.ndarray]]],
    *,
    plan: str,
    random: bool,
    what: str | None = None,
) -> ort.InferenceSession:
    """Load ``variant`` in onnxruntime and run it on each check's inputs (in port order) against the
    check's expected eager-torch outputs; returns the session for later runs.

    PlanBuildError when onnxruntime cannot load or run the graph, or an output differs (``random``:
    compare dtypes and shapes only). ``what`` describes the check in messages (default: input shapes).
    """
    try:
        session = runtime.make_session(variant.data)
    except Exception as e:
        raise PlanBuildError(f"plan {plan!r}: onnxruntime cannot load the exported graph: {e}", plan=plan) from e
    names = [o.name for o in variant.outputs]
    for arrays, want in checks:
        shapes = ", ".join(str(list(a.shape)) for a in arrays)
        try:
            got = runtime.run(session, variant, arrays)
        except Exception as e:
            raise PlanBuildError(
                f"plan {plan!r}: onnxruntime failed on inputs of shape {shapes}: {e}", plan=plan
            ) from e
        compare(
            got, want, plan=plan, names=names, values=not random, what=f" (inputs {shapes})" if what is None else what
        )
    return session
