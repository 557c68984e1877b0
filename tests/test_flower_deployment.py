"""A Flower deployment on loopback: SuperLink, three SuperNodes and ``flwr run``, real processes all.

Two SuperNodes train with the planwire ClientApp on their own partition of the digits; the third has no
data of its own and no planwire runtime in the loop: its config names a plan-worker, which holds that
node's examples as private tensors, and the same ClientApp bridges the plan and the weights there over
planwire's protocol. Insecure mode (no TLS) is for this loopback test only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="planwire[flower] is not installed")

from planwire.worker.process import WorkerProcess

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(APP))

from planwire_digits.task import partition  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A Flower process in its own process group (SuperLink starts children), logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.log_path = name, logs / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: no {pattern!r} within {timeout} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:  # the group may outlive its leader
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


@pytest.fixture
def procs() -> Iterator[list]:
    started: list = []
    yield started
    for p in reversed(started):
        p.stop() if isinstance(p, Proc) else p.close()


def save_batches(path: Path, x: np.ndarray, y: np.ndarray, batch: int = 32) -> None:
    """A plan-worker data file: batches tagged images.<b> and labels.<b>."""
    arrays = {}
    for b, lo in enumerate(range(0, len(x), batch)):
        arrays[f"images.{b}"], arrays[f"labels.{b}"] = x[lo : lo + batch], y[lo : lo + batch]
    np.savez(path, **arrays)


@pytest.mark.timeout(600)
def test_flower_deployment_with_a_plan_worker_node(tmp_path: Path, procs: list) -> None:
    home, logs = tmp_path / "flwr-home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    # Flower starts its helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name from PATH.
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    save_batches(tmp_path / "node2.npz", *partition(2, 3))
    # --public: the bridge fetches trained weights, which the trust model keeps on a private-data worker
    # unless its owner's policy releases them; a policy-aware bridge (updates -> weights) is still to come.
    worker = WorkerProcess("flower-node-2", data=[str(tmp_path / "node2.npz")], extra=["--public"])
    procs.append(worker)

    link = Proc(
        "superlink",
        [
            "flower-superlink",
            "--insecure",
            "--port",
            str(port),
            "--database",
            ":flwr-in-memory:",
            "--disable-runtime-dependency-installation",
        ],
        env,
        logs,
    )
    procs.append(link)
    link.wait_for("Uvicorn running on")
    node_configs = [
        "partition-id=0 num-partitions=3",
        "partition-id=1 num-partitions=3",
        f'planwire-worker="{worker.url}"',  # no data here: the bridge must train on the worker
    ]
    for i, node_config in enumerate(node_configs):
        node = Proc(
            f"supernode{i}",
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            env,
            logs,
        )
        procs.append(node)
        node.wait_for("SuperNode ID")

    config = (
        "num-server-rounds=2 fraction-train=1.0 fraction-evaluate=1.0 min-available-nodes=3 "
        "local-epochs=2 batch-size=32 lr=0.05"
    )
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "loopback", "--stream", "--run-config", config],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
        cwd=tmp_path,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    assert out.count("aggregate_train: Received 3 results and 0 failures") == 2, out[-5000:]
    assert out.count("aggregate_evaluate: Received 3 results and 0 failures") == 2, out[-5000:]
    sent = re.findall(r"planwire: plan \w+ \(\d+ bytes\) sent to (\d+) node", out)
    assert sent == ["3"], sent  # once per node, in the first round only
    initial = float(re.search(r"Initial global evaluation results: .*'accuracy': ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    accuracy = float(re.search(r"final held-out accuracy: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert accuracy > initial + 0.3, out[-3000:]  # 2 rounds: learning, not converged (test_flower shows > 0.9)
    assert "registered plan 'train_CNN'" in worker.log()  # the third node trained on the plan-worker
