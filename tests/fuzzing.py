"""Fuzzing the worker's two parsers of hostile bytes: request messages (``Service.handle``) and plans
(``plancheck.check_model``). Hypothesis properties, shared by a bounded test in the suite
(tests/test_fuzz.py) and a longer campaign: ``make fuzz MINUTES=N`` (``python -m tests.fuzzing --minutes N``).

Properties:
* ``Service.handle`` answers every message with one well-formed reply (never raises), echoes a readable
  request id, and never answers ``internal`` (a bug);
* ``check_model`` either accepts a plan or raises ``PlanRejected``, nothing else;
* (campaign only) a mutated plan registered through ``Service.handle`` is answered, never ``internal``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import cache
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planwire.transport import framing
from planwire.transport import messages as m
from planwire.transport.framing import SIGNATURE, Limits
from planwire.transport.plancheck import PlanRejected, check_model
from planwire.worker.service import Service
from tests import hostile
from tests.conformance import plans

FIELDS = sorted(
    {f for cls in (*m.REQUESTS, m.PutTensor, m.Arg, m.Tensor) for f in cls.__struct_fields__} | {"type", "x"}
)
TYPES = [m.type_name(c) for c in m.REQUESTS] + ["frobnicate", ""]
DTYPES = ["float", "double", "int64", "int32", "uint8", "bool", "bfloat16", "string"]


@cache
def service() -> tuple[Service, str]:
    """One in-process worker (small limits) with a registered plan and a tensor, shared by all examples."""
    svc = Service("fuzz", limits=Limits(max_message_bytes=1 << 20, max_plan_bytes=1 << 20, max_frames=16))
    svc.max_plans = 8
    svc.store.max_bytes = 4 << 20
    reply = svc.handle([SIGNATURE, b'{"type": "register_plan", "id": 1}', plans.sum_and_diff()])
    pid = json.loads(reply[1])["plan"]
    svc.handle([SIGNATURE, b'{"type": "put", "id": 2, "tensors": [{"key": "k", "dtype": "float", "shape": [2, 2], '
                b'"frame": 0}]}', np.ones(4, np.float32).tobytes()])  # fmt: skip
    return svc, pid


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["k", "k2", "pid", "", "a\nb", "x" * 300]), st.text(max_size=12))


def _json_value() -> st.SearchStrategy[Any]:
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**64), max_value=2**64),
        st.sampled_from([0, 1, 2, 3, -1, 2**62, 2**63 - 1, 2**63]),
        st.floats(allow_nan=False),
        _strings(),
        st.sampled_from(DTYPES),
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=6)
        ),
        max_leaves=20,
    )


def _shapes() -> st.SearchStrategy[list[int]]:
    dims = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**62, 2**63]))
    return st.one_of(st.lists(st.integers(0, 4), max_size=3), st.lists(dims, max_size=4), st.just([1] * 65))


@st.composite
def _tensor(draw: st.DrawFn) -> dict[str, Any]:
    return {"dtype": draw(st.sampled_from(DTYPES)), "shape": draw(_shapes()), "frame": draw(st.integers(0, 4))}


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Requests that pass (or nearly pass) the schema, so the handlers behind the decoder are reached."""
    _, pid = service()
    keys = st.lists(st.sampled_from(["k", "k2", "out", "out2", "data:x"]), max_size=3)
    kind = draw(st.sampled_from(TYPES[:-2]))
    obj: dict[str, Any] = {"type": kind, "id": draw(st.integers(0, 2**63 - 1))}
    if kind in ("get", "delete", "describe"):
        obj["keys"] = draw(keys)
        if kind == "get":
            obj["keep"] = draw(st.booleans())
    elif kind == "search":
        obj["tags"] = draw(st.lists(_strings(), max_size=2))
    elif kind == "put":
        obj["tensors"] = [
            {"key": draw(st.sampled_from(["k", "k2"])), **draw(_tensor())} for _ in range(draw(st.integers(0, 2)))
        ]
    elif kind in ("has_plan", "delete_plan"):
        obj["plan"] = draw(st.sampled_from([pid, "0" * 64, ""]))
    elif kind == "register_plan":
        obj["frame"] = draw(st.integers(0, 3))
    elif kind == "run":
        args = [{"ref": k} for k in draw(keys)] + [{"tensor": draw(_tensor())} for _ in range(draw(st.integers(0, 2)))]
        obj.update(plan=draw(st.sampled_from([pid, pid, "nope"])), args=draw(st.permutations(args)), outputs=draw(keys))
        obj["fetch"] = draw(st.lists(st.integers(0, 3), max_size=2))
        obj["inline_max"] = draw(st.integers(0, 1 << 20))
    return obj


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Header frames: near-valid JSON requests most of the time, raw bytes and edited JSON otherwise."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind >= 5:
        return json.dumps(draw(valid_requests())).encode()
    obj: dict[str, Any] = {"type": draw(st.sampled_from(TYPES))}
    if draw(st.booleans()):
        obj["id"] = draw(st.one_of(st.integers(0, 10), st.sampled_from([-1, 2**63, 1.0, "1", None])))
    obj.update(draw(st.dictionaries(st.sampled_from(FIELDS), _json_value(), max_size=5)))
    _, pid = service()
    for key in ("plan", "ref"):
        if key in obj and draw(st.booleans()):
            obj[key] = pid
    text = json.dumps(obj).encode()
    if kind == 1:  # a duplicated member
        text = text[:-1] + b', "id": 3}'
    elif kind == 2 and text:  # a byte edited
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + bytes([draw(st.integers(0, 255))]) + text[i + 1 :]
    return text


