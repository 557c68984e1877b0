"""plan-worker: serve a Service over ZeroMQ. Never imports torch: onnxruntime alone runs the plans.

``plan-worker --listen URL ...`` serves (worker/serve.py, options in worker/options.py); ``plan-worker keys
DIR`` makes a CURVE key pair; ``plan-worker status ADDR`` shows a live worker to its operator; ``plan-worker
check`` says where plans would run (worker/commands.py); ``plan-worker review`` reviews a plan
(worker/review.py). A configuration error is one line on stderr and exit status 2, before anything is bound.
"""

from __future__ import annotations

import logging
import os
import sys

SUBCOMMANDS = ("keys", "status", "check", "review")


def _on_glibc_malloc(argv: list[str]) -> None:
    """Start this worker again with ``PYTHONMALLOC=malloc`` (same pid, same arguments) unless it is set.

    Python's own small-object allocator keeps a 1 MiB arena as long as one object in it lives: a few objects
    kept from a burst of requests pin most of what the burst used, and the worker's RSS stays up. On glibc's
    malloc the heap trim after a quiet spell (worker/heap.py) gives it all back (16 clients x 10,000 calls:
    RSS 1.30x -> 1.04x of before, bench/load.py). Done first, before anything heavy is imported, so it costs
    one bare interpreter start. Set ``PYTHONMALLOC`` yourself (e.g. ``pymalloc``) to keep another allocator."""
    if "PYTHONMALLOC" in os.environ or not sys.platform.startswith("linux"):
        return
    os.environ["PYTHONMALLOC"] = "malloc"
    try:  # the very command line it was started with (interpreter flags, script path: no new sys.path entry)
        os.execv(sys.executable, sys.orig_argv)
    except OSError:  # cannot start again: serve on the allocator it has
        del os.environ["PYTHONMALLOC"]


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as the program (not called from Python): the worker may start itself again
        argv = sys.argv[1:]
        if argv[:1] and argv[0] not in SUBCOMMANDS and "--check" not in argv and "--help" not in argv:
            _on_glibc_malloc(argv)
    from planwire.worker.commands import check_main, keys_main, status_main
    from planwire.worker.options import ConfigError, parse_args

    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    if argv[:1] == ["check"] or "--check" in argv:
        return check_main([a for a in argv if a != "--check"][1 if argv[:1] == ["check"] else 0 :])
    if argv[:1] == ["review"]:
        from planwire.worker.review import main as review_main

        return review_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from planwire.worker.serve import serve

    cleanup: list = []
    try:
        return serve(args, cleanup)
    except ConfigError as e:  # every configuration error exits with 2 and one clear line
        print(f"plan-worker: {e}", file=sys.stderr)
        return 2
    finally:
        for close in reversed(cleanup):
            close()


if __name__ == "__main__":
    sys.exit(main())
