"""A raw planwire peer written from schemas/PROTOCOL.md alone: ZeroMQ frames, JSON headers, numpy bytes.

Deliberately independent of planwire's own client and message types, so the suite tests the documented
protocol rather than the reference implementation's understanding of itself.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import zmq

SIGNATURE = b"PWIRE/1"
SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# PROTOCOL.md §3: wire dtype name -> numpy dtype (little-endian).
WIRE_DTYPES: dict[str, np.dtype] = {
    "float": np.dtype("<f4"),
    "double": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("?"),
}
_BY_NUMPY = {v.newbyteorder("="): k for k, v in WIRE_DTYPES.items()}

REQUESTS = (
    "hello",
    "ping",
    "put",
    "get",
    "delete",
    "search",
    "describe",
    "register_plan",
    "has_plan",
    "delete_plan",
    "run",
    "cancel",
)
REPLIES = ("welcome", "ok", "tensors", "found", "plan", "missing", "error")


class WireError(Exception):
    """The worker answered with an error reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"[{reply['code']}] {reply['message']}")
        self.reply = reply
        self.code = reply["code"]
        self.message = reply["message"]


def encode(array: Any) -> tuple[dict[str, Any], bytes]:
    """({"dtype", "shape"}, bytes) of an array: little-endian, C order."""
    a = np.asarray(array)
    wire = _BY_NUMPY[a.dtype.newbyteorder("=")]
    data = np.ascontiguousarray(a, dtype=WIRE_DTYPES[wire]).tobytes()
    return {"dtype": wire, "shape": list(a.shape)}, data


def decode(desc: dict[str, Any], frame: bytes) -> np.ndarray:
    dt = WIRE_DTYPES[desc["dtype"]]
    shape = desc["shape"]
    assert len(frame) == int(np.prod(shape, dtype=np.int64)) * dt.itemsize, (desc, len(frame))
    return np.frombuffer(bytes(frame), dtype=dt).reshape(shape)


