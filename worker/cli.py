"""plan-worker: serve a Service over ZeroMQ. Never imports torch: onnxruntime alone runs the plans.

``plan-worker --listen URL ...`` serves (worker/serve.py, options in worker/options.py); ``plan-worker keys
DIR`` makes a CURVE key pair; ``plan-worker status ADDR`` shows a live worker to its operator; ``plan-worker
check`` says where plans would run (worker/commands.py); ``plan-worker review`` reviews a plan
(worker/review.py). A configuration error is one line on stderr and exit status 2, before anything is bound.
"""

from __future__ import annotations

import logging
import sys

from planwire.worker.commands import check_main, keys_main, status_main
from planwire.worker.options import ConfigError, parse_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
