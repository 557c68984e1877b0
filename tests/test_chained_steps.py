"""Chained runs (worker/chain.py): training steps sent back to back overlap, the next one sent to the runner
while the one before runs, with the semantics of waiting: the same numbers, and when a step fails, crashes
or is refused, the steps behind it get the errors they would have got by waiting, in the same words.
Real plan-worker processes, raw frames; ``in_flight_max`` (admin status) says whether steps overlapped.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from planwire.worker.admin import query
from planwire.worker.process import WorkerProcess
from tests.conformance.wire import Peer
from tests.conftest import RawWorker
from tests.hostile import checked

N = 64  # floats of state: static in the plan, as a training plan declares its state
INT64_MIN = np.iinfo(np.int64).min


def _io(name: str, shape: list, kind: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, shape)


def step_plan(n: int | str = N) -> bytes:
    """(w, m, g, a, b, s) -> (w - 0.1 m', m' = 0.9 m + reshape(g, s), loss = sum(w'^2), a // b): a training
    step's shape (its state static when ``n`` is an int), that fails on a bad ``s`` and crashes the runner on
    ``INT64_MIN // -1``."""
    lr = helper.make_tensor("lr", TensorProto.FLOAT, [], [0.1])
    beta = helper.make_tensor("beta", TensorProto.FLOAT, [], [0.9])
    return checked(
        [
            helper.make_node("Reshape", ["g", "s"], ["g2"]),
            helper.make_node("Mul", ["m", "beta"], ["mb"]),
            helper.make_node("Add", ["mb", "g2"], ["m2"]),
            helper.make_node("Mul", ["m2", "lr"], ["d"]),
            helper.make_node("Sub", ["w", "d"], ["w2"]),
            helper.make_node("Mul", ["w2", "w2"], ["sq"]),
            helper.make_node("ReduceSum", ["sq"], ["loss"], keepdims=0),
            helper.make_node("Div", ["a", "b"], ["q"]),
        ],
        [
            _io("w", [n]),
            _io("m", [n]),
            _io("g", [n]),
            _io("a", [1], TensorProto.INT64),
            _io("b", [1], TensorProto.INT64),
            _io("s", [1], TensorProto.INT64),
        ],
        [_io("w2", [n]), _io("m2", [n]), _io("loss", []), _io("q", [1], TensorProto.INT64)],
        [lr, beta],
    )


def reference(w: np.ndarray, m: np.ndarray, gs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, float]]:
    out = []
    for g in gs:
        m = np.float32(0.9) * m + g
        w = w - np.float32(0.1) * m
        out.append((w, m, float(np.sum(w * w))))
    return out


@pytest.fixture
def worker(raw_worker: RawWorker) -> tuple[WorkerProcess, Peer]:
    # --direct-max-mb 0: the steps run in the sandboxed runner; --host-copy-after 0: no idle copies
    return raw_worker("chain", extra=["--host-copy-after", "0", "--direct-max-mb", "0"], timeout=60, ready_timeout=120)


def in_flight_max(proc: WorkerProcess) -> int:
    return query(re.search(r"admin on (\S+)", proc.log()).group(1)).device_copies["in_flight_max"]


def _start(peer: Peer, *, seed: int, n: int | str = N) -> tuple[str, np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal(N).astype(np.float32)
    m0 = np.zeros(N, np.float32)
    peer.put("w", w0)
    peer.put("m", m0)
    gs = [rng.standard_normal(N).astype(np.float32) for _ in range(16)]
    return peer.register(step_plan(n), name="step")["plan"], w0, m0, gs


def _step(peer: Peer, plan: str, g: np.ndarray, *, b: int = 1, s: int = N, a: int = 7) -> int:
    args = ["w", "m", g, np.array([a]), np.array([b]), np.array([s])]
    return peer.send(*peer.run_header(plan, args, ["w", "m", "loss", "q"], fetch=[2]))


def test_chained_steps_give_the_numbers_of_synchronous_ones(worker) -> None:
    proc, peer = worker
    plan, w0, m0, gs = _start(peer, seed=0)
    peer.run(plan, ["w", "m", gs[0], np.array([7]), np.array([1]), np.array([N])], ["w", "m", "loss", "q"])
    ids = [_step(peer, plan, g) for g in gs[1:]]
    losses = []
    for rid in ids:
        reply = peer.recv()
        assert reply["re"] == rid and reply.kind == "tensors", reply
        losses.append(float(reply.array_list()[0]))
    ref = reference(w0, m0, gs)
    assert losses == pytest.approx([loss for _, _, loss in ref[1:]], rel=1e-5)
    np.testing.assert_allclose(peer.get1("w", keep=True), ref[-1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(peer.get1("m", keep=True), ref[-1][1], rtol=1e-5, atol=1e-6)
    assert in_flight_max(proc) >= 2  # the steps overlapped: the next one was sent while one ran


def test_steps_of_a_dynamic_shaped_state_wait_and_give_the_same_numbers(worker) -> None:
    proc, peer = worker
    plan, w0, m0, gs = _start(peer, seed=1, n="n")
    ids = [_step(peer, plan, g) for g in gs]
    losses = [float(peer.recv().array_list()[0]) for _ in ids]
    assert losses == pytest.approx([loss for _, _, loss in reference(w0, m0, gs)], rel=1e-5)
    assert in_flight_max(proc) == 1  # each waited for the one before: its input's shape is known only then


@pytest.mark.parametrize("how", ["fails", "crashes"])
def test_a_step_that_fails_among_chained_ones_fails_those_behind_it_as_waiting_would(worker, how: str) -> None:
    """Step 6 fails (a bad reshape: run_failed) or crashes the runner (SIGFPE) while steps 7.. are in flight
    behind it: those before it keep their results; each one behind it fails with the error of its input
    'w' (run_failed, naming step 6), as it would have waiting; the state is gone; training goes on once it
    is put again."""
    proc, peer = worker
    plan, w0, m0, gs = _start(peer, seed=2)
    bad = 6
    ids = []
    for i, g in enumerate(gs):
        if i != bad:
            ids.append(_step(peer, plan, g))
        elif how == "fails":
            ids.append(_step(peer, plan, g, s=N - 1))
        else:
            ids.append(_step(peer, plan, g, a=INT64_MIN, b=-1))
    replies = [peer.recv(timeout=60) for _ in ids]
    assert [r["re"] for r in replies] == ids
    ref = reference(w0, m0, gs)
    for i in range(bad):
        assert float(replies[i].array_list()[0]) == pytest.approx(ref[i][2], rel=1e-5)
    first = replies[bad]
    if how == "fails":
        assert first["code"] == "run_failed" and "'step'" in first["message"], first
        why = first["message"]  # a run_failed run's outputs fail with its message
    else:
        assert first["code"] == "plan_crashed" and "SIGFPE" in first["message"], first
        why = f"run #{ids[bad]} failed: {first['message']} [plan_crashed]"
    for r in replies[bad + 1 :]:
        assert r["code"] == "run_failed" and r["message"] == why, r
    err = peer.error({"type": "get", "keys": ["w"]}, code="run_failed")
    assert err["message"] == why
    peer.put("w", ref[bad - 1][0])  # the state as it was before the failed step
    peer.put("m", ref[bad - 1][1])
    losses = [float(peer.recv().array_list()[0]) for _ in [_step(peer, plan, g) for g in gs[bad:]]]
    assert losses == pytest.approx([loss for _, _, loss in ref[bad:]], rel=1e-5)
    assert in_flight_max(proc) >= 2


def test_a_refused_step_behind_a_running_one_fails_its_outputs_after_it(worker) -> None:
    """Step 3 is refused as it is validated (a gradient of the wrong shape) while step 2 runs: its outputs
    are marked failed after step 2 stored them, as if it had waited, so step 4 fails naming step 3."""
    proc, peer = worker
    plan, w0, m0, gs = _start(peer, seed=3)
    ids = [_step(peer, plan, g) for g in gs[:3]]
    ids.append(_step(peer, plan, np.zeros(N + 1, np.float32)))
    ids.append(_step(peer, plan, gs[3]))
    replies = [peer.recv(timeout=60) for _ in ids]
    assert [r["re"] for r in replies] == ids
    ref = reference(w0, m0, gs)
    for i in range(3):
        assert float(replies[i].array_list()[0]) == pytest.approx(ref[i][2], rel=1e-5)
    refused = replies[3]
    assert refused["code"] == "bad_argument" and "argument 2 ('g')" in refused["message"], refused
    why = f"run #{ids[3]} refused: {refused['message']} [bad_argument]"
    assert replies[4]["code"] == "run_failed" and replies[4]["message"] == why, replies[4]
    for key in ("w", "m", "loss"):
        assert peer.error({"type": "get", "keys": [key]}, code="run_failed")["message"] == why


def slice_plan() -> bytes:
    """y = x[:e]: declared of x's static shape [4], though a shorter ``e`` makes it shorter."""
    zero = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    return checked(
        [helper.make_node("Slice", ["x", "zero", "e"], ["y"])],
        [_io("x", [4]), _io("e", [1], TensorProto.INT64)],
        [_io("y", [4])],
        [zero],
    )


@pytest.mark.parametrize("e", [4, 3])
def test_a_chained_run_on_an_output_not_of_its_declared_shape_is_checked_as_waiting_would(worker, e: int) -> None:
    """y = p(x, e) then z = p(y, 4), sent back to back: the second reads y as declared ([4]); when the plan
    made it shorter, the second is refused as a waiting one would be (bad_argument naming the shape). (Whether
    the second was chained or waited depends on timing: the answers are the same either way.)"""
    _, peer = worker
    plan = peer.register(slice_plan(), name="slice")["plan"]
    peer.put("x", np.arange(4, dtype=np.float32))
    first = peer.send(*peer.run_header(plan, ["x", np.array([e])], ["y"]))
    second = peer.send(*peer.run_header(plan, ["y", np.array([4])], ["z"], fetch=[0]))
    a, b = peer.recv(timeout=60), peer.recv(timeout=60)
    assert (a["re"], b["re"]) == (first, second)
    if e == 4:
        assert a.kind == "ok", a
        np.testing.assert_array_equal(b.array_list()[0], np.arange(4, dtype=np.float32))
    else:
        assert a.kind == "ok", a  # onnxruntime keeps the shorter output (it only warns)
        assert b["code"] == "bad_argument", b
        assert b["message"] == "plan 'slice' argument 0 ('x'): expected shape [4], got [3]", b


def test_pipelined_steps_of_an_exported_training_plan_match_synchronous_ones(worker) -> None:
    """A real training plan (exporter, SGD with momentum, BatchNorm): steps sent back to back (chained) give
    the losses and the state of steps waited for one by one, from the same start."""
    import torch
    import torch.nn.functional as F

    import planwire as sy
    from planwire.transport import connect
    from tests.test_trainer import batches, small_cnn

    torch.manual_seed(0)
    plan = sy.training_plan(
        small_cnn(),
        F.cross_entropy,
        sy.optim.SGD(lr=0.05, momentum=0.9),
        args_shape=[(-1, 1, 8, 8), (-1,)],
        args_dtypes=[torch.float32, torch.int64],
    )
    proc, _ = worker
    data = batches([8, 8, 5, 8, 8, 8], seed=3)
    with connect(proc.url, timeout=60) as client:
        waited = plan.send(client)
        chained = plan.send(client)
        losses = [waited(x, y).get().item() for x, y in data]
        pointers = [chained(x, y) for x, y in data]  # nothing read until all are sent
        assert [p.get().item() for p in pointers] == pytest.approx(losses, rel=1e-6)
        expect, got = waited.state_dict(), chained.state_dict()
    assert losses[-1] != pytest.approx(losses[0])  # the steps trained
    for name, value in expect.items():
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    assert in_flight_max(proc) >= 2


def test_cancel_of_the_step_ahead_of_a_chained_one_fails_it_as_waiting_would(raw_worker: RawWorker) -> None:
    """Step 1 is cancelled while it runs, step 2 chained behind it: step 2 goes to the fresh runner with the
    stored state, which step 1's cancel failed, so it fails naming step 1's cancel, as it would have waiting."""
    n = 1 << 22  # a step long enough to be cancelled while it runs
    extra = ["--host-copy-after", "0", "--direct-max-mb", "0"]
    _, peer = raw_worker("cancel", extra=extra, timeout=60, ready_timeout=120)
    plan = peer.register(step_plan(n), name="step")["plan"]
    for key in ("w", "m", "g"):
        peer.put(key, np.ones(n, np.float32))
    args = ["w", "m", "g", np.array([7]), np.array([1]), np.array([n])]
    peer.run(plan, args, ["w", "m", "loss", "q"])  # warm: the session exists
    steps = [peer.send(*peer.run_header(plan, args, ["w", "m", "loss", "q"], fetch=[2])) for _ in range(3)]
    cancel = peer.send({"type": "cancel", "run": steps[0]})
    replies = {r["re"]: r for r in (peer.recv(timeout=60) for _ in range(4))}
    if replies[cancel].kind != "ok":  # step 1 had finished already (a slow host): nothing to check
        pytest.skip("step 1 finished before its cancel came")
    first = replies[steps[0]]
    assert first["code"] == "cancelled", first
    why = f"run #{steps[0]} failed: {first['message']} [cancelled]"
    for rid in steps[1:]:
        assert replies[rid]["code"] == "run_failed" and replies[rid]["message"] == why, replies[rid]


def test_a_step_behind_a_refused_one_is_not_chained_past_it(worker) -> None:
    """Step 2 is refused as it is validated while step 1 runs; step 3 reads the same state, so it waits for step
    2's turn (its outputs failed again) and fails naming it, as it would have waiting (review: it chained
    behind step 1 past step 2's reply and ran on step 1's state). Every output of the warm step is fetched, so
    the runner holds nothing without a host copy and nothing else keeps step 3 from joining."""
    proc, peer = worker
    n = 1 << 21  # 8 MiB a tensor: step 1 still runs when steps 2 and 3 arrive
    plan = peer.register(step_plan(n), name="step")["plan"]
    for key in ("w", "m", "g"):
        peer.put(key, np.ones(n, np.float32))
    args = ["w", "m", "g", np.array([7]), np.array([1]), np.array([n])]
    outputs = ["w", "m", "loss", "q"]
    peer.run(plan, args, outputs, fetch=[0, 1, 2, 3])
    bad = [*args[:2], np.zeros(3, np.float32), *args[3:]]
    ids = [peer.send(*peer.run_header(plan, a, outputs, fetch=[2])) for a in (args, bad, args)]
    replies = [peer.recv(timeout=60) for _ in ids]
    assert [r["re"] for r in replies] == ids
    assert replies[0].kind == "tensors"
    assert replies[1]["code"] == "bad_argument", replies[1]
    why = f"run #{ids[1]} refused: {replies[1]['message']} [bad_argument]"
    assert replies[2]["code"] == "run_failed" and replies[2]["message"] == why, replies[2]
    assert peer.error({"type": "get", "keys": ["w"]}, code="run_failed")["message"] == why
