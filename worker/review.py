"""``plan-worker review PLAN.onnx|FINGERPRINT``: the review of a plan file or of one the worker kept (every
plan a worker receives is kept under ``--plans-dir``, named by its fingerprint).

The review itself (ports, data flow, cost estimate, policy snippet) is transport/review.py, shared with the
exporter: a data scientist prints the same text before sending with ``print(plan.review())``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection
from pathlib import Path

from planwire.transport.errors import ProtocolError
from planwire.transport.review import Review, format_review, policy_snippet, review

__all__ = [
    "Review",
    "default_plans_dir",
    "find",
    "format_review",
    "keep",
    "main",
    "parse_shape",
    "policy_snippet",
    "review",
]


def default_plans_dir() -> Path:
    """Where a worker keeps the plans it received: $XDG_STATE_HOME/planwire/plans (or ~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "planwire" / "plans"


def keep(directory: Path, pid: str, data: bytes) -> None:
    """Store a received plan as DIR/FINGERPRINT.onnx (once; never overwritten). A plan received again is
    marked as recent (its file's mtime), so :func:`prune` removes the plans least recently received first."""
    path = directory / f"{pid}.onnx"
    if path.exists():
        os.utime(path)
        return
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def prune(directory: Path, max_bytes: int, referenced: Collection[str]) -> tuple[list[tuple[str, int]], int]:
    """Remove kept plans, least recently received first, until DIR's plans fit in ``max_bytes``; never one
    whose fingerprint is in ``referenced`` (registered now, or approved by the policy). Returns the
    (fingerprint, bytes) removed and the bytes kept after."""
    plans = []
    for path in directory.glob("*.onnx"):
        try:
            st = path.stat()
        except OSError:  # removed meanwhile
            continue
        plans.append((st.st_mtime, path.stem, st.st_size, path))
    total = sum(p[2] for p in plans)
    removed = []
    for _, pid, size, path in sorted(plans):
        if total <= max_bytes:
            break
        if pid in referenced:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        removed.append((pid, size))
    return removed, total


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


def parse_shape(text: str) -> tuple[str, list[int]]:
    """``NAME=D0,D1,...`` (``NAME=`` for a scalar) as (name, sizes); ValueError says what is wrong."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, [int(d) for d in dims.split(",")] if dims.strip() else []
    except ValueError:
        raise ValueError(f"--shape {text!r}: write NAME=D0,D1,... (whole numbers), e.g. x=32,3,28,28") from None


def main(argv: list[str] | None = None) -> int:
    """``review PLAN.onnx|FINGERPRINT [--plans-dir DIR] [--batch N] [--shape NAME=D0,D1,...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="plan-worker review", description="Review a plan before approving it.")
    ap.add_argument("plan", metavar="PLAN.onnx|FINGERPRINT")
    ap.add_argument(
        "--plans-dir", type=Path, help=f"where the worker keeps received plans (default {default_plans_dir()})"
    )
    ap.add_argument("--batch", type=int, default=1, help="size of every dynamic axis in the cost estimate (default 1)")
    ap.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=D0,D1,...",
        help="an input's whole shape for the cost estimate (repeatable; its dynamic axes then bind the others)",
    )
    args = ap.parse_args(argv)
    try:
        shapes = dict(parse_shape(s) for s in args.shape)
        print(format_review(review(find(args.plan, args.plans_dir), shapes, args.batch)))
    except (ValueError, OSError, ProtocolError) as e:
        print(f"plan-worker review: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
