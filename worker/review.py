"""Review of a plan for its approver: what goes in and out, what depends on what, and a policy snippet.

``plan-worker review PLAN.onnx|FINGERPRINT`` prints it for a plan file or one the worker kept (every plan
a worker receives is kept under ``--plans-dir``, named by its fingerprint); a data scientist prints the same
review before sending with ``python -m planwire.worker.review PLAN.onnx``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from planwire.transport import dtypes
from planwire.transport.errors import ProtocolError
from planwire.transport.plancheck import check_model
from planwire.worker import flow
from planwire.worker.runtime import OrtPlan

MAX_REVIEW_BYTES = 2 << 30


def default_plans_dir() -> Path:
    """Where a worker keeps the plans it received: $XDG_STATE_HOME/planwire/plans (or ~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "planwire" / "plans"


def keep(directory: Path, pid: str, data: bytes) -> None:
    """Store a received plan as DIR/FINGERPRINT.onnx (once; never overwritten)."""
    path = directory / f"{pid}.onnx"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


@dataclass(frozen=True)
class Port:
    name: str
    dtype: str
    shape: list
    role: str = ""
    binds: str = ""


@dataclass(frozen=True)
class Review:
    fingerprint: str
    name: str
    kind: str
    size: int
    inputs: list[Port]
    outputs: list[Port]
    deps: list[list[str]]
    """Per output: the names of the inputs it depends on."""
    ops: dict[str, int]


def review(data: bytes) -> Review:
    """Review of serialized ONNX ``data`` (checked as a worker would check it; ValueError if refused)."""
    summary = check_model(data, max_bytes=MAX_REVIEW_BYTES)
    plan = OrtPlan(data, name="review")
    meta = summary.metadata_props
    roles = {p.get("name"): p for p in _json_list(meta.get("planwire.inputs"))}
    out_roles = {p.get("name"): p for p in _json_list(meta.get("planwire.outputs"))}
    inputs = [Port(n, t, list(s), str(roles.get(n, {}).get("role", ""))) for n, t, s in plan.inputs]
    outputs = [
        Port(n, t, list(s), str(out_roles.get(n, {}).get("role", "")), str(out_roles.get(n, {}).get("binds", "")))
        for n, t, s in plan.outputs
    ]
    f = flow.analyze(data, [p.name for p in inputs], [p.name for p in outputs])
    deps = [[inputs[i].name for i in sorted(d)] for d in f.deps]
    return Review(
        hashlib.sha256(data).hexdigest(),
        meta.get("planwire.name", ""),
        meta.get("planwire.kind", ""),
        len(data),
        inputs,
        outputs,
        deps,
        dict(sorted(f.ops.items(), key=lambda kv: -kv[1])),
    )


def _json_list(text: str | None) -> list[dict]:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _shape(shape: list) -> str:
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
    lines.append("")
    lines.append("policy.toml snippet to approve it (check it first):")
    lines.append(policy_snippet(r))
    return "\n".join(lines)


def find(target: str, plans_dir: Path | None = None) -> bytes:
    """Plan bytes of a file path, or of a fingerprint kept in ``plans_dir``."""
    p = Path(target)
    if p.is_file():
        return p.read_bytes()
    directory = plans_dir or default_plans_dir()
    if len(target) >= 8 and all(c in "0123456789abcdef" for c in target):
        found = sorted(directory.glob(f"{target}*.onnx"))
        if len(found) == 1:
            return found[0].read_bytes()
        if len(found) > 1:
            raise ValueError(f"fingerprint {target!r} is ambiguous in {directory}: give more digits")
    raise ValueError(f"{target!r}: no such plan file, and no kept plan with that fingerprint in {directory}")


def main(argv: list[str] | None = None) -> int:
    """``review PLAN.onnx|FINGERPRINT [--plans-dir DIR]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="plan-worker review", description="Review a plan before approving it.")
    ap.add_argument("plan", metavar="PLAN.onnx|FINGERPRINT")
    ap.add_argument(
        "--plans-dir", type=Path, help=f"where the worker keeps received plans (default {default_plans_dir()})"
    )
    args = ap.parse_args(argv)
    try:
        print(format_review(review(find(args.plan, args.plans_dir))))
    except (ValueError, OSError, ProtocolError) as e:
        print(f"plan-worker review: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
