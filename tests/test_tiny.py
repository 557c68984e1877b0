"""The tiny call's prepared path (worker/tiny.py) against the general path it short-cuts.

Two services get the same requests: one answers every run as the supervisor's general path does (decode,
begin, the direct lane, complete), the other tries the prepared path first. Replies must be the same bytes,
and the store, the lane's counts and the stats the same, for runs the path takes and for every run it must
leave to the general path (each refusal with its own code).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from planwire.transport import framing
from planwire.transport import messages as m
from planwire.worker import direct
from planwire.worker.direct import DirectLane
from planwire.worker.jobs import RunJob
from planwire.worker.service import Service
from planwire.worker.stats import Stats
from planwire.worker.tiny import TinyPath
from tests.hostile import checked, f32

ALICE, BOB = b"\x00alice", b"\x00bob"


def affine() -> bytes:
    """y = x * 2 + 1 and z = x + 1, x [n]."""
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["y"]),
        helper.make_node("Add", ["x", "one"], ["z"]),
    ]
    io = helper.make_tensor_value_info
    return checked(
        nodes,
        [io("x", TensorProto.FLOAT, ["n"])],
        [io("y", TensorProto.FLOAT, ["n"]), io("z", TensorProto.FLOAT, ["n"])],
        [f32("two", [2.0]), f32("one", [1.0])],
    )


def general(svc: Service, lane: DirectLane, frames: list, client: bytes) -> list:
    """What the supervisor does with a request read while idle, without the prepared path."""
    msg, buffers = svc.decode(frames, client)
    if msg is None:
        return buffers
    if type(msg) is not m.Run:
        return svc.answer(msg, buffers, frames, client)
    job = svc.begin(msg, buffers, frames, client)
    if type(job) is not RunJob:
        return job  # type: ignore[return-value]
    results = lane.run(job)
    assert results is not None, "every run of these tests is one the lane takes"
    return svc.complete(job, results)


class Pair:
    """The same worker twice: ``a`` answers by the general path only, ``b`` tries the prepared path first."""

    def __init__(self) -> None:
        own = [("own:secret", np.ones(3, np.float32), ()), ("own:x", np.ones(3, np.float32), ())]
        self.a, self.b = (Service("w", data=own, max_client_store_bytes=4096) for _ in range(2))
        self.b.session = self.a.session
        self.lanes = DirectLane(), DirectLane()
        for svc, lane in zip((self.a, self.b), self.lanes, strict=True):
            svc.stats = Stats(svc)
            svc.unloaded.append(lane.forget)  # as the supervisor does
            svc.store.put_own("own:public", np.ones(3, np.float32))
            svc.store._own["own:public"].private = False  # as a --public worker's own data
        self.tiny = TinyPath(self.b, self.lanes[1])
        self.taken = 0
        self.decoded = 0  # requests declined after the prepared path decoded them (handed on, not decoded again)
        self.pid = ""

    def send(self, msg: m._Message, client: bytes = ALICE, bufs: tuple = (), header: bytes | None = None) -> m._Message:
        frames = framing.pack(msg, list(bufs))
        if header is not None:
            frames[1] = header
        frames = [memoryview(bytes(f)) for f in frames]
        want = general(self.a, self.lanes[0], frames, client)
        got = self.tiny(frames, client)
        if got is None:
            pre = self.tiny.decoded(frames)
            if pre is not None:  # what the supervisor's general path takes: the very request it would decode
                assert pre == framing.unpack_request(frames, self.b.limits)[0]
                assert self.tiny.decoded(frames) is None  # once
                self.decoded += 1
            got = general(self.b, self.lanes[1], frames, client)
        else:
            self.taken += 1
        if type(msg) is not m.Hello:  # welcome: each worker issues its own identity
            assert [bytes(f) for f in got] == [bytes(f) for f in want]
        return framing.unpack_reply(want)[0]

    def setup(self, client: bytes = ALICE) -> None:
        assert isinstance(self.send(m.Hello(id=1), client), m.Welcome)
        info = self.send(m.RegisterPlan(id=2, name="affine"), client, (affine(),))
        assert isinstance(info, m.PlanInfo), info
        self.pid = info.plan
        self.put("x", np.arange(4, dtype=np.float32), client)

    def put(self, key: str, value: np.ndarray, client: bytes = ALICE) -> None:
        t = m.PutTensor(
            key=key, dtype="float" if value.dtype == np.float32 else "double", shape=list(value.shape), frame=0
        )
        assert isinstance(self.send(m.Put(id=3, tensors=[t]), client, (value.tobytes(),)), m.Ok)

    def run(self, rid: int, *refs: str, outputs: tuple = ("y", "z"), client: bytes = ALICE, **kw) -> m._Message:
        args = [m.Arg(ref=r) for r in refs]
        return self.send(m.Run(id=rid, plan=self.pid, args=args, outputs=list(outputs), **kw), client)

    def b_only_run(self, rid: int, client: bytes = ALICE) -> None:
        """A run the prepared path takes, sent to ``b`` alone (its stats are then read as they are kept)."""
        run = m.Run(id=rid, plan=self.pid, args=[m.Arg(ref="x")], outputs=["y", "z"])
        assert self.tiny([memoryview(bytes(f)) for f in framing.pack(run)], client) is not None

    def same_state(self) -> None:
        for key in ("_spaces", "_failed", "bytes", "_by_client"):
            sa, sb = getattr(self.a.store, key), getattr(self.b.store, key)
            if key == "_spaces":
                sa = {c: {k: (e.array.tolist(), e.private, e.tags) for k, e in s.items()} for c, s in sa.items()}
                sb = {c: {k: (e.array.tolist(), e.private, e.tags) for k, e in s.items()} for c, s in sb.items()}
            assert sa == sb, key
        assert self.lanes[0].counts == self.lanes[1].counts
        ta, tb = self.a.stats, self.b.stats
        ta.settle()  # both paths log a run that stored its outputs (Stats.ran), counted at the next read
        tb.settle()
        assert (ta.requests, ta.runs, ta.runs_failed, ta.tensors) == (tb.requests, tb.runs, tb.runs_failed, tb.tensors)
        assert ta.metrics.requests == tb.metrics.requests and ta.metrics.runs == tb.metrics.runs
        assert sum(ta.metrics.run_buckets) == sum(tb.metrics.run_buckets) == len(tb.durations)
        rows = lambda s: {k: (c.owner, c.requests, c.refused, sorted(c.held)) for k, c in s.clients.items()}  # noqa: E731
        assert rows(ta) == rows(tb)
        owners = lambda s: {k: (o.requests, o.refused, list(o.connections)) for k, o in s.owners.items()}  # noqa: E731
        assert owners(ta) == owners(tb)
        assert [(p.runs, p.failed) for p in ta.plans.values()] == [(p.runs, p.failed) for p in tb.plans.values()]


@pytest.fixture
def pair() -> Pair:
    p = Pair()
    p.setup()
    return p


def test_a_tiny_run_takes_the_prepared_path_with_the_general_paths_reply_and_state(pair: Pair) -> None:
    first = pair.run(10, "x", inline_max=1 << 16)  # the lane decides the plan on the general path first
    assert pair.taken == 0 and isinstance(first, m.Tensors)
    for rid, kw in enumerate(({"inline_max": 1 << 16}, {}, {"fetch": [1]}, {"fetch": [1], "inline_max": 8}), 11):
        pair.run(rid, "x", **kw)
    assert pair.taken == 4
    reply = pair.run(20, "x", outputs=("y2", "z2"), inline_max=1 << 16)
    assert isinstance(reply, m.Tensors) and [t.key for t in reply.tensors] == ["y2", "z2"]
    pair.run(21, "own:public", outputs=("p", "q"))  # the worker's public data: read like the client's own
    assert pair.taken == 6
    assert pair.b.store.entry(pair.b.owners.owner(ALICE), "y").array.tolist() == [1.0, 3.0, 5.0, 7.0]
    assert pair.lanes[1].counts["direct_runs"] == 7
    pair.same_state()


def test_the_replies_of_a_signature_written_from_its_form_are_msgspecs_bytes(pair: Pair) -> None:
    """After a reply that carries every output, the prepared path writes the next replies of that signature from
    one bytes format (worker/tiny.py _Form): byte for byte msgspec's (checked in Pair.send), whatever the keys
    and ids; a reply that does not carry every output is encoded as before."""
    pair.run(10, "x")  # the general path decides the plan
    keys = [("y", "z"), ("per%cent%s", "%d%%"), ("uni\u00e9\u2028", "a" * 256), ('q"uote', "back\\slash")]
    for rid, outs in zip((11, 12, 2**40, 2**63 - 1), keys, strict=True):
        reply = pair.run(rid, "x", outputs=outs, inline_max=1 << 16)
        assert isinstance(reply, m.Tensors) and [t.key for t in reply.tensors] == list(outs)
        assert [t.frame for t in reply.tensors] == [0, 1] and reply.re == rid
    assert pair.taken == 3  # keys written with escapes: the general path's (it decodes those requests)
    (bound,) = pair.lanes[1]._variants[pair.pid].bound.values()
    assert bound.reply and b'"re":%d' in bound.reply.head
    for rid, kw in enumerate(({}, {"fetch": [1]}, {"inline_max": 8}, {"inline_max": 16}), 20):
        reply = pair.run(rid, "x", **kw)  # the form only where every output rides on the reply (16 bytes each)
        assert type(reply) is (m.Ok if not kw or kw.get("inline_max") == 8 else m.Tensors)
    assert pair.taken == 7
    pair.same_state()


def test_every_other_run_is_left_to_the_general_path_with_its_own_error(pair: Pair) -> None:
    pair.run(10, "x")
    pair.put("x64", np.arange(4, dtype=np.float64))
    pair.put("x2", np.ones((2, 2), np.float32))
    cases = [
        ({"refs": ("nope",)}, "unknown_tensor"),
        ({"refs": ("x",), "outputs": ("y",)}, "bad_argument"),  # one key for two outputs
        ({"refs": ("x",), "outputs": ("y", "y")}, "invalid_message"),
        ({"refs": ("x",), "outputs": ("own:x", "z")}, "forbidden"),
        ({"refs": ("x64",)}, "bad_argument"),  # dtype
        ({"refs": ("x2",)}, "bad_argument"),  # rank
        ({"refs": ("x", "x")}, "bad_argument"),  # count
        ({"refs": ("x",), "fetch": [2]}, "bad_argument"),
        ({"refs": ("own:secret",), "fetch": [0]}, "private_data"),
        ({"refs": ("x",), "client": BOB}, "unknown_plan"),  # a plan only its holders see
    ]
    for rid, (kw, code) in enumerate(cases, 11):
        refs = kw.pop("refs")
        reply = pair.run(rid, *refs, **kw)
        assert isinstance(reply, m.Error) and reply.code == code, (kw, reply)
    assert pair.taken == 0
    assert pair.decoded >= len(cases)  # each declined run handed on decoded (checked equal in Pair.send)
    reply = pair.run(30, "y")  # the failed outputs of a refused run: run_failed, named
    assert isinstance(reply, m.Error) and reply.code == "run_failed"
    dup = b'{"type":"run","id":31,"plan":"%s","args":[{"ref":"x"}],"outputs":["y","z"],"outputs":["a","b"]}'
    decoded = pair.decoded
    reply = pair.send(m.Ping(id=0), header=dup % pair.pid.encode())
    assert isinstance(reply, m.Error) and reply.code == "bad_header" and "duplicate key" in reply.message
    assert pair.decoded == decoded  # a repeated key: the general path decodes it (and refuses it)
    inline = m.Run(
        id=32, plan=pair.pid, args=[m.Arg(tensor=m.Tensor(dtype="float", shape=[1], frame=0))], outputs=["y", "z"]
    )
    assert isinstance(pair.send(inline, bufs=(np.ones(1, np.float32).tobytes(),)), m.Ok)
    assert pair.taken == 0
    pair.same_state()


def test_a_quota_refused_after_the_run_is_completed_as_the_general_path_does(pair: Pair) -> None:
    pair.run(10, "x")
    pair.put("big", np.ones(400, np.float32))  # 1600 bytes; y and z of it would pass the 4096-byte quota
    assert isinstance(pair.run(11, "x", outputs=("a", "b")), m.Ok) and pair.taken == 1
    reply = pair.run(12, "big", outputs=("c", "d"))
    assert isinstance(reply, m.Error) and reply.code == "quota_exceeded"
    reply = pair.run(13, "c")
    assert isinstance(reply, m.Error) and reply.code == "run_failed" and "quota_exceeded" in reply.message
    pair.same_state()


def test_outputs_written_again_near_the_quota_are_checked_exactly(pair: Pair) -> None:
    """Near the quota the path's quick bound (Store.fits: old bytes not given back) fails, and the exact check
    decides: outputs written again in place fit (they free what they replace), new ones are refused, named."""
    pair.run(10, "x")
    pair.put("mid", np.ones(240, np.float32))  # 960 bytes; c and d of it: 1920 more, 2928 of the 4096 in all
    assert isinstance(pair.run(11, "mid", outputs=("c", "d")), m.Ok) and pair.taken == 1
    store, owner = pair.b.store, pair.b.owners.owner(ALICE)
    assert store._by_client[owner] == 2928 and store.fits(owner, 1168) and not store.fits(owner, 1169)
    assert isinstance(pair.run(12, "mid", outputs=("c", "d")), m.Ok) and pair.taken == 2  # 2928 + 1920: in place
    reply = pair.run(13, "mid", outputs=("e", "f"))
    assert isinstance(reply, m.Error) and reply.code == "quota_exceeded"
    assert "outputs of run #13 needs" in reply.message
    pair.same_state()


def test_a_plan_registered_again_is_prepared_again(pair: Pair) -> None:
    pair.run(10, "x")
    pair.run(11, "x")
    assert pair.taken == 1
    assert isinstance(pair.send(m.DeletePlan(id=12, plan=pair.pid)), m.Ok)
    reply = pair.run(13, "x")
    assert isinstance(reply, m.Error) and reply.code == "unknown_plan"
    assert isinstance(pair.send(m.RegisterPlan(id=14, name="affine"), bufs=(affine(),)), m.PlanInfo)
    pair.run(15, "x")  # decided again by the general path
    pair.run(16, "x")
    assert pair.taken == 2
    pair.same_state()


def test_small_calls_take_the_prepared_path_after_a_first_call_that_was_not_small(pair: Pair) -> None:
    lane, svc = pair.lanes[1], pair.b
    lane.max_bytes = 256  # x (4 floats) is small, big (1000 floats) is not
    pair.put("big", np.ones(1000, np.float32))

    def frames(rid: int, ref: str) -> list:
        run = m.Run(id=rid, plan=pair.pid, args=[m.Arg(ref=ref)], outputs=["y", "z"])
        return [memoryview(bytes(f)) for f in framing.pack(run, [])]

    big = frames(10, "big")  # the lane decides the plan on this call, and it is not small: no session yet
    msg, buffers = svc.decode(big, ALICE)
    assert lane.run(svc.begin(msg, buffers, big, ALICE)) is None  # type: ignore[arg-type]
    assert pair.tiny(frames(11, "x"), ALICE) is None  # no session yet: no verdict, and none kept
    assert general(svc, lane, frames(12, "x"), ALICE)  # the general path's lane makes the session
    assert pair.tiny(frames(13, "x"), ALICE) is not None  # now the prepared path takes the small call


def test_a_prepared_run_by_iobinding_reads_the_argument_of_the_call_and_returns_arrays_of_its_own(pair: Pair) -> None:
    """The lane runs a prepared signature by IOBinding (worker/direct.py ``_Bound``): inputs stay bound to the
    last argument array, outputs are written into fixed buffers; a new array under the same key must be read,
    and no two runs may share an output array."""
    pair.run(10, "x")
    pair.run(11, "x", outputs=("y1", "z1"))
    lane, store, me = pair.lanes[1], pair.b.store, pair.b.owners.owner(ALICE)
    assert any(v.bound for v in lane._variants.values() if v), "the signature is run by IOBinding"
    pair.put("x", np.full(4, 10, np.float32))  # another array under the same key
    pair.run(12, "x", outputs=("y2", "z2"))
    pair.run(13, "x", outputs=("y3", "z3"))
    assert pair.taken == 3
    y1, y2, y3 = (store.entry(me, k).array for k in ("y1", "y2", "y3"))
    assert y1.tolist() == [1.0, 3.0, 5.0, 7.0] and y2.tolist() == y3.tolist() == [21.0] * 4
    assert not np.shares_memory(y2, y3) and not np.shares_memory(y1, y2)
    pair.same_state()


def passthrough() -> bytes:
    """y = x (an input passed through as an output: onnxruntime never writes its bound buffer), z = x + 1."""
    io = helper.make_tensor_value_info
    x = io("x", TensorProto.FLOAT, ["n"])
    nodes = [helper.make_node("Add", ["x", "one"], ["z"])]
    return checked(nodes, [x], [x, io("z", TensorProto.FLOAT, ["n"])], [f32("one", [1.0])])


def test_an_output_that_is_an_input_gives_every_caller_their_own_data() -> None:
    """Found by review: the IOBinding run once answered every later call of a signature, another owner's too,
    with the first caller's values for an output onnxruntime does not write (an input passed through)."""
    p = Pair()
    for who in (ALICE, BOB):
        assert isinstance(p.send(m.Hello(id=1), who), m.Welcome)
        info = p.send(m.RegisterPlan(id=2, name="pt"), who, (passthrough(),))
        assert isinstance(info, m.PlanInfo), info
    p.pid = info.plan
    p.put("x", np.arange(4, dtype=np.float32), ALICE)
    p.put("x", np.full(4, 7, np.float32), BOB)
    for rid in (10, 11, 12):
        p.run(rid, "x")  # Pair.send also checks the prepared path's reply bytes against the general path's
    p.run(13, "x", client=BOB)
    p.run(14, "x", outputs=("y2", "z2"))
    assert p.taken == 4
    assert not any(v.bound for v in p.lanes[1]._variants.values() if v), "such a plan is never bound"
    store = p.b.store
    bob, alice = p.b.owners.owner(BOB), p.b.owners.owner(ALICE)
    assert store.entry(bob, "y").array.tolist() == [7.0] * 4 and store.entry(bob, "z").array.tolist() == [8.0] * 4
    assert store.entry(alice, "y2").array.tolist() == [0.0, 1.0, 2.0, 3.0]
    p.same_state()


