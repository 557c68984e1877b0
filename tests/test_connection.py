"""The client's request path against a scripted worker on a real ZeroMQ ROUTER: what a reply may not do to
the values the client hands out, and the receive's slices. Plus the fast paths' parity with the slow ones."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq

from planwire.transport import codec
from planwire.transport import messages as m
from planwire.transport.client import WorkerClient
from planwire.transport.connection import Connection
from planwire.transport.dealer import DealerLink
from planwire.transport.errors import ProtocolError
from planwire.transport.framing import SIGNATURE
from planwire.transport.spec import PlanVariant, TensorSpec

Script = Callable[[dict], list[bytes]]  # request header -> reply frames after the signature


class ScriptedWorker:
    """A ROUTER that answers each request with ``script(header)``: a worker that says what the test wants."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            peer, _sig, header, *_ = self.sock.recv_multipart()
            reply = self.script(json.loads(header))
            if reply:
                self.sock.send_multipart([peer, SIGNATURE, *reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


def _ok(req: dict) -> list[bytes]:
    return [json.dumps({"type": "ok", "re": req["id"], "session": "s"}).encode()]


def _one_frame_for_both(req: dict) -> list[bytes]:
    """Replies to a get (and a run) with two tensors pointing at the same frame."""
    if req["type"] not in ("get", "run"):
        return _ok(req)
    keys = req.get("keys") or req["outputs"]
    tensors = [{"key": k, "dtype": "float", "shape": [2], "frame": 0} for k in keys]
    header = {"type": "tensors", "re": req["id"], "session": "s", "tensors": tensors}
    return [json.dumps(header).encode(), np.array([1.0, 2.0], np.float32).tobytes()]


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], Connection]]:
    made: list[tuple[ScriptedWorker, Connection]] = []

    def make(script: Script) -> Connection:
        w = ScriptedWorker(script)
        conn = Connection(DealerLink(w.url), name="scripted", timeout=10)
        made.append((w, conn))
        return conn

    yield make
    for w, conn in made:
        conn.close()
        w.close()


def test_two_tensors_of_one_reply_frame_do_not_share_memory(scripted):
    """A reply may point two tensors at one frame: each value read from it is still the caller's own array,
    from a run's reply and from a get alike."""
    conn = scripted(_one_frame_for_both)
    call = conn.send(m.Run(id=conn.new_id(), plan="p", args=[], outputs=["a", "b"]), (), "run")
    a, b = call.tensor("a"), call.tensor("b")
    assert a is not None and b is not None
    a += 10
    assert a.tolist() == [11.0, 12.0] and b.tolist() == [1.0, 2.0]

    x, y = WorkerClient(conn).fetch_arrays(["x", "y"])
    assert x.flags.writeable and y.flags.writeable
    x[0] = -1
    assert y.tolist() == [1.0, 2.0]


def test_a_silent_worker_times_out_after_several_receive_slices(scripted):
    """A wait longer than one receive slice reads the monitor between slices and still ends as None."""
    conn = scripted(lambda req: [])  # never answers
    link = conn._link
    assert link.recv(0.25) is None  # one full slice, then what is left of the timeout
    assert link.recv(0.03) is None  # shorter than a slice
    assert link.recv(-1) is None  # already past: one look, no wait
    conn.timeout = 0.15
    call = conn.send(m.Ping(id=conn.new_id()), (), "ping")
    with pytest.raises(Exception, match=r"did not answer ping \(request #\d+\) within 0.15 s"):
        call.wait()


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [("float", [2, 3], 24), ("int64", [], 8), ("uint8", [0], 0), ("double", [4], 32), ("bool", [3], 3)],
)
def test_copied_frames_decode_as_from_frame_does(dtype, shape, nbytes):
    frame = bytearray(range(nbytes))
    fast, slow = codec.from_copied_frame(dtype, shape, frame), codec.from_frame(dtype, shape, bytes(frame))
    assert fast.dtype == slow.dtype and fast.shape == slow.shape and fast.tobytes() == slow.tobytes()
    assert fast.flags.writeable and fast.flags.aligned and fast.base is frame


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "code"),
    [
        ("float", [2], 4, "bad_frames"),  # size disagrees
        ("float", [0, 2**62], 0, "invalid_message"),  # numpy cannot make it
        ("float", [1] * 65, 4, "invalid_message"),  # too many axes
        ("complex", [1], 8, "invalid_message"),  # not a wire dtype
    ],
)
def test_copied_frames_refuse_what_from_frame_refuses(dtype, shape, nbytes, code):
    with pytest.raises(ProtocolError) as fast:
        codec.from_copied_frame(dtype, shape, bytearray(nbytes))
    with pytest.raises(ProtocolError) as slow:
        codec.from_frame(dtype, shape, bytearray(nbytes))
    assert fast.value.code == slow.value.code == code and str(fast.value) == str(slow.value)


def test_a_variant_remembers_its_answers_without_changing_them():
    v = PlanVariant(b"plan", (TensorSpec("x", "float", ("N", 2)),), (TensorSpec("y", "float", ("N",)),))
    asked = [("float", (3, 2))], [("float", (3, 3))], [("int64", (3, 2))], [("float", [3, 2])], []
    first = [v.mismatch(a) for a in asked]
    assert first[0] is None and first[3] is None and all(first[i] for i in (1, 2, 4))
    assert [v.mismatch(a) for a in asked] == first  # remembered (lists: not hashable, answered anyway)
    for n in range(1000):
        assert v.mismatch([("float", (n, 2))]) is None
    assert len(v._fits) <= 256  # bounded
