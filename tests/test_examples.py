"""The examples run as users run them: `make demo` is examples/demo.py (real plan-worker processes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conformance.workers import node_missing

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_seed_and_federated_training_on_real_workers(tmp_path: Path):
    plot = tmp_path / "federated.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--plot", str(plot)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert re.search(r"started plan-worker device_1 at tcp://127\.0\.0\.1:\d+ and device_2 at ipc://", text)
    assert "A plan needs to be built before being sent to a worker." in text
    assert "tensor([2., 4.])" in text and "tensor([2, 1])" in text
    assert "seed walkthrough: all cells reproduced" in text
    rounds = [float(a) for a in re.findall(r"round \d+: mean local loss [\d.]+, held-out accuracy ([\d.]+)", text)]
    assert len(rounds) >= 3 and rounds[-1] > 0.90
    # each round's loss is the example-weighted mean over all its local steps (not one worker's last batch)
    steps = re.findall(r"round \d+: .*, local accuracy [\d.]+ \((\d+) steps, (\d+) examples\)", text)
    assert len(steps) == len(rounds) and all(int(n) > 1 for n, _ in steps)
    assert f"loss/accuracy plot: {plot}" in text and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'next steps: README.md, "Next steps"' in text
    # workers of both languages under the same owners' policy when the Node.js worker can run here
    if node_missing():
        assert "federation: 3 Python plan-workers (no Node.js worker:" in text
    else:
        assert "mixed federation: 2 Python and 1 Node.js plan-worker(s), one policy" in text
        assert re.search(r"hospital_2 \(Node\.js, \d+ batches", text)
    releases = re.search(r"audit logs: \[(\d+), (\d+), (\d+)\] releases", text)
    assert releases and all(int(n) > 0 for n in releases.groups())  # every worker released under the policy
