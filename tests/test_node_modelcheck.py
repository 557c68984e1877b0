"""The Node worker's plan checks (worker/node/src/modelcheck.js) against the Python worker's
(planwire.transport.plancheck), plan for plan: the hostile corpus, real plans, every truncation of a rich
plan, and a few thousand seeded mutations of them must get the same verdict, the same code and the same
message (or both accept, with the same node count and ports of unknown rank). Skipped without node."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from planwire.transport.plancheck import PlanRejected, check_model
from tests import hostile
from tests.conformance import plans
from tests.conformance.workers import NODE_DIR, node_missing

pytestmark = pytest.mark.skipif(bool(node_missing()), reason=node_missing() or "")
MAX_BYTES = 1 << 20
MAX_NODES = 5_000


def python_verdict(data: bytes) -> dict:
    try:
        s = check_model(data, max_bytes=MAX_BYTES, max_nodes=MAX_NODES)
    except PlanRejected as e:
        return {"ok": False, "code": e.code, "message": str(e)}
    return {"ok": True, "nodes": s.expanded_node_count, "unknown_rank": sorted(s.unknown_rank)}


def node_verdicts(paths: list[Path]) -> list[dict]:
    out: list[dict] = []
    for i in range(0, len(paths), 500):  # bounded command lines
        done = subprocess.run(
            ["node", str(NODE_DIR / "bin" / "check-plans.js"), "--max-bytes", str(MAX_BYTES),
             "--max-nodes", str(MAX_NODES), *map(str, paths[i : i + 500])],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        out += [json.loads(line) for line in done.stdout.splitlines()]
    return out


def mutants(seeds: list[bytes], n: int, rng: np.random.Generator) -> list[bytes]:
    """Seeded flips, inserts, cuts and splices (as tests/fuzzing.py's plan_bytes), and random bytes."""
    out = []
    for k in range(n):
        if k % 6 == 0:
            out.append(rng.bytes(int(rng.integers(0, 256))))
            continue
        data = bytearray(seeds[int(rng.integers(len(seeds)))])
        for _ in range(int(rng.integers(1, 5))):
            op, i = int(rng.integers(4)), int(rng.integers(max(1, len(data))))
            if op == 0 and data:
                data[i] = int(rng.integers(256))
            elif op == 1:
                data[i:i] = rng.bytes(int(rng.integers(1, 9)))
            elif op == 2:
                del data[i:]
            else:
                data[i:i] = seeds[int(rng.integers(len(seeds)))][: int(rng.integers(0, 65))]
        out.append(bytes(data))
    return out


def test_the_node_checks_agree_with_the_python_checks(tmp_path: Path) -> None:
    corpus = [h.build() for h in hostile.CORPUS]
    real = [plans.sum_and_diff(), plans.matmul(), plans.with_metadata(), plans.any_rank("float"),
            plans.endless_loop(), plans.constant_of_shape_bomb()]  # fmt: skip
    seeds = real + corpus
    cuts = [real[0][:i] for i in range(len(real[0]))]
    cases = seeds + cuts + mutants(seeds, 3000, np.random.default_rng(1234))
    paths = []
    for i, data in enumerate(cases):
        paths.append(tmp_path / f"{i}.onnx")
        paths[-1].write_bytes(data)
    got = node_verdicts(paths)
    assert len(got) == len(cases)
    accepted = 0
    for i, (data, js) in enumerate(zip(cases, got, strict=True)):
        want = python_verdict(data)
        js.pop("file")
        assert js == want, f"case {i} ({len(data)} bytes): node {js} != python {want}"
        accepted += want["ok"]
    assert 0 < accepted < len(cases)  # both verdicts are exercised
