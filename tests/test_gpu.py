"""The CUDA provider (issue 15) on a real GPU: marked ``gpu``, skipped with the reason elsewhere.

bench/gpu_machine.sh runs these with onnxruntime-gpu installed (and tests/test_device_state.py with
PLANWIRE_TEST_DEVICE=cuda: the device-resident state's counts on the GPU).
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache

import numpy as np
import pytest
from onnx import TensorProto, helper

from planwire.worker.process import WorkerProcess
from tests.conformance.wire import Peer
from tests.conftest import RawWorker
from tests.test_device_state import add_plan, copies, reference, step_plan


@cache
def _why_not() -> str:
    from planwire.worker.device import Device, check_device

    try:
        check_device(Device("cuda"))
    except RuntimeError as e:
        return str(e)
    return ""


def _skip_without_gpu() -> None:
    why = _why_not()
    if why:
        pytest.skip(f"no CUDA device runs plans here: {why}")


pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu")]


@pytest.fixture
def gpu() -> None:
    _skip_without_gpu()


@pytest.fixture
def worker(raw_worker: RawWorker) -> tuple[WorkerProcess, Peer]:
    extra = ["--device", "cuda", "--host-copy-after", "0", "--gpu-mem-limit", "1024"]
    return raw_worker("gpu", extra=extra, timeout=120, ready_timeout=120)


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from planwire.worker.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=180)


def test_check_prints_the_cuda_device() -> None:
    done = _cli("check", "--device", "cuda", "--gpu-mem-limit", "512")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^provider\s+CUDAExecutionProvider$", done.stdout, re.M), done.stdout
    assert re.search(r"^device\s+cuda:0: .+, \d+ MiB \(arena capped at 512 MiB\)$", done.stdout, re.M), done.stdout


def test_a_device_that_is_not_there_fails_at_start_with_one_line() -> None:
    done = _cli("--listen", "tcp://127.0.0.1:0", "--device", "cuda:99")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("plan-worker: --device cuda:99: no CUDA device 99 here"), lines


def test_the_worker_reports_cuda_and_its_device(worker) -> None:
    proc, peer = worker
    assert peer.ok({"type": "hello", "version": 1})["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert re.search(r"device cuda:0: .+ MiB \(arena capped at 1024 MiB\)", proc.log()), proc.log()


def test_training_steps_stay_on_the_gpu(worker) -> None:
    proc, peer = worker
    n = 1 << 20
    rng = np.random.default_rng(1)
    w0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m0 = np.zeros(n, np.float32)
    for key, value in (("w", w0), ("m", m0), ("g", g)):
        peer.put(key, value)
    plan = peer.register(step_plan(), name="step")
    assert "placement" not in plan, plan  # every node on CUDA: placed with CPU fallback disabled
    for _ in range(10):
        peer.run(plan["plan"], ["w", "m", "g"], ["w", "m", "loss"])
    c = copies(proc)
    assert c["uploads"] == 3 and c["downloads"] == 0 and c["reused"] >= 3 * 8, c
    w, m, loss = reference(w0, m0, g, 10)
    np.testing.assert_allclose(peer.get1("w"), w, rtol=1e-4, atol=1e-5)
    assert peer.get1("loss") == pytest.approx(loss, rel=1e-3)


def test_a_plan_with_nodes_cuda_cannot_run_says_where_they_run(worker) -> None:
    _, peer = worker
    graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"], sorted=1), helper.make_node("Relu", ["y"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["m"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = peer.register(model.SerializeToString(), name="unique")
    assert re.fullmatch(r"cuda:0 with \d+ nodes on CPU \(.*Unique.*\)", info.get("placement", "")), info
    out = peer.run(info["plan"], [np.array([3, -1, 3, 2], np.float32)], ["z"], fetch=[0]).array_list()[0]
    np.testing.assert_array_equal(out, [0, 2, 3])


def test_the_arena_cap_refuses_a_run_past_it_and_the_worker_goes_on(worker) -> None:
    proc, peer = worker
    plan = peer.register(add_plan(), name="add")["plan"]
    peer.put("big", np.zeros(384 << 18, np.float32))  # 384 MiB: three of them pass the 1024 MiB cap
    peer.run(plan, ["big"], ["b1"])
    peer.run(plan, ["b1"], ["b2"])
    failed = peer.error(*peer.run_header(plan, ["b2"], ["b3"]), code="out_of_memory")
    assert "add" in failed["message"], failed
    peer.ok({"type": "delete", "keys": ["b1"]})
    out = peer.run(plan, [np.ones(4, np.float32)], ["small"], fetch=[0]).array_list()[0]
    np.testing.assert_array_equal(out, [2, 2, 2, 2])
    assert proc.proc.poll() is None


def test_the_step_path_has_no_memcpy_nodes() -> None:
    """onnxruntime's profiler over steps run as the runner runs them: inputs and outputs on the device."""
    from bench.gpu import memcpy_nodes

    n = 4096
    feeds = {k: np.ones(n, np.float32) for k in ("w", "m", "g")}
    found = memcpy_nodes(step_plan(), feeds, {"w2": "w", "m2": "m"}, steps=4)
    assert found["memcpy"] == 0 and found["placement"] == "cuda:0", found
