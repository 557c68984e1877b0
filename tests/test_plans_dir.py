"""--plans-dir keeps every plan a worker with private data receives, under a size cap (--max-plans-dir-mb):
the least recently received plans that are neither registered now nor approved by the policy go first,
each with a log line. A real plan-worker, and prune() itself."""

from __future__ import annotations

import os
import time

import numpy as np
from onnx import helper

from planwire.worker.process import WorkerProcess
from planwire.worker.review import keep, prune
from tests import handmade
from tests.conformance.wire import Peer


def unary(op: str) -> bytes:
    return handmade.variant([helper.make_node(op, ["x"], ["y"])], [("x", "float", ["N"])], [("y", "float", ["N"])]).data


def test_the_oldest_unused_kept_plans_go_first_and_registered_ones_never(tmp_path):
    data = tmp_path / "secret.npy"
    np.save(data, np.float32([1, 2, 3]))
    plans = {op: unary(op) for op in ("Abs", "Neg", "Relu", "Exp")}
    size = {op: len(b) for op, b in plans.items()}
    cap = size["Abs"] + size["Neg"] + size["Relu"] - 1  # three do not fit
    kept = tmp_path / "plans"
    extra = ["--plans-dir", str(kept), "--max-plans-dir-mb", repr(cap / (1 << 20))]
    with WorkerProcess("capped", data=[f"{data}:secret"], extra=extra) as w:
        p = Peer(w.url)
        pid = {op: p.register(plans["Abs"], name="abs")["plan"] for op in ("Abs",)}
        pid["Neg"] = p.register(plans["Neg"], name="neg")["plan"]
        p.ok({"type": "delete_plan", "plan": pid["Abs"]})  # Abs is no longer registered: it may go
        assert {f.stem for f in kept.glob("*.onnx")} == {pid["Abs"], pid["Neg"]}
        pid["Relu"] = p.register(plans["Relu"], name="relu")["plan"]
        assert {f.stem for f in kept.glob("*.onnx")} == {pid["Neg"], pid["Relu"]}
        assert f"removed kept plan {pid['Abs'][:12]} ({size['Abs']} bytes) from {kept}: over --max-plans-dir-mb" in (
            w.log()
        )
        pid["Exp"] = p.register(plans["Exp"], name="exp")["plan"]  # over the cap, but every plan is registered
        assert {f.stem for f in kept.glob("*.onnx")} == {pid["Neg"], pid["Relu"], pid["Exp"]}
        assert "the rest are registered now or approved by the policy, and are kept" in w.log()
        p.close()


def test_prune_spares_referenced_plans_and_keeps_a_plan_received_again_recent(tmp_path):
    for i, pid in enumerate(["a" * 64, "b" * 64, "c" * 64]):
        keep(tmp_path, pid, bytes(100))
        os.utime(tmp_path / f"{pid}.onnx", (time.time() - 100 + i, time.time() - 100 + i))  # a oldest
    keep(tmp_path, "a" * 64, bytes(100))  # received again: now the most recent
    removed, total = prune(tmp_path, 250, referenced=set())
    assert removed == [("b" * 64, 100)] and total == 200  # b is now the least recently received
    removed, total = prune(tmp_path, 150, referenced={"c" * 64})
    assert removed == [("a" * 64, 100)] and total == 100  # c is referenced: a goes though more recent
    assert prune(tmp_path, 50, referenced={"c" * 64}) == ([], 100)  # over the cap, but referenced: kept
    assert [f.stem for f in tmp_path.glob("*.onnx")] == ["c" * 64]
