"""Review of a plan for the data owner who approves it: what goes in and out, what depends on what, what it
costs at given input sizes, and a ``policy.toml`` snippet.

One renderer for both sides, read from the plan's bytes alone (no onnxruntime session, no ``onnx``):
the worker's ``plan-worker review PLAN.onnx|FINGERPRINT`` (worker/review.py) and the exporter's
``plan.review()`` print the same text for the same bytes, so what a data scientist shows the owner before
sending is what the owner's worker shows after.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from planwire.transport import dtypes
from planwire.transport.dataflow import analyze
from planwire.transport.estimate import Estimate, estimate, input_shapes
from planwire.transport.graph import ELEM_TYPES, read_graph
from planwire.transport.plancheck import check_model
from planwire.transport.spec import META_INPUTS, META_KIND, META_NAME, META_OUTPUTS, TensorSpec

MAX_REVIEW_BYTES = 2 << 30
_STATE = frozenset({"param", "frozen", "buffer", "optim", "hyper"})  # a training plan's fixed-shape inputs


@dataclass(frozen=True)
class Review:
    fingerprint: str
    name: str
    kind: str
    size: int
    inputs: list[TensorSpec]
    """Each input as the graph declares it, with its role from the plan's metadata ("" where none)."""
    outputs: list[TensorSpec]
    deps: list[list[str]]
    """Per output: the names of the inputs it depends on."""
    ops: dict[str, int]
    estimate: Estimate | None = None
    batch: int = 1
    """The size every dynamic axis of the estimate was given (unless its input's shape was)."""


def review(data: bytes, shapes: Mapping[str, Sequence[int]] | None = None, batch: int = 1) -> Review:
    """Review of serialized ONNX ``data`` (checked as a worker would check it; ValueError if refused, or if
    ``shapes`` names no input or does not fit one). The cost estimate is at ``shapes`` (input name -> sizes)
    with every other dynamic axis set to ``batch``."""
    check_model(data, max_bytes=MAX_REVIEW_BYTES)
    g = read_graph(data)
    meta = g.metadata
    roles = {p.get("name"): p for p in _json_list(meta.get(META_INPUTS))}
    out_roles = {p.get("name"): p for p in _json_list(meta.get(META_OUTPUTS))}

    def dims(vt_dims: tuple | None) -> tuple:
        return tuple(d if isinstance(d, int) and d >= 0 else (d or None) for d in vt_dims or ())

    inputs = [
        TensorSpec(n, _wire(vt.elem), dims(vt.dims), str(roles.get(n, {}).get("role", "")))
        for n, vt in g.inputs.items()
    ]
    outputs = [
        TensorSpec(
            n,
            _wire(vt.elem),
            dims(vt.dims),
            str(out_roles.get(n, {}).get("role", "")),
            str(out_roles.get(n, {}).get("binds", "")) or None,
        )
        for n, vt in g.outputs.items()
    ]
    f = analyze(data, [p.name for p in inputs], [p.name for p in outputs])
    deps = [[inputs[i].name for i in sorted(d)] for d in f.deps]
    return Review(
        hashlib.sha256(data).hexdigest(),
        meta.get(META_NAME, ""),
        meta.get(META_KIND, ""),
        len(data),
        inputs,
        outputs,
        deps,
        dict(sorted(f.ops.items(), key=lambda kv: -kv[1])),
        estimate(g, input_shapes(g, shapes, batch)),
        batch,
    )


def _wire(elem: int) -> str:
    return ELEM_TYPES.get(elem, (f"type {elem}", 0))[0]


def _json_list(text: str | None) -> list[dict]:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _shape(shape: Sequence | None) -> str:
    if shape is None:
        return "[unknown rank]"
    return "[" + ", ".join("?" if d is None or d == "" else str(d) for d in shape) + "]"


def policy_snippet(r: Review) -> str:
    """A ``[[plan]]`` table approving this plan: metrics and losses as they are, trained parameters as their
    update; bounds of hyper-parameters suggested as comments. Edit before use."""
    lines = ["[[plan]]", f'fingerprint = "{r.fingerprint}"', f"name = {json.dumps(r.name or r.fingerprint[:12])}"]
    lines.append("min_batch = 16  # refuse releases computed on fewer rows")
    params = {p.name for p in r.inputs if p.role == "param"}
    any_update = False
    for p in r.outputs:
        if p.binds and p.binds in params:
            lines.append(f"outputs.{json.dumps(p.name)} = {{ update = {json.dumps(p.binds)} }}")
            any_update = True
        elif p.binds:
            lines.append(f"# outputs.{json.dumps(p.name)}: {p.role or 'state'} of {p.binds!r}, stays on the worker")
        else:
            lines.append(f'outputs.{json.dumps(p.name)} = "as_is"')
    if any_update:
        lines.append("# update = { clip_norm = 1.0, noise_multiplier = 1.1 }  # clipping and Gaussian noise")
    for p in r.inputs:
        if p.role == "hyper":
            lines.append(f"# inputs.{json.dumps(p.name)} = {{ min = 0.0, max = 0.1 }}  # bound or pin (equal = ...)")
    return "\n".join(lines) + "\n"


