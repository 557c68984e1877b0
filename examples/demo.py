"""`make demo`: start real plan-worker processes on loopback, run the seed walkthrough through
``planwire.connect`` (one worker per device), then stop them; then the federated training example, which
writes its loss/accuracy plot to build/demo/federated.png (``--plot`` elsewhere)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import planwire as sy
from planwire.worker.process import WorkerProcess

HERE = Path(__file__).parent
PLOT = Path("build") / "demo" / "federated.png"


def main() -> None:
    parser = argparse.ArgumentParser(description="planwire's demo: the seed walkthrough, then federated training")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where the federated run's PNG goes (%(default)s)")
    args = parser.parse_args()
    import federated  # examples/ is on sys.path when run as a script
    import seed_walkthrough as walk
    import torch

    sy.TorchHook(torch)
    with tempfile.TemporaryDirectory(prefix="planwire-demo-") as tmp:
        x1, x2 = walk.seed_data()
        data = Path(tmp) / "device.npz"  # each key of an .npz is the tag of its tensor
        np.savez(data, input_data=x1.numpy(), input_data2=x2.numpy())
        with (
            WorkerProcess("device_1", data=[str(data)]) as w1,
            WorkerProcess("device_2", listen=f"ipc://{tmp}/device_2.ipc", data=[str(data)]) as w2,
        ):
            print(f"started plan-worker device_1 at {w1.url} and device_2 at {w2.url}")
            with sy.connect(w1.url) as device_1, sy.connect(w2.url) as device_2:
                walk.main((device_1, device_2))
        print("workers stopped")
    federated.main(["--plot", str(args.plot)])
    print(
        '\nnext steps: README.md, "Next steps" (write your own plan, run a plan-worker on another machine, '
        "train on data you never see)"
    )


if __name__ == "__main__":
    main()