def test_the_lanes_bindings_are_bounded_in_all(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A binding holds its last arguments (a deleted tensor's too, until the signature's next call) and its
    output buffers outside the clients' quotas: the lane binds at most _LANE_BOUND signatures in all."""
    monkeypatch.setattr(direct, "_LANE_BOUND", 1)
    pair.run(10, "x")
    pair.run(11, "x")  # prepared and bound: float32[4]
    pair.put("x5", np.full(5, 3.0, np.float32))
    pair.run(12, "x5")
    pair.run(13, "x5")  # prepared, run by the session's run: the lane holds its one binding
    lane, store, me = pair.lanes[1], pair.b.store, pair.b.owners.owner(ALICE)
    assert sum(len(v.bound) for v in lane._variants.values() if v) == 1
    assert pair.taken == 3 and store.entry(me, "y").array.tolist() == [7.0] * 5
    pair.same_state()


def test_the_prepared_paths_runs_are_counted_by_the_next_read_of_the_stats(pair: Pair) -> None:
    """The prepared path only logs its runs (Stats.ran); a status snapshot and a metrics scrape count them
    before anything else is asked of the worker, and a batch is counted at once past RAN_BATCH runs."""
    from planwire.worker.statlog import RAN_BATCH

    pair.run(10, "x")  # the general path's (not prepared yet): logged as well (Service._ran)
    stats = pair.b.stats
    for rid in range(11, 14):
        pair.b_only_run(rid)
    assert len(stats._ran) == 4 and stats.runs == 0
    scraped = {s.name: s.value for f in stats.metrics.registry.collect() for s in f.samples}
    assert scraped["planwire_runs_total"] == 4 and not stats._ran
    for rid in range(20, 23):
        pair.b_only_run(rid)
    snap = stats.snapshot()
    assert snap["runs"] == 7 and snap["requests"]["run"] == 7 and not stats._ran
    (owner,) = [o for o in snap["owners"] if o["requests"]]
    assert owner["tensors"] == 2 + 1  # y and z (overwritten by each run) and x
    for rid in range(100, 100 + RAN_BATCH):
        pair.b_only_run(rid)
    assert not stats._ran and stats.runs == 7 + RAN_BATCH


def test_the_frees_of_tiny_calls_between_prepared_runs_keep_the_stats_and_state_of_the_general_path(pair: Pair) -> None:
    """A delete (what a client sends, in batches, to free its tiny calls' results) goes to the general path,
    which counts the runs logged before it first: the stats and store equal one request after another's; one
    that names the worker's own data is refused ``forbidden``."""
    pair.run(10, "x")
    for rid in range(11, 15):
        pair.run(rid, "x", outputs=(f"y{rid}", f"z{rid}"))
        assert isinstance(pair.send(m.Delete(id=100 + rid, keys=[f"y{rid}", "gone", f"y{rid}"])), m.Ok)
    assert pair.taken == 4
    assert not pair.b.stats._ran  # counted before the delete was
    pair.same_state()
    held = {k for _, k in pair.b.stats.tensors}
    assert held == {"x", "y", "z", *(f"z{r}" for r in range(11, 15)), "own:secret", "own:x"}
    reply = pair.send(m.Delete(id=200, keys=["z11", "own:x"]))
    assert isinstance(reply, m.Error) and reply.code == "forbidden" and pair.taken == 4
    assert isinstance(pair.send(m.Delete(id=201, keys=["z11"]), client=BOB), m.Ok)  # none of BOB's: nothing goes
    pair.same_state()
    pair.run(15, "x", outputs=("y15", "z15"))
    assert pair.taken == 5 and pair.b.stats._ran
    assert isinstance(pair.send(m.Delete(id=115, keys=["y15", "z15", "z12"])), m.Ok)
    pair.same_state()
    assert not {"y15", "z15", "z12"} & {k for _, k in pair.b.stats.tensors}
    assert pair.b.store.entry(pair.b.owners.owner(ALICE), "z11").array.tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "msg",
    [
        m.Run(id=1, plan="p", args=[m.Arg(ref="x")], outputs=["y"]),
        m.Run(id=2, plan="p:q", args=[m.Arg(ref="a:b:c"), m.Arg(ref="d")], outputs=["y:1", "z"], fetch=[1]),
        m.Run(id=3, plan="p", args=[], outputs=[":"], inline_max=8, fetch=[0, 0]),
        m.Run(id=4, plan="p", args=[m.Arg(tensor=m.Tensor(dtype="float", shape=[1], frame=0))], outputs=["y"]),
        m.Run(id=5, plan="p", args=[m.Arg()], outputs=[]),
        m.Delete(id=6, keys=[]),
        m.Delete(id=7, keys=["a:b", "::", "c"]),
    ],
)
def test_the_repeated_key_proof_counts_what_the_encoding_holds(msg: m._Message) -> None:
    """The fast proof of no repeated member (messages.RequestDecoder) on the two requests of a tiny call: a
    header with a repeated member (one more ``:``) is never taken as exact, and the full parse refuses it."""
    decoder = m.request_decoder
    header = m.encoder.encode(msg)
    assert decoder.decode_fast(header) == msg and decoder.decode_fast(memoryview(header)) == msg
    assert decoder._exact(header, msg) and not decoder._exact(header[:-1] + b',"id":1}', msg)
    assert decoder.decode_fast(b" " + header) == msg  # not the encoding itself: proven by the count
    name = b'"keys"' if type(msg) is m.Delete else b'"outputs"'
    repeated = header[:-1] + b"," + name + b":[]}"
    assert decoder.decode_fast(repeated) is None and decoder.decode_fast(b" " + repeated) is None
    with pytest.raises(Exception, match="duplicate key"):
        decoder.decode(repeated)
