"""What every plan can do once it has variants: pick one, run it locally, send it, save it, show it.

Shared by :class:`~planwire.exporter.plan.Plan` (built from torch code, can build more variants) and
:class:`~planwire.exporter.loading.LoadedPlan` (read from bytes, fixed variants).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from planwire.exporter import runtime, summary
from planwire.transport.arrays import as_array, wrap
from planwire.transport.dtypes import to_wire
from planwire.transport.pointers import PointerTensor
from planwire.transport.review import format_review, review
from planwire.transport.spec import PlanVariant

NOT_BUILT = "A plan needs to be built before being sent to a worker."
Signature = Sequence[tuple[str, Sequence[int]]]


class PlanRunner:
    """Mixin: needs ``name``, ``kind``, ``_variants`` (list) and ``_sessions`` (dict) on the instance."""

    name: str
    kind: str
    _variants: list[PlanVariant]
    _sessions: dict[str, ort.InferenceSession]

    @property
    def variants(self) -> tuple[PlanVariant, ...]:
        """Built graphs, one per accepted signature; the first is the plan's identity."""
        return tuple(self._variants)

    @property
    def is_built(self) -> bool:
        return bool(self._variants)

    @property
    def id(self) -> str:
        """Short content id of the first variant ("" before the plan is built)."""
        return self._variants[0].id[:12] if self._variants else ""

    def variant_for(self, args: Signature, examples: Sequence[Any] | None = None) -> PlanVariant:
        """The first variant accepting (wire dtype, shape) ``args``; builds one when the plan can
        (tracing ``examples``, the call's own tensors, when given, else random values).

        TypeError names the plan, the argument and what was expected when nothing fits.
        """
        for variant in self._variants:
            if variant.mismatch(args) is None:
                return variant
        built = self._build_variant_for(args, examples)
        if built is None:
            raise TypeError(self._mismatch_message(args))
        return built

    def _build_variant_for(self, args: Signature, examples: Sequence[Any] | None) -> PlanVariant | None:
        """Hook for plans that still have their Python code; None means "cannot build"."""
        return None

    def _mismatch_message(self, args: Signature) -> str:
        got = ", ".join(f"{dtype}{list(shape)}" for dtype, shape in args)
        if not self._variants:
            return f"plan {self.name!r} is not built and cannot be built for ({got})"
        whys = [v.mismatch(args) for v in self._variants]
        if len(whys) == 1:
            return f"plan {self.name!r} does not accept these arguments: {whys[0]}"
        listed = "; ".join(f"variant {i}: {w}" for i, w in enumerate(whys))
        return f"plan {self.name!r} does not accept these arguments ({got}): {listed}"

    # -- running ------------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        """Run locally in onnxruntime (torch tensors in and out), or on a worker when given pointers."""
        pointer = next((a for a in args if isinstance(a, PointerTensor)), None)
        if pointer is not None:
            return pointer.worker.plan_pointer(self)(*args)
        return self.run(*args)

    def run(self, *args: Any) -> Any:
        """Run the plan on local tensors in onnxruntime; one tensor, or a tuple for several outputs."""
        arrays = [as_array(a) for a in args]
        variant = self.variant_for([(to_wire(a.dtype), a.shape) for a in arrays], examples=args)
        session = self._sessions.get(variant.id)
        if session is None:
            session = self._sessions[variant.id] = runtime.make_session(variant.data)
        outputs = [wrap(o) for o in runtime.run(session, variant, arrays)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def send(self, worker: Any) -> Any:
        """Register the plan on ``worker`` (bytes go once per worker) and return its PointerPlan."""
        if not self._variants:
            raise RuntimeError(NOT_BUILT)
        return worker.plan_pointer(self)

    # -- files and display --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, variant: int = 0) -> Path:
        """Write one variant as a standard .onnx file (with planwire metadata) that onnxruntime runs."""
        if not self._variants:
            raise RuntimeError("A plan needs to be built before being saved.")
        path = Path(path)
        path.write_bytes(self._variants[variant].data)
        return path

    @property
    def code(self) -> str:
        """The first variant's graph as ONNX text (weights included: can be long). Needs the onnx package."""
        if not self._variants:
            return f"# plan {self.name} is not built: call .build(*example_args)"
        try:
            import onnx
        except ImportError as e:
            raise ImportError(
                "plan.code prints the graph with the onnx package, which a worker-only install lacks: "
                "pip install onnx (or planwire[export])"
            ) from e
        return onnx.printer.to_text(onnx.load_from_string(self._variants[0].data))

    @property
    def parameter_count(self) -> int:
        """Elements of state (weights, buffers) the plan carries; 0 before it is built."""
        if not self._variants:
            return 0
        first = self._variants[0]
        return summary.facts(first).state_size(first.inputs)

    def review(
        self,
        shapes: Mapping[str, Sequence[int]] | None = None,
        *,
        batch: int = 1,
        variant: int = 0,
        private: set[str] | None = None,
    ) -> str:
        """The review a data owner's worker prints for this plan (``plan-worker review``), text for text:
        ports, which outputs depend on which inputs, op counts, FLOPs and peak memory at ``shapes`` (input
        name -> sizes; every other dynamic axis ``batch``), the fingerprint and a ``policy.toml`` snippet.
        Show it to the owner before sending: ``print(plan.review(batch=32))``."""
        if not self._variants:
            raise RuntimeError("A plan needs to be built before being reviewed.")
        return format_review(review(self._variants[variant].data, shapes, batch), private)

    def signature(self, variant: int = 0) -> str:
        """``(x: float32[?, 2]) -> (output: float32[?, 2])`` of one variant (every port)."""
        v = self._variants[variant]
        return f"({', '.join(map(str, v.inputs))}) -> ({', '.join(map(str, v.outputs))})"

    def __repr__(self) -> str:
        """A bounded summary (ports, parameter count, bytes), never the weights: see :attr:`code`."""
        return summary.line(type(self).__name__, self.name, self._variants, self.parameter_count)

    __str__ = __repr__  # print(plan) too: a 1M-parameter plan must not print megabytes of text
