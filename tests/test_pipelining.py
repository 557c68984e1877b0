"""Pipelined calls: no reply is ever lost, memory stays flat, chained calls never wait on shapes.

Every test runs on an in-process VirtualWorker and on plan-worker processes over tcp and ipc.
"""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import psutil
import pytest

from tests import handmade


def test_20000_pipelined_calls_all_answered_with_their_own_values(worker):
    """The lost-reply defect: replies read while a run was being sent were filed where nobody looked
    (VirtualWorker lost every 65th call; tcp/ipc a random one per few thousand)."""
    pp = worker.plan_pointer(handmade.double_abs())
    n = 20_000
    pointers = [pp(np.array([i, -i], np.float32)) for i in range(n)]  # sent, nothing read yet
    got = np.array([p.get().tolist() for p in pointers])
    expected = np.stack([np.arange(n) * 2.0, np.arange(n) * 2.0], axis=1)
    np.testing.assert_array_equal(got, expected)


def test_100000_pipelined_calls_keep_client_memory_flat(worker):
    """A bounded window: past it, sending first reads replies; in flight never exceeds it, and the
    process's memory does not grow with the number of calls."""
    pp = worker.plan_pointer(handmade.double_abs())
    conn = worker.connection
    x = worker.put(np.array([3.0, -1.0], np.float32))
    peak_in_flight = 0

    def burst(calls: int) -> None:
        nonlocal peak_in_flight
        for i in range(calls):
            last = pp(x)  # results dropped at once: freed in batches with later requests
            if i % 97 == 0:
                peak_in_flight = max(peak_in_flight, conn.in_flight)
        assert last.get().tolist() == [6.0, 2.0]

    burst(10_000)  # warm-up: allocator pools, the worker's caches, zmq buffers
    gc.collect()
    before = psutil.Process(os.getpid()).memory_info().rss
    burst(90_000)
    gc.collect()
    grown = psutil.Process(os.getpid()).memory_info().rss - before
    assert 0 < peak_in_flight <= conn.window
    assert grown < 32 << 20, f"client RSS grew by {grown >> 20} MiB over 90,000 calls"
    worker.flush()  # every free went out and was answered
    assert conn.in_flight == 0


class Recorder:
    """Wraps a connection's send/recv to log what moved, in order ("send <type>" / "recv")."""

    def __init__(self, conn) -> None:
        self.conn, self.events = conn, []
        self._send, self._recv = conn._send, conn._recv
        conn._send, conn._recv = self.send, self.recv

    def send(self, frames):
        self.events.append("send " + bytes(frames[1]).split(b'"type":"')[1].split(b'"')[0].decode())
        self._send(frames)

    def recv(self, timeout):
        frames = self._recv(timeout)
        if frames is not None:
            self.events.append("recv")
        return frames

    def stop(self) -> None:
        self.conn._send, self.conn._recv = self._send, self._recv


@pytest.mark.parametrize("size", [3, 40_000], ids=["dynamic", "over-64KiB"])
def test_chained_calls_are_sent_before_any_reply_is_read(worker, size):
    """p(p(x)) on a dynamic-shaped output (and one too large to ride on the reply) sends both runs
    before reading anything: the worker checks the real shapes."""
    pp = worker.plan_pointer(handmade.double_abs())
    x = np.full(size, -1.0, np.float32)
    worker.flush()
    rec = Recorder(worker.connection)
    try:
        z = pp(pp(x))
        assert rec.events == ["send run", "send run"]
        got = z.get()
    finally:
        rec.stop()
    assert rec.events[:3] == ["send run", "send run", "recv"]
    assert got.shape == (size,) and np.all(np.asarray(got) == 4.0)


def test_a_chained_call_that_cannot_fit_fails_on_get_naming_the_plan(worker):
    """Sent without waiting for the shape, a call the worker refuses still reports a clear error."""
    pp = worker.plan_pointer(handmade.sum_and_diff())  # x, y: [N, 2]
    s, _ = pp(np.ones((2, 2), np.float32), np.ones((2, 2), np.float32))
    bad, _ = pp(s, np.ones((3, 2), np.float32))  # N=2 against N=3: only the worker can tell
    with pytest.raises(Exception, match="sum_and_diff"):
        bad.get()
    assert s.get().tolist() == [[2.0, 2.0], [2.0, 2.0]]


@pytest.mark.parametrize("size", [3, 40_000], ids=["small", "over-64KiB"])
def test_results_are_writable_arrays_with_their_own_values(worker, size):
    """Over ZeroMQ, a result read from the run's reply (a small frame, copied) or fetched (a large one, a
    view) is an ordinary writable array the caller may change in place. (The in-process worker hands out
    read-only views of its reply bytes: only the values are checked there.)"""
    pp = worker.plan_pointer(handmade.double_abs())
    pointers = [pp(np.full(size, -i, np.float32)) for i in range(1, 4)]
    remote = hasattr(worker, "url")
    for i, p in enumerate(pointers, start=1):
        value = np.asarray(p.get())
        np.testing.assert_array_equal(value, np.full(size, 2.0 * i, np.float32))
        if remote:
            assert value.flags.writeable
            value += 1
            np.testing.assert_array_equal(value, np.full(size, 2.0 * i + 1, np.float32))


def _long_chain(n: int) -> bytes:
    """x + 1, n times: a plan the direct lane reads node by node (and declines) at its first run."""
    from onnx import TensorProto, helper

    from tests.hostile import checked, f32

    nodes = [helper.make_node("Add", [f"t{i}", "one"], [f"t{i + 1}"]) for i in range(n)]
    io = helper.make_tensor_value_info
    return checked(
        nodes, [io("t0", TensorProto.FLOAT, ["n"])], [io(f"t{n}", TensorProto.FLOAT, ["n"])], [f32("one", [1.0])]
    )


def test_a_bursts_tiny_replies_do_not_wait_for_a_slow_request_read_after_them(raw_worker):
    """Replies of pipelined tiny calls are held while their burst is read and sent together; a request the
    tiny path declines (here a plan's first run, which the supervisor reads node by node before the runner
    gets it) must not keep them: they go before it is handled, not after (found by review)."""
    from tests.test_tiny import affine

    _, peer = raw_worker("burst", kind="ipc")
    tiny = peer.register(affine())["plan"]
    slow = peer.register(_long_chain(20_000))["plan"]
    peer.put("x", np.ones(3, np.float32))
    header, _ = peer.run_header(tiny, ["x"], ["y", "z"])
    header["inline_max"] = 64
    for _ in range(3):
        peer.ok(dict(header))  # the plan's prepared path made
    slow_header, slow_frames = peer.run_header(slow, [np.ones(3, np.float32)], ["o"], fetch=[0])
    calls = 10
    for i in range(calls):
        peer.send(dict(header, id=100 + i), [])
    slow_id = peer.send(slow_header, slow_frames)
    arrived = {}
    t0 = time.perf_counter()
    for _ in range(calls + 1):
        reply = peer.recv()
        arrived[reply["re"]] = time.perf_counter() - t0
    tiny_last = max(arrived[100 + i] for i in range(calls))
    assert arrived[slow_id] > tiny_last
    # the tiny replies came together, long before the slow one (held back, they came with it)
    assert tiny_last - arrived[100] < arrived[slow_id] - tiny_last, arrived