def human_count(n: float) -> str:
    """12.3 k, 4.56 M, 7.89 G."""
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:g}"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


COUNTS = (
    "an estimate: 2 FLOPs per multiply-add of MatMul/Gemm/Conv (+1 per output element for a bias), 1 per "
    "output element of elementwise ops (softmax 3, normalizations 5), 1 per element read by reductions and "
    "pooling windows, 0 for data movement; memory as the tensors alive when the nodes run in the plan's "
    "order, without onnxruntime's fusions, buffer reuse or workspaces"
)


def format_estimate(e: Estimate, batch: int = 1, dynamic: Sequence[str] | None = None) -> list[str]:
    """The estimate's lines of a review; ``dynamic``: the inputs whose sizes are named (the others have
    fixed shapes and are counted)."""
    named = [n for n in e.shapes if dynamic is None or n in dynamic]
    at = ", ".join(f"{n}={_shape(e.shapes[n])}" for n in named) or "no dynamic inputs"
    rest = len(e.shapes) - len(named)
    at += f" (+{rest} inputs of fixed shape)" if rest else ""
    lines = [f"cost at {at}; dynamic axes {batch} unless given (--batch N, --shape NAME=D0,D1,...):"]
    top = ", ".join(f"{op} {n:,}" for op, n in list(e.flops_by_op.items())[:6])
    more = len(e.flops_by_op) - 6
    top += f", +{more} more" if more > 0 else ""
    lines.append(f"  FLOPs {e.flops:,} ({human_count(e.flops)}){': ' + top if top else ''}")
    lines.append(
        f"  peak memory {human_bytes(e.peak_bytes)}: initializers {human_bytes(e.initializer_bytes)}, inputs "
        f"{human_bytes(e.input_bytes)}, intermediates at most {human_bytes(e.intermediate_peak_bytes)} at once "
        f"(outputs {human_bytes(e.output_bytes)})"
    )
    if e.by_element:
        lines.append(
            "  counted 1 per output element (no rule): " + ", ".join(f"{k} {n}" for k, n in e.by_element.items())
        )
    if e.uncounted:
        lines.append(
            "  NOT counted (control-flow bodies, local functions, unknown shapes): "
            + ", ".join(f"{k} {n}" for k, n in e.uncounted.items())
        )
    unknown_inputs = [n for n, s in e.shapes.items() if s is None]
    if e.unknown_values or unknown_inputs:
        what = f"inputs {', '.join(unknown_inputs)} and " if unknown_inputs else ""
        lines.append(f"  size unknown (counted 0, so this is a lower bound): {what}{e.unknown_values} values")
    lines += textwrap.wrap(f"({COUNTS})", 110, initial_indent="  ", subsequent_indent="   ")
    return lines


def format_review(r: Review, private: set[str] | None = None) -> str:
    """The review as text. ``private``: input names marked as fed private data (default: the batch, the
    inputs of role ``arg``; without roles, every input)."""
    if private is None:
        private = {p.name for p in r.inputs if p.role in ("arg", "")}
    lines = [
        f"plan {r.name or '(unnamed)'}{f' ({r.kind})' if r.kind else ''}",
        f"fingerprint {r.fingerprint}",
        f"size {r.size} bytes",
        "inputs:",
    ]
    for p in r.inputs:
        mark = "  [private data]" if p.name in private else ""
        lines.append(f"  {p.name}: {dtypes.human(p.dtype)} {_shape(p.shape)}{f' ({p.role})' if p.role else ''}{mark}")
    lines.append("outputs (and the inputs each depends on):")
    for p, d in zip(r.outputs, r.deps, strict=True):
        leaks = sorted(set(d) & private)
        what = f"PRIVATE-DERIVED from {', '.join(leaks)}" if leaks else "does not depend on private data"
        role = f" ({p.role}{f', new {p.binds}' if p.binds else ''})" if p.role or p.binds else ""
        lines.append(f"  {p.name}: {dtypes.human(p.dtype)} {_shape(p.shape)}{role}")
        lines.append(f"    depends on: {', '.join(d) if d else 'nothing (constant)'}; {what}")
    lines.append("ops: " + ", ".join(f"{op} {n}" for op, n in r.ops.items()))
    if r.estimate is not None:
        dynamic = [p.name for p in r.inputs if p.role not in _STATE and any(not isinstance(d, int) for d in p.shape)]
        lines += format_estimate(r.estimate, r.batch, dynamic)
    lines.append("")
    lines.append("policy.toml snippet to approve it (check it first):")
    lines.append(policy_snippet(r))
    return "\n".join(lines)
