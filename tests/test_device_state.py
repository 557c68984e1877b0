"""Device-resident state (issue 15, item 1), on CPU OrtValues: the code path a CUDA worker runs.

A run's outputs stay in the sandboxed runner; they cross to the host when a client reads them, before a
later run that could lose them, or after --host-copy-after idle seconds. The counts come from the worker's
admin status (``device_copies``), never from timings. Real plan-worker processes, raw frames.
PLANWIRE_TEST_DEVICE=cuda runs the same tests on a GPU (bench/gpu_machine.sh does).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from planwire.worker.admin import query
from planwire.worker.process import WorkerProcess
from tests.conformance.wire import Peer, WireError
from tests.conftest import RawWorker
from tests.hostile import checked

STEPS = 12
DEVICE = os.environ.get("PLANWIRE_TEST_DEVICE", "cpu")


_model = checked  # a well-formed plan (tests/hostile.py)


def _io(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def step_plan() -> bytes:
    """A training step's shape: (w, m, g) -> (w - 0.1 * m', m' = 0.9 m + g, loss = sum(w'^2)): state in, state out."""
    lr = helper.make_tensor("lr", TensorProto.FLOAT, [], [0.1])
    beta = helper.make_tensor("beta", TensorProto.FLOAT, [], [0.9])
    return _model(
        [
            helper.make_node("Mul", ["m", "beta"], ["mb"]),
            helper.make_node("Add", ["mb", "g"], ["m2"]),
            helper.make_node("Mul", ["m2", "lr"], ["d"]),
            helper.make_node("Sub", ["w", "d"], ["w2"]),
            helper.make_node("Mul", ["w2", "w2"], ["sq"]),
            helper.make_node("ReduceSum", ["sq"], ["loss"], keepdims=0),
        ],
        [_io("w", ["n"]), _io("m", ["n"]), _io("g", ["n"])],
        [_io("w2", ["n"]), _io("m2", ["n"]), _io("loss", [])],
        [lr, beta],
    )


def add_plan() -> bytes:
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    return _model([helper.make_node("Add", ["x", "one"], ["y"])], [_io("x", ["n"])], [_io("y", ["n"])], [one])


def reference(w: np.ndarray, m: np.ndarray, g: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, float]:
    loss = 0.0
    for _ in range(steps):
        m = np.float32(0.9) * m + g
        w = w - np.float32(0.1) * m
        loss = float(np.sum(w * w))
    return w, m, loss


@pytest.fixture
def worker(raw_worker: RawWorker) -> tuple[WorkerProcess, Peer]:
    # --host-copy-after 0: no idle copies, so each count below is exact however slow this host is;
    # --direct-max-mb 0: these tiny plans run in the sandboxed runner, whose device state is tested here
    extra = ["--host-copy-after", "0", "--device", DEVICE, "--direct-max-mb", "0"]
    return raw_worker("dev", extra=extra, timeout=60, ready_timeout=120)


def copies(proc: WorkerProcess) -> dict[str, int]:
    return query(re.search(r"admin on (\S+)", proc.log()).group(1)).device_copies


def runner_pid(proc: WorkerProcess) -> int:
    return int(re.findall(r"runner (\d+) ready", proc.log())[-1])


def start_steps(peer, n: int, *, seed: int) -> tuple:  # noqa: ANN001
    """The step plan registered and its state (w, m) and gradient g put, each of ``n`` floats: (plan, w0, m0, g)."""
    rng = np.random.default_rng(seed)
    w0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m0 = np.zeros(n, np.float32)
    for key, value in (("w", w0), ("m", m0), ("g", g)):
        peer.put(key, value)
    return peer.register(step_plan(), name="step")["plan"], w0, m0, g


@pytest.mark.parametrize("n", [16, 100_000])  # inline through the pipe, and through shared memory
def test_training_steps_keep_state_on_the_device_and_copy_nothing(worker, n: int) -> None:
    proc, peer = worker
    plan, w0, m0, g = start_steps(peer, n, seed=0)
    for _ in range(STEPS):
        peer.run(plan, ["w", "m", "g"], ["w", "m", "loss"])  # the step's state overwrites itself
    before = copies(proc)
    # the three puts crossed once each (on their first use); nothing else crossed, however many steps
    assert before["uploads"] == 3 and before["upload_bytes"] == 3 * 4 * n, before
    assert before["downloads"] == 0 and before["host_copies"] == 0, before
    # from the third step on, each step writes its new state into the buffers of the state before last
    assert before["reused"] >= 3 * (STEPS - 2), before
    w, m, loss = reference(w0, m0, g, STEPS)
    np.testing.assert_allclose(peer.get1("w", keep=True), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(peer.get1("m", keep=True), m, rtol=1e-5, atol=1e-6)
    assert peer.get1("loss", keep=True) == pytest.approx(loss, rel=1e-4)
    np.testing.assert_allclose(peer.get1("w", keep=True), w, rtol=1e-5, atol=1e-6)  # the host copy, again
    after = copies(proc)
    assert after["downloads"] == 3 and after["host_copies"] == 3, after  # one per tensor read, not per get
    assert after["held"] == 4, after  # w, m, loss (runner results) and g (a put, uploaded once)


def test_pipelined_training_steps_copy_no_state(worker) -> None:
    """Steps sent back to back (each reads the state the one before writes, and writes it again): the state
    stays in the runner as for synchronous steps; only each step's fetched loss crosses to the host."""
    proc, peer = worker
    n = 100_000
    plan, w0, m0, g = start_steps(peer, n, seed=1)
    ids = [peer.send(peer.run_header(plan, ["w", "m", "g"], ["w", "m", "loss"], fetch=[2])[0]) for _ in range(STEPS)]
    losses = []
    for rid in ids:
        reply = peer.recv()
        assert reply["re"] == rid and reply.kind == "tensors", reply
        losses.append(float(reply.array_list()[0]))
    c = copies(proc)
    assert c["downloads"] == STEPS and c["host_copies"] == 0, c  # the losses, nothing of the state
    assert c["reused"] >= 3 * (STEPS - 2), c
    w, m, loss = reference(w0, m0, g, STEPS)
    assert losses[-1] == pytest.approx(loss, rel=1e-4)
    np.testing.assert_allclose(peer.get1("w", keep=True), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(peer.get1("m", keep=True), m, rtol=1e-5, atol=1e-6)


def test_a_queued_run_reading_an_output_it_does_not_overwrite_gets_it_with_the_answer(worker) -> None:
    """y = add(x) then z = add(y), queued behind a slow run: y's host copy comes back with its run's answer
    (no separate copy before z's run, which may crash), as before."""
    proc, peer = worker
    big = np.zeros(1 << 23, np.float32)
    peer.put("big", big)
    peer.put("x", np.arange(8, dtype=np.float32))
    plan = peer.register(add_plan(), name="add")["plan"]
    slow = peer.send(peer.run_header(plan, ["big"], ["big2"], fetch=[0])[0])
    # a has_plan waits for the window to empty: first and second are read behind it together, however loaded the
    # host (else first may be sent before second is read, and y is then saved before z's run instead)
    wait = peer.send({"type": "has_plan", "plan": plan})
    first = peer.send(peer.run_header(plan, ["x"], ["y"])[0])
    second = peer.send(peer.run_header(plan, ["y"], ["z"])[0])
    for rid in (slow, wait, first, second):
        assert peer.recv(timeout=60)["re"] == rid
    c = copies(proc)
    assert c["host_copies"] == 0 and c["downloads"] == 2, c  # big2 (fetched) and y (saved with its answer)
    np.testing.assert_array_equal(peer.get1("z"), np.arange(8, dtype=np.float32) + 2)


def test_fetch_and_inline_results_come_back_with_the_run(worker) -> None:
    proc, peer = worker
    peer.put("x", np.arange(4, dtype=np.float32))
    plan = peer.register(add_plan(), name="add")["plan"]
    out = peer.run(plan, ["x"], ["y"], fetch=[0]).array_list()[0]
    np.testing.assert_array_equal(out, [1, 2, 3, 4])
    header, frames = peer.run_header(plan, ["y"], ["z"])
    header["inline_max"] = 1024
    reply = peer.ok(header, frames)
    np.testing.assert_array_equal(reply.array_list()[0], [2, 3, 4, 5])
    # both came back with their runs' answers: a get of them asks the runner nothing more
    np.testing.assert_array_equal(peer.get1("y", keep=True), [1, 2, 3, 4])
    np.testing.assert_array_equal(peer.get1("z"), [2, 3, 4, 5])
    c = copies(proc)
    assert c["downloads"] == 2 and c["host_copies"] == 0, c


def test_a_later_run_first_saves_what_a_crash_could_lose(worker) -> None:
    """y (computed, never read) gets its host copy before the next run, which may crash; the runner is
    then killed: y survives and is uploaded again by its next use."""
    proc, peer = worker
    peer.put("x", np.arange(1 << 16, dtype=np.float32))
    plan = peer.register(add_plan(), name="add")["plan"]
    peer.run(plan, ["x"], ["y"])
    assert copies(proc)["host_copies"] == 0
    peer.run(plan, ["x"], ["z"])  # y is not among this run's outputs: saved first
    assert copies(proc)["host_copies"] == 1
    os.kill(runner_pid(proc), signal.SIGKILL)
    _wait_for(lambda: "the sandboxed runner ended while idle" in proc.log())
    np.testing.assert_array_equal(peer.get1("y", keep=True), np.arange(1 << 16, dtype=np.float32) + 1)
    lost = peer.error({"type": "get", "keys": ["z"]}, code="run_failed")  # z had no host copy yet
    assert "lost" in lost["message"] and "SIGKILL" in lost["message"], lost["message"]
    out = peer.run(plan, ["y"], ["w"], fetch=[0]).array_list()[0]  # y crosses again, to the new runner
    np.testing.assert_array_equal(out, np.arange(1 << 16, dtype=np.float32) + 2)
    assert copies(proc)["lost"] == 1


def test_idle_results_get_a_host_copy_after_host_copy_after_seconds(raw_worker: RawWorker) -> None:
    extra = ["--host-copy-after", "0.2", "--device", DEVICE, "--direct-max-mb", "0"]
    proc, peer = raw_worker("idle", extra=extra, timeout=60, ready_timeout=120)
    peer.put("x", np.arange(8, dtype=np.float32))
    plan = peer.register(add_plan(), name="add")["plan"]
    peer.run(plan, ["x"], ["y"])
    _wait_for(lambda: copies(proc)["host_copies"] == 1)
    os.kill(runner_pid(proc), signal.SIGKILL)
    _wait_for(lambda: "the sandboxed runner ended while idle" in proc.log())
    np.testing.assert_array_equal(peer.get1("y"), np.arange(8, dtype=np.float32) + 1)
    assert copies(proc)["lost"] == 0


def test_a_crashed_step_fails_only_its_own_outputs(worker) -> None:
    """A step whose outputs overwrite its inputs is not saved first (a failed run fails those keys
    anyway); the other tensors survive the runner's end."""
    proc, peer = worker
    for key in ("w", "m", "g"):
        peer.put(key, np.ones(32, np.float32))
    plan = peer.register(step_plan(), name="step")["plan"]
    peer.run(plan, ["w", "m", "g"], ["w", "m", "loss"])
    peer.run(plan, ["w", "m", "g"], ["w", "m", "loss"])
    assert copies(proc)["host_copies"] == 0
    os.kill(runner_pid(proc), signal.SIGKILL)
    _wait_for(lambda: "the sandboxed runner ended while idle" in proc.log())
    for key in ("w", "m", "loss"):
        with pytest.raises(WireError, match="was lost"):
            peer.get1(key)
    np.testing.assert_array_equal(peer.get1("g"), np.ones(32, np.float32))


def test_outputs_sharing_memory_with_inputs_are_never_written_into(worker) -> None:
    """(a, b) = (Identity(x), x + 1): onnxruntime may hand back x's own memory as a; freeing a must not
    let a later run write its outputs there (x would change under its key)."""
    _, peer = worker
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    plan = peer.register(
        _model(
            [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Add", ["x", "one"], ["b"])],
            [_io("x", ["n"])],
            [_io("a", ["n"]), _io("b", ["n"])],
            [one],
        ),
        name="alias",
    )["plan"]
    x = np.arange(1 << 15, dtype=np.float32)
    peer.put("x", x)
    for i in range(4):
        peer.run(plan, ["x"], ["a", "b"])
        peer.ok({"type": "delete", "keys": ["a", "b"]})
        peer.run(plan, [np.full(1 << 15, i, np.float32)], ["c", "d"])  # same shapes: freed buffers reused
        np.testing.assert_array_equal(peer.get1("d"), np.full(1 << 15, i + 1, np.float32))
        np.testing.assert_array_equal(peer.get1("x", keep=True), x)
    np.testing.assert_array_equal(peer.get1("c"), np.full(1 << 15, 3, np.float32))


def _wait_for(cond, timeout: float = 30.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.05)


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from planwire.worker.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_check_prints_the_cpu_provider_and_machine() -> None:
    done = _cli("check")
    assert done.returncode == 0, done.stderr
    assert re.search(r"^provider\s+CPUExecutionProvider$", done.stdout, re.M), done.stdout
    assert re.search(r"^device\s+cpu: .+, \d+ MiB, \d+ cores$", done.stdout, re.M), done.stdout


@pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(), reason="CUDA provider here"
)
@pytest.mark.parametrize("argv", [["--device", "cuda", "--check"], ["check", "--device", "cuda:1"]])
def test_check_of_cuda_without_it_fails_with_one_line(argv: list[str]) -> None:
    done = _cli(*argv)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "onnxruntime has no CUDA provider" in lines[0] and "planwire[cuda]" in lines[0], lines


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--device", "tpu"], "unknown device 'tpu': use cpu, cuda, cuda:N or auto"),
        (["--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--gpu-mem-limit", "-1"], "--gpu-mem-limit must be 0"),
        (["--host-copy-after", "-1"], "--host-copy-after must be 0"),
    ],
)
def test_bad_device_options_fail_at_start(argv: list[str], words: str) -> None:
    done = _cli("--listen", "tcp://127.0.0.1:0", *argv)
    assert done.returncode == 2
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