@cache
def _validator(kind: str) -> Any:
    try:
        import jsonschema
    except ImportError as e:  # never skip silently: schema conformance is half of what the suite checks
        raise RuntimeError(
            "the conformance suite validates every reply against schemas/*.json and needs jsonschema: "
            "pip install jsonschema (or planwire[dev])"
        ) from e
    schema = json.loads((SCHEMAS / f"{kind}.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def check_reply(header: dict[str, Any], frames: Sequence[bytes]) -> None:
    """A reply as PROTOCOL.md says: a known type, its schema, re and session, frame indices in range."""
    kind = header.get("type")
    assert kind in REPLIES, f"unknown reply type {kind!r}: {header}"
    errors = [e.message for e in _validator(kind).iter_errors(header)]
    assert not errors, f"{kind} reply does not match schemas/{kind}.json: {errors}: {header}"
    assert isinstance(header["re"], int) and isinstance(header["session"], str) and header["session"]
    if kind == "tensors":
        for t in header["tensors"]:
            assert 0 <= t["frame"] < len(frames), f"reply tensor {t} points past {len(frames)} raw frames"


class Reply(dict):
    """A reply header (a dict) with its raw frames."""

    frames: list[bytes]

    @property
    def kind(self) -> str:
        return self["type"]

    def arrays(self) -> dict[str, np.ndarray]:
        """Tensors of a `tensors` reply by key."""
        return {t["key"]: decode(t, self.frames[t["frame"]]) for t in self["tensors"]}

    def array_list(self) -> list[np.ndarray]:
        return [decode(t, self.frames[t["frame"]]) for t in self["tensors"]]


class Peer:
    """One DEALER connection to a worker. Every reply read is checked against schemas/."""

    _ctx: zmq.Context | None = None

    def __init__(self, url: str, *, timeout: float = 10.0, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.ids = itertools.count(1)
        if Peer._ctx is None:
            Peer._ctx = zmq.Context()
        self.sock = Peer._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve
        self.sock.connect(url)
        self.session: str | None = None

    # -- frames --

    def send_frames(self, frames: Sequence[bytes]) -> None:
        self.sock.send_multipart(list(frames), copy=True)

    def send(self, header: dict[str, Any], frames: Sequence[bytes] = ()) -> int:
        """Send a request; an ``id`` is added when the header has none. Returns the id."""
        if "id" not in header:
            header = {**header, "id": next(self.ids)}
        self.send_frames([SIGNATURE, json.dumps(header).encode(), *frames])
        return header["id"]

    def recv(self, timeout: float | None = None) -> Reply:
        timeout = self.timeout if timeout is None else timeout
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise TimeoutError(f"no reply from {self.url} within {timeout} s")
        frames = self.sock.recv_multipart()
        assert len(frames) >= 2, f"a reply needs a signature and a header, got {len(frames)} frame(s)"
        assert frames[0] == SIGNATURE, f"reply signature {frames[0][:16]!r}"
        header = json.loads(frames[1].decode("utf-8"))
        assert isinstance(header, dict), header
        check_reply(header, frames[2:])
        reply = Reply(header)
        reply.frames = frames[2:]
        if self.session is None:
            self.session = reply["session"]
        return reply

    def poll(self, timeout: float) -> bool:
        return bool(self.sock.poll(int(timeout * 1000), zmq.POLLIN))

    # -- requests --

    def request(self, header: dict[str, Any], frames: Sequence[bytes] = ()) -> Reply:
        rid = self.send(header, frames)
        reply = self.recv()
        assert reply["re"] == rid, f"reply to #{reply['re']} while waiting for #{rid}: {reply}"
        return reply

    def ok(self, header: dict[str, Any], frames: Sequence[bytes] = ()) -> Reply:
        """A request that must succeed: raises WireError on an error reply."""
        reply = self.request(header, frames)
        if reply.kind == "error":
            raise WireError(reply)
        return reply

    def error(self, header: dict[str, Any], frames: Sequence[bytes] = (), code: str | None = None) -> Reply:
        """A request that must fail (with ``code``)."""
        reply = self.request(header, frames)
        assert reply.kind == "error", f"expected an error{f' {code}' if code else ''}, got {reply}"
        if code is not None:
            assert reply["code"] == code, f"expected {code}, got {reply['code']}: {reply['message']}"
        return reply

    # -- shorthands --

    def put(self, key: str, array: Any, tags: Sequence[str] = ()) -> Reply:
        desc, data = encode(array)
        item = {"key": key, **desc, "frame": 0}
        if tags:
            item["tags"] = list(tags)
        reply = self.ok({"type": "put", "tensors": [item]}, [data])
        assert reply.kind == "ok", reply
        return reply

    def get(self, keys: Sequence[str], keep: bool = False) -> list[np.ndarray]:
        reply = self.ok({"type": "get", "keys": list(keys), "keep": keep})
        assert reply.kind == "tensors" and [t["key"] for t in reply["tensors"]] == list(keys), reply
        return reply.array_list()

    def get1(self, key: str, keep: bool = False) -> np.ndarray:
        return self.get([key], keep)[0]

    def register(self, data: bytes, name: str = "") -> Reply:
        header: dict[str, Any] = {"type": "register_plan"}
        if name:
            header["name"] = name
        reply = self.ok(header, [data])
        assert reply.kind == "plan", reply
        return reply

    def run_header(
        self, plan: str, args: Sequence[Any], outputs: Sequence[str], fetch: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[bytes]]:
        """A run header: a str argument is a ref, anything else an inline tensor."""
        wire_args, frames = [], []
        for a in args:
            if isinstance(a, str):
                wire_args.append({"ref": a})
            else:
                desc, data = encode(a)
                wire_args.append({"tensor": {**desc, "frame": len(frames)}})
                frames.append(data)
        header: dict[str, Any] = {"type": "run", "plan": plan, "args": wire_args, "outputs": list(outputs)}
        if fetch:
            header["fetch"] = list(fetch)
        return header, frames

    def run(self, plan: str, args: Sequence[Any], outputs: Sequence[str], fetch: Sequence[int] = ()) -> Reply:
        return self.ok(*self.run_header(plan, args, outputs, fetch))

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
