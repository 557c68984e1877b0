"""``python -m planwire review PLAN.onnx [--batch N] [--shape NAME=D0,D1,...]``: the review a data owner's
worker prints for a plan (the same text as ``plan-worker review`` and ``plan.review()``), to show the owner
before sending it."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["review"]:
        print("usage: python -m planwire review PLAN.onnx [--batch N] [--shape NAME=D0,D1,...]", file=sys.stderr)
        return 2
    from planwire.worker.review import main as review_main

    return review_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
