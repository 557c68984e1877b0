"""The supervisor's end of the pipe to its runner (worker/runnerlink.py), over a real socket pair: a request
never blocks the supervisor, however large and whatever the runner is doing; ``hold`` keeps requests back
until ``flush`` or one sent ``now`` (a fetch, answered at once: the held ones go first); answers are matched
to requests in order, and a runner that answers what it was not sent is not trusted."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from planwire.worker import pipe
from planwire.worker.runnerlink import RunnerLink, Sent, Untrusted


@pytest.fixture
def link():  # noqa: ANN201
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = RunnerLink()
    link.open(ours)
    yield link, theirs
    link.close()
    theirs.close()


def test_a_request_larger_than_the_pipe_does_not_block_and_goes_as_the_runner_reads(link) -> None:
    link, runner = link
    handles = list(range(1 << 20, (1 << 20) + 300_000))  # ~1.5 MB of msgpack: more than the socket buffers
    request = (Sent("fetch"), pipe.Fetch(handles=handles), [])
    sender = threading.Thread(target=link.request, args=request, kwargs={"now": True}, daemon=True)
    sender.start()  # nobody reads yet
    sender.join(10)
    assert not sender.is_alive(), "the request blocked the supervisor until the runner read it"
    got: list = []
    reader = threading.Thread(target=lambda: got.append(pipe.requests(runner).read()), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while reader.is_alive() and time.monotonic() < deadline:
        assert not link.wait(0.05)  # room in the pipe: the rest is written; no answer yet
    reader.join(1)
    ((msg, buffers),) = got
    assert isinstance(msg, pipe.Fetch) and msg.handles == handles and buffers == []
    assert [s.kind for s in link.inflight] == ["fetch"]


def test_held_requests_wait_for_flush_and_one_sent_now_takes_them_along_in_order(link) -> None:
    link, runner = link
    runner.settimeout(0.2)
    reader = pipe.requests(runner)
    link.hold()
    link.request(Sent("load"), pipe.Load(plan="p", name="p"), [b"plan bytes"])
    link.request(Sent("run", out=[3]), pipe.Run(plan="p", name="p", args=[], out=[3]), [], plan="p")
    with pytest.raises(TimeoutError):
        reader.read()  # held back
    link.request(Sent("fetch"), pipe.Fetch(handles=[7]), [], now=True)  # goes at once, after what was held
    answers = {pipe.Load: pipe.Loaded(inputs=[], outputs=[]), pipe.Run: pipe.Ran(outputs=[])}
    read = []
    for _ in range(3):  # the runner answers each request in the order it reads them
        msg, buffers = reader.read()
        read.append((type(msg).__name__, [bytes(b) for b in buffers]))
        pipe.send(runner, answers.get(type(msg), pipe.Fetched(tensors=[])))
    assert read == [("Load", [b"plan bytes"]), ("Run", []), ("Fetch", [])]
    link.request(Sent("run", out=[4]), pipe.Run(plan="p", name="p", args=[], out=[4]), [], plan="p")
    with pytest.raises(TimeoutError):
        reader.read()  # still held: ``now`` sent one request, it did not end the hold
    # Each answer is matched to the request it answers.
    got = []
    for _ in range(3):
        assert link.wait(5)
        msg, _ = link.receive()
        got.append((type(msg).__name__, link.answered.kind, link.answered.out))
    assert got == [("Loaded", "load", []), ("Ran", "run", [3]), ("Fetched", "fetch", [])]
    link.flush()
    msg, _ = reader.read()
    assert isinstance(msg, pipe.Run) and msg.out == [4]
    assert [s.out for s in link.inflight] == [[4]]


def test_answers_are_matched_in_order_and_an_unasked_one_is_not_trusted(link) -> None:
    link, runner = link
    link.request(Sent("run", out=[1]), pipe.Run(plan="p", name="p", args=[]), [], plan="p")
    link.request(Sent("run", out=[2]), pipe.Run(plan="p", name="p", args=[]), [], plan="p")
    pipe.send(runner, pipe.Ran(outputs=[]))
    pipe.send(runner, pipe.Failed(code="run_failed", message="no"))
    pipe.send(runner, pipe.Ran(outputs=[]))
    assert link.wait(5)
    assert isinstance(link.receive()[0], pipe.Ran) and link.answered.out == [1]
    assert isinstance(link.receive()[0], pipe.Failed) and link.answered.out == [2]
    with pytest.raises(Untrusted) as e:
        link.receive()
    assert e.value.why == "the runner answered a request it was not sent"
    runner.close()
    assert link.wait(5)  # the closed pipe
    with pytest.raises(pipe.PipeClosed):
        link.receive()


def test_a_wait_on_the_runner_ends_when_the_other_descriptor_speaks_and_not_before(link) -> None:
    link, runner = link
    a, b = socket.socketpair()
    with a, b:
        assert link.wait(0.1, also=a.fileno()) is False  # neither spoke
        b.send(b"x")  # a request came on the other descriptor
        waiter = threading.Thread(target=lambda: got.append(link.wait(3600, also=a.fileno())), daemon=True)
        got: list[bool] = []
        waiter.start()
        waiter.join(60)
        assert got == [False], "the wait did not end when the other descriptor became readable"
        runner.close()  # the runner's closed pipe is news from the runner, whatever the other side says
        assert link.wait(30, also=a.fileno()) is True
        assert link.wait(0) is True  # the descriptor watched for one wait is not watched after it
