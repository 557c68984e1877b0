"""One cold build in a fresh interpreter: ``python -m bench.buildchild plan|export``.

Prints the seconds from just after ``import torch`` to the end of the build as one JSON line. ``plan``
is ``planwire.func2plan`` (export + verification, disk cache off); ``export`` is a plain
``torch.onnx.export(dynamo=True)`` of the same function.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings


def main(argv: list[str]) -> int:
    os.environ["PLANWIRE_CACHE_DIR"] = ""  # a cold build: nothing from an earlier run
    warnings.simplefilter("ignore")
    import torch

    from bench.build import SHAPE, make_function, plain_export

    t0 = time.perf_counter()
    if argv[0] == "plan":
        import planwire

        planwire.func2plan(args_shape=[SHAPE])(make_function(1.0))
    else:
        plain_export(make_function(1.0), torch)
    print(json.dumps(time.perf_counter() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
