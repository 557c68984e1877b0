"""`make demo`: start real plan-worker processes on loopback, run the seed walkthrough through
``planwire.connect`` (one worker per device), then stop them; then the federated training example."""

from __future__ import annotations

import runpy
import tempfile
from pathlib import Path

import numpy as np

import planwire as sy
from planwire.worker.process import WorkerProcess

HERE = Path(__file__).parent


def main() -> None:
    import seed_walkthrough as walk  # examples/ is on sys.path when run as a script
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
    federated = HERE / "federated.py"
    if federated.exists():
        runpy.run_path(str(federated), run_name="__main__")


if __name__ == "__main__":
    main()