@st.composite
def messages(draw: st.DrawFn) -> list[bytes]:
    sig = draw(st.sampled_from([SIGNATURE] * 12 + [b"PWIRE/2", b"", b"junk"]))
    frames = [sig, draw(headers())] if draw(st.integers(0, 20)) else draw(st.lists(st.binary(max_size=8), max_size=2))
    raw = draw(st.lists(st.binary(max_size=64), max_size=3))
    if draw(st.booleans()) and len(frames) == 2:
        raw = [np.ones(draw(st.sampled_from([0, 1, 4, 6])), np.float32).tobytes(), *raw]
    if draw(st.integers(0, 9)) == 0:
        raw = [draw(st.sampled_from(SEEDS)), *raw]
    return [*frames, *raw]


def check_reply(frames: list[bytes]) -> None:
    """The property of one request: exactly one valid reply, a readable id echoed, never ``internal``."""
    svc, _ = service()
    reply = svc.handle(frames, b"fuzz")
    msg, _ = framing.unpack_reply([bytes(f) for f in reply])
    assert msg.session == svc.session  # type: ignore[attr-defined]
    if isinstance(msg, m.Error):
        assert msg.code != "internal", msg.message
    rid = framing.request_id(frames)
    if rid >= 0 and not isinstance(msg, m.Error):
        assert msg.re == rid  # type: ignore[attr-defined]


SEEDS = [plans.sum_and_diff(), plans.matmul(), plans.with_metadata(), *(h.build() for h in hostile.CORPUS[:25])]


@st.composite
def plan_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real or hostile plan with a few bytes flipped, inserted, cut or spliced."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(max_size=256))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == 0 and data:
            data[i] = draw(st.integers(0, 255))
        elif op == 1:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del data[i:]
        else:
            data[i:i] = draw(st.sampled_from(SEEDS))[: draw(st.integers(0, 64))]
    return bytes(data)


def check_plan(data: bytes) -> None:
    try:
        check_model(data, max_bytes=1 << 20, max_nodes=5_000)
    except PlanRejected as e:
        assert str(e) and e.code in ("bad_plan", "plan_too_large")


def check_registration(data: bytes) -> None:
    """A mutated plan through the whole register_plan path: the checker, then onnxruntime for what passes
    (campaign only: a crash inside onnxruntime would take the test process down)."""
    svc, pid = service()
    for other in [p for p in svc.plans if p != pid]:
        svc.plans.pop(other)
    check_reply([SIGNATURE, b'{"type": "register_plan", "id": 1}', data])


def properties(examples: int, *, campaign: bool = False) -> list:
    """The properties as hypothesis tests of ``examples`` examples each (the campaign adds registration)."""
    cfg = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    props = [cfg(given(messages())(check_reply)), cfg(given(plan_bytes())(check_plan))]
    if campaign:
        props.append(cfg(given(plan_bytes())(check_registration)))
    return props


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz the request decoder and the plan checker for a while.")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=2_000, help="examples per property per round")
    args = ap.parse_args(argv)
    deadline = time.monotonic() + args.minutes * 60
    rounds = 0
    while time.monotonic() < deadline:
        props = properties(args.batch, campaign=True)
        for prop in props:
            prop()  # raises (with the shrunk example) on the first failure
        rounds += 1
        print(f"fuzz: round {rounds}: {len(props) * args.batch * rounds} examples, 0 failures", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
