"""A Flower deployment on loopback: SuperLink, four SuperNodes and ``flwr run``, real processes all.

Two SuperNodes train with the planwire ClientApp on their own partition of the digits; the other two
have no data of their own and no planwire runtime in the loop: their config names a plan-worker, which
holds that node's examples as private tensors, and the same ClientApp bridges the plan and the weights
there over planwire's protocol. The third node's worker has a data owner's policy approving the plan
(weights released as updates, loss and accuracy as they are); the fourth node's worker has none, so its
node fails every round with an error naming the missing rule, the others go on, and nothing leaves that
worker. Insecure mode (no TLS) is for this loopback test only.
"""

from __future__ import annotations

import contextlib
import json
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

from planwire.flower import fingerprint
from planwire.worker.process import WorkerProcess
from planwire.worker.review import policy_snippet, review

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(APP))

from planwire_digits.model import build  # noqa: E402
from planwire_digits.task import partition  # noqa: E402

LR = 0.05
MIN_BATCH = 16


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
    """A plan-worker data file: batches tagged images.<b> and labels.<b>; a last batch of fewer than the
    policy's min_batch rows is left out (the owner releases nothing computed on so few rows)."""
    arrays = {}
    starts = [lo for lo in range(0, len(x), batch) if len(x) - lo >= MIN_BATCH]
    for b, lo in enumerate(starts):
        arrays[f"images.{b}"], arrays[f"labels.{b}"] = x[lo : lo + batch], y[lo : lo + batch]
    np.savez(path, **arrays)


def owner_policy(plan: bytes) -> str:
    """What the third node's data owner approved after `plan-worker review`: the review's snippet, with
    the learning rate bounded."""
    return policy_snippet(review(plan)) + 'inputs."hyper.lr" = { min = 0.0, max = 0.1 }\n'


@pytest.mark.timeout(900)
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

    _, plan = build(lr=LR, seed=0)  # the plan the ServerApp builds and sends, as its data owner reviewed it
    (tmp_path / "policy.toml").write_text(owner_policy(plan))
    save_batches(tmp_path / "node2.npz", *partition(2, 4))
    save_batches(tmp_path / "node3.npz", *partition(3, 4))
    worker = WorkerProcess(  # private data (no --public): only what the policy releases leaves
        "flower-node-2",
        data=[str(tmp_path / "node2.npz")],
        extra=["--policy", str(tmp_path / "policy.toml"), "--audit", str(tmp_path / "audit2.jsonl")],
    )
    procs.append(worker)
    unapproved = WorkerProcess(  # private data and no policy: nothing it computes from the data may leave
        "flower-node-3", data=[str(tmp_path / "node3.npz")], extra=["--audit", str(tmp_path / "audit3.jsonl")]
    )
    procs.append(unapproved)

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
        "partition-id=0 num-partitions=4",
        "partition-id=1 num-partitions=4",
        f'planwire-worker="{worker.url}"',  # no data here: the bridge must train on the worker
        f'planwire-worker="{unapproved.url}"',
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
        "num-server-rounds=3 fraction-train=1.0 fraction-evaluate=1.0 min-available-nodes=4 "
        f"local-epochs=4 batch-size=32 lr={LR}"
    )
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "loopback", "--stream", "--run-config", config],
        env=env,
        capture_output=True,
        text=True,
        timeout=720,  # a clientapp process per message: ~4.5 min on 2 busy cores
        cwd=tmp_path,
    )
    out = run.stdout + run.stderr
    (logs / "flwr-run.log").write_text(out)
    assert run.returncode == 0, out[-5000:]
    assert out.count("aggregate_train: Received 3 results and 1 failures") == 3, out[-5000:]
    assert out.count("aggregate_evaluate: Received 3 results and 1 failures") == 3, out[-5000:]
    # The fourth node's error names the rule its data owner would have to add; nothing was released there.
    assert f'has no rule for this plan (fingerprint = "{fingerprint(plan)}")' in out, out[-5000:]
    assert "keeps the weights that plan 'train_CNN' trains on its data" in out
    assert "keeps the loss and metrics that plan 'train_CNN' computes on its data" in out
    assert not events(tmp_path / "audit3.jsonl", "released")
    # The third node trained on its plan-worker; the policy released the weights as updates, every round.
    assert "registered plan 'train_CNN'" in worker.log()
    released = events(tmp_path / "audit2.jsonl", "released")
    assert released and not events(tmp_path / "audit2.jsonl", "refused")
    updates = [r for r in released if any(o.startswith("new.param.") for o in r["outputs"])]
    assert len(updates) == 3 * 6, len(updates)  # 3 rounds x the CNN's 6 parameter tensors
    # The plan's bytes go to each node once; the refusing node answers with errors, so it is sent them again.
    sent = [int(n) for n in re.findall(r"planwire: plan \w+ \(\d+ bytes\) sent to (\d+) node", out)]
    assert sent[0] == 4 and set(sent[1:]) <= {1}, sent
    accuracy = float(re.search(r"final held-out accuracy: ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.90, out[-3000:]


def events(path: Path, kind: str) -> list[dict]:
    """The ``kind`` events of a plan-worker's audit log."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == kind]
