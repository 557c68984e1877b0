"""Garbage on the wire: every malformed or hostile request gets an error reply naming what is wrong, and
the worker goes on serving: a normal client keeps working and nothing stored is lost after each case.

One real worker of each kind, Python and Node.js (module scope), with small limits: --max-message-mb 2
--max-plan-mb 1 (the plan limit must be below the message limit for an oversize plan to reach the plan check).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import planwire
from tests.conformance import plans
from tests.conformance.wire import SIGNATURE, Peer
from tests.conformance.workers import kinds, node_missing, start

MiB = 1 << 20
MAX_MESSAGE = 2 * MiB
MAX_PLAN = 1 * MiB
MAX_FRAMES = 4096  # the worker's default


@dataclass
class Env:
    url: str
    client: Any  # planwire RemoteWorker: the normal client
    witness: dict[str, np.ndarray]  # key -> value it must keep
    pointers: list  # keep the witness pointers alive (a collected pointer frees its tensor)
    own: dict[str, str]  # name -> key of the worker's own tensors
    plan: str  # a registered plan: sum_and_diff
    copy: str  # a registered plan: identity of float [2, 3]
    workdir: Path


@pytest.fixture(scope="module", params=kinds())
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if request.param == "node" and (reason := node_missing()):
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("garbage")
    own_file = tmp / "own.npz"
    np.savez(own_file, weights=np.arange(6, dtype=np.float32).reshape(2, 3), labels=np.array([1, 0, 1]))
    extra = ["--max-message-mb", str(MAX_MESSAGE // MiB), "--max-plan-mb", str(MAX_PLAN // MiB)]
    with start(request.param, "garbage", data=[f"{own_file}:own"], extra=extra) as proc:
        client = planwire.connect(proc.url, timeout=10)
        witness = {"witness-a": np.arange(5, dtype=np.float32), "witness-b": np.array([[True, False]])}
        pointers = [client.put(v, key=k, tags=["witness"]) for k, v in witness.items()]
        own = {t.tags[0]: t.key for t in client.search("own")}
        with Peer(proc.url) as p:
            plan = p.register(plans.sum_and_diff(), name="sum_and_diff")["plan"]
            copy = p.register(plans.identity("float", [2, 3]), name="copy")["plan"]
        yield Env(proc.url, client, witness, pointers, own, plan, copy, Path(proc._workdir))
        client.close()


def assert_still_serving(env: Env) -> None:
    """The worker answers a normal client and has lost nothing."""
    env.client.ping()
    got = env.client.fetch_arrays(list(env.witness), keep=True)
    for (key, want), value in zip(env.witness.items(), got, strict=True):
        assert np.array_equal(value, want), key
    assert sorted(p.key for p in env.client.search("own")) == sorted(env.own.values())
    with Peer(env.url) as p:
        assert p.register(plans.sum_and_diff())["plan"] == env.plan  # plans belong to their client (§6.3)
        # the worker's own data is intact and usable (what plans compute from it is private: §6.2)
        (info,) = p.ok({"type": "describe", "keys": [env.own["weights"]]})["tensors"]
        assert info["shape"] == [2, 3] and info["owner"] == "worker" and info["private"] is True
        assert p.register(plans.identity("float", [2, 3]))["plan"] == env.copy
        p.run(env.copy, [env.own["weights"]], ["g-copy"])
        assert p.ok({"type": "describe", "keys": ["g-copy"]})["tensors"][0]["private"] is True


def header(obj: Any) -> bytes:
    return json.dumps(obj).encode()


F1 = np.ones(1, np.float32).tobytes()


@dataclass
class Case:
    frames: Callable[[Env], list[bytes]]
    code: str
    needles: tuple[str, ...]  # each must appear in the error message
    re: int = -1


def put1(key: str = "g-k", **over: Any) -> dict:
    item = {"key": key, "dtype": "float", "shape": [1], "frame": 0, **over}
    return {"type": "put", "id": 11, "tensors": [item]}


def run(env: Env, args: list, outputs: list, **over: Any) -> dict:
    return {"type": "run", "id": 12, "plan": env.plan, "args": args, "outputs": outputs, **over}


X = {"tensor": {"dtype": "float", "shape": [1, 2], "frame": 0}}
X_BYTES = np.ones((1, 2), np.float32).tobytes()

CASES: dict[str, Case] = {
    # -- framing --
    "wrong signature": Case(
        lambda e: [b"GET / HTTP/1.1", header({"type": "ping", "id": 1})],
        "bad_signature",
        ("PWIRE/1", "GET / HTTP"),
    ),
    "wrong version": Case(lambda e: [b"PWIRE/9", header({"type": "ping", "id": 1})], "bad_version", ("PWIRE/9",)),
    "hello of another version": Case(
        lambda e: [SIGNATURE, header({"type": "hello", "id": 2, "version": 9})], "bad_version", ("9",), re=2
    ),
    "empty message": Case(lambda e: [b""], "bad_signature", ("1 frame",)),
    "only a signature": Case(lambda e: [SIGNATURE], "bad_signature", ("header", "1 frame")),
    "bad JSON": Case(lambda e: [SIGNATURE, b'{"type": "ping", "id": 1'], "bad_header", ("JSON",)),
    "header not UTF-8": Case(lambda e: [SIGNATURE, b"\xff\xfe\x00"], "bad_header", ("JSON",)),
    "JSON not an object": Case(lambda e: [SIGNATURE, b"[1, 2, 3]"], "invalid_message", ("object", "array")),
    "JSON nested too deeply": Case(
        lambda e: [SIGNATURE, b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "type": "ping", "id": 1}'],
        "invalid_message",
        ("nested",),
    ),
    "unknown type": Case(
        lambda e: [SIGNATURE, header({"type": "frobnicate", "id": 3})], "unknown_type", ("frobnicate",), re=3
    ),
    "no type": Case(lambda e: [SIGNATURE, header({"id": 3})], "unknown_type", ("type",), re=3),
    "missing field": Case(lambda e: [SIGNATURE, header({"type": "get", "id": 4})], "invalid_message", ("keys",), re=4),
    "wrong field type": Case(
        lambda e: [SIGNATURE, header({"type": "get", "id": 5, "keys": "witness-a"})],
        "invalid_message",
        ("$.keys", "array"),
        re=5,
    ),
    "null field": Case(
        lambda e: [SIGNATURE, header({"type": "get", "id": 5, "keys": ["witness-a"], "keep": None})],
        "invalid_message",
        ("$.keep",),
        re=5,
    ),
    "negative id": Case(lambda e: [SIGNATURE, header({"type": "ping", "id": -5})], "invalid_message", ("$.id",)),
    "huge id": Case(lambda e: [SIGNATURE, header({"type": "ping", "id": 2**64})], "invalid_message", ("$.id",)),
    "boolean id": Case(lambda e: [SIGNATURE, header({"type": "ping", "id": True})], "invalid_message", ("$.id",)),
    "fractional id": Case(lambda e: [SIGNATURE, header({"type": "ping", "id": 1.5})], "invalid_message", ("$.id",)),
    "unknown field": Case(
        lambda e: [SIGNATURE, header({"type": "ping", "id": 6, "sneaky": 1})],
        "invalid_message",
        ("sneaky",),
        re=6,
    ),
    "empty key": Case(lambda e: [SIGNATURE, header(put1(""))], "invalid_message", ("key",), re=11),
    "over-long key": Case(lambda e: [SIGNATURE, header(put1("k" * 257))], "invalid_message", ("key",), re=11),
    # -- tensors and frames --
    "frame index out of range": Case(
        lambda e: [SIGNATURE, header(put1(frame=5)), F1], "bad_frames", ("frame 5", "1 raw frame"), re=11
    ),
    "no raw frame at all": Case(lambda e: [SIGNATURE, header(put1())], "bad_frames", ("frame 0", "0 raw frame"), re=11),
    "bytes do not match dtype x shape": Case(
        lambda e: [SIGNATURE, header(put1(shape=[3])), F1], "bad_frames", ("g-k", "12 bytes", "4"), re=11
    ),
    "unknown dtype": Case(
        lambda e: [SIGNATURE, header(put1(dtype="complex64")), F1 * 2],
        "invalid_message",
        ("complex64", "dtype"),
        re=11,
    ),
    "negative dim": Case(lambda e: [SIGNATURE, header(put1(shape=[-1])), F1], "invalid_message", ("shape",), re=11),
    "huge dims": Case(lambda e: [SIGNATURE, header(put1(shape=[2**62, 2**62])), F1], "bad_frames", ("g-k",), re=11),
    "unknown tensor ref": Case(
        lambda e: [SIGNATURE, header(run(e, [{"ref": "g-nothing"}, X], ["g-s", "g-d"])), X_BYTES],
        "unknown_tensor",
        ("g-nothing",),
        re=12,
    ),
    "unknown plan": Case(
        lambda e: [SIGNATURE, header(run(e, [X, X], ["g-s", "g-d"], plan="ab" * 32)), X_BYTES],
        "unknown_plan",
        ("abababababab",),
        re=12,
    ),
    "run arg with both ref and tensor": Case(
        lambda e: [SIGNATURE, header(run(e, [{"ref": "witness-a", **X}, X], ["g-s", "g-d"])), X_BYTES],
        "invalid_message",
        ("args[0]", "ref"),
        re=12,
    ),
    "run arg with neither": Case(
        lambda e: [SIGNATURE, header(run(e, [{}, X], ["g-s", "g-d"])), X_BYTES],
        "invalid_message",
        ("args[0]",),
        re=12,
    ),
    "run arg null ref": Case(
        lambda e: [SIGNATURE, header(run(e, [{"ref": None}, X], ["g-s", "g-d"])), X_BYTES],
        "invalid_message",
        ("ref",),
        re=12,
    ),
    "wrong number of output keys": Case(
        lambda e: [SIGNATURE, header(run(e, [X, X], ["g-s"])), X_BYTES],
        "bad_argument",
        ("2 outputs", "g-s"),
        re=12,
    ),
    "duplicate output keys": Case(
        lambda e: [SIGNATURE, header(run(e, [X, X], ["g-s", "g-s"])), X_BYTES],
        "invalid_message",
        ("distinct", "g-s"),
        re=12,
    ),
    "fetch out of range": Case(
        lambda e: [SIGNATURE, header(run(e, [X, X], ["g-s", "g-d"], fetch=[0, 7])), X_BYTES],
        "bad_argument",
        ("fetch", "7"),
        re=12,
    ),
    "argument of the wrong dtype": Case(
        lambda e: [
            SIGNATURE,
            header(run(e, [X, {"tensor": {"dtype": "int32", "shape": [1, 2], "frame": 0}}], ["g-s", "g-d"])),
            X_BYTES,
        ],
        "bad_argument",
        ("argument 1", "int32"),
        re=12,
    ),
    # -- the worker's own data --
    "overwriting private data": Case(
        lambda e: [SIGNATURE, header(put1(e.own["labels"])), F1],
        "forbidden",
        ("data:own.npz:labels", "own data"),
        re=11,
    ),
    "deleting private data": Case(
        lambda e: [SIGNATURE, header({"type": "delete", "id": 13, "keys": [e.own["weights"]]})],
        "forbidden",
        ("data:own.npz:weights",),
        re=13,
    ),
    "getting private data": Case(
        lambda e: [SIGNATURE, header({"type": "get", "id": 14, "keys": [e.own["weights"]]})],
        "forbidden",
        ("data:own.npz:weights",),
        re=14,
    ),
    "run writing private data": Case(
        lambda e: [SIGNATURE, header(run(e, [X, X], [e.own["weights"], "g-d"])), X_BYTES],
        "forbidden",
        ("data:own.npz:weights",),
        re=12,
    ),
    # -- limits --
    "oversize message": Case(
        lambda e: [SIGNATURE, header(put1(shape=[640 * 1024])), bytes(640 * 1024 * 4)],
        "too_large",
        (str(MAX_MESSAGE), "message"),
        re=11,
    ),
    "oversize header": Case(
        lambda e: [SIGNATURE, header({"type": "ping", "id": 15, "pad": "x" * (MiB + 10)})],
        "too_large",
        ("header", str(MiB)),
    ),
    "too many frames": Case(
        lambda e: [SIGNATURE, header({"type": "ping", "id": 16})] + [b""] * (MAX_FRAMES + 1),
        "too_large",
        (str(MAX_FRAMES + 1), "frames"),
        re=16,
    ),
    # -- plans --
    "plan that is not ONNX": Case(
        lambda e: [
            SIGNATURE,
            header({"type": "register_plan", "id": 17, "name": "junk"}),
            b"\x08\x07garbage, not a protobuf ModelProto",
        ],
        "bad_plan",
        ("junk",),
        re=17,
    ),
    "empty plan": Case(
        lambda e: [SIGNATURE, header({"type": "register_plan", "id": 17}), b""],
        "bad_plan",
        ("not an ONNX model",),
        re=17,
    ),
    "plan frame out of range": Case(
        lambda e: [SIGNATURE, header({"type": "register_plan", "id": 17, "frame": 2}), b""],
        "bad_frames",
        ("register_plan.frame", "2"),
        re=17,
    ),
    "plan with an external initializer": Case(
        lambda e: [
            SIGNATURE,
            header({"type": "register_plan", "id": 18, "name": "exfil"}),
            plans.external_initializer("weights.bin"),
        ],
        "bad_plan",
        ("external data", "weights.bin"),
        re=18,
    ),
    "plan with an external Constant": Case(
        lambda e: [
            SIGNATURE,
            header({"type": "register_plan", "id": 18}),
            plans.external_constant("secret.txt"),
        ],
        "bad_plan",
        ("external data", "secret.txt"),
        re=18,
    ),
    "plan with a custom domain op": Case(
        lambda e: [SIGNATURE, header({"type": "register_plan", "id": 19}), plans.custom_domain()],
        "bad_plan",
        ("com.example.evil",),
        re=19,
    ),
    "plan with a contrib op": Case(
        lambda e: [SIGNATURE, header({"type": "register_plan", "id": 19}), plans.contrib_domain()],
        "bad_plan",
        ("com.microsoft",),
        re=19,
    ),
    "oversize plan": Case(
        lambda e: [
            SIGNATURE,
            header({"type": "register_plan", "id": 20, "name": "big"}),
            plans.padded(MAX_PLAN + 100_000),
        ],
        "too_large",
        ("big", "1 MiB"),
        re=20,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_garbage_gets_an_error_and_the_worker_goes_on(env: Env, name: str) -> None:
    case = CASES[name]
    with Peer(env.url) as raw:
        raw.register(plans.sum_and_diff())  # the plan the run cases name is this client's too (§6.3)
        raw.send_frames(case.frames(env))
        reply = raw.recv()  # the reply is checked against schemas/error.json
        assert reply.kind == "error", reply
        assert reply["code"] == case.code, f"{name}: {reply}"
        for needle in case.needles:
            assert needle in reply["message"], f"{name}: {needle!r} not in {reply['message']!r}"
        assert reply["re"] == case.re, f"{name}: {reply}"
        assert not raw.poll(0.02), "one reply per request"
        assert raw.ok({"type": "ping"}).kind == "ok"  # the same connection still works
    assert_still_serving(env)


def test_external_data_is_refused_even_when_the_file_exists(env: Env) -> None:
    """The worker's cwd holds the file a hostile plan points to: the plan is refused before onnxruntime
    could read it (onnxruntime would resolve a bare file name against the cwd)."""
    secret = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    (env.workdir / "weights.bin").write_bytes(secret.tobytes())
    try:
        data = plans.external_initializer("weights.bin")
        with Peer(env.url) as raw:
            reply = raw.error({"type": "register_plan", "name": "exfil"}, [data], code="bad_plan")
            assert "external data" in reply["message"] and "weights.bin" in reply["message"]
            assert raw.ok({"type": "has_plan", "plan": plans.plan_id(data)}).kind == "missing"
    finally:
        (env.workdir / "weights.bin").unlink()
    assert_still_serving(env)


def test_a_frame_over_the_transport_cap_is_dropped_without_reply(env: Env) -> None:
    """A frame above ZeroMQ's MAXMSGSIZE (limit + 1 MiB) closes that connection; ZeroMQ reconnects and
    the worker serves on (PROTOCOL.md §8)."""
    with Peer(env.url) as raw:
        raw.send_frames([SIGNATURE, header({"type": "ping", "id": 1}), bytes(MAX_MESSAGE + 2 * MiB)])
        assert not raw.poll(0.5)
        assert raw.ok({"type": "ping"}).kind == "ok"
    assert_still_serving(env)


def test_a_burst_of_garbage_from_many_connections(env: Env) -> None:
    peers = [Peer(env.url) for _ in range(4)]
    try:
        for p in peers:
            p.register(plans.sum_and_diff())  # the plan the run cases name is each client's too (§6.3)
        for i, p in enumerate(peers):
            for case in list(CASES.values())[i::4]:
                p.send_frames(case.frames(env))
        for i, p in enumerate(peers):
            codes = [p.recv()["code"] for _ in list(CASES.values())[i::4]]
            assert codes == [c.code for c in list(CASES.values())[i::4]]
    finally:
        for p in peers:
            p.close()
    assert_still_serving(env)


def test_the_client_refuses_a_message_over_the_workers_limit_before_sending(env: Env) -> None:
    # Past the hard cap ZeroMQ would drop the connection and the caller would wait for its timeout.
    for size in (MAX_MESSAGE + 4096, 3 * MAX_MESSAGE):
        big = np.zeros(size // 4, np.float32)
        with pytest.raises(ValueError, match=r"put of 'too-big' is a message of \d+ bytes, over worker") as e:
            env.client.put(big, key="too-big")
        assert "--max-message-mb" in str(e.value)
        with pytest.raises(ValueError, match="over worker"):  # a run with the tensor inline, too
            env.client.run(env.client.plan_pointer(_padded_source(1)).variant_for((big,)), [big])
    assert "too-big" not in {p.key for p in env.client.search()}
    assert_still_serving(env)


def test_the_client_refuses_a_plan_over_the_workers_limit_before_sending(env: Env) -> None:
    with pytest.raises(ValueError, match=r"plan 'padded' is \d+ bytes, over worker .* --max-plan-mb"):
        env.client.plan_pointer(_padded_source(MAX_PLAN + 100_000))
    assert_still_serving(env)


def _padded_source(size: int) -> Any:
    """A one-variant plan source whose ONNX bytes are ``size`` long (an identity plan when size is small)."""
    from planwire.transport.spec import PlanVariant, TensorSpec

    data = plans.padded(size) if size > 1 else plans.identity("float", ["n"])
    spec = TensorSpec("x", "float", ("n",))
    variant = PlanVariant(data, (spec,), (spec,))

    class Source:
        name = "padded"
        variants = (variant,)

        def variant_for(self, args: Any) -> PlanVariant:
            return variant

    return Source()
