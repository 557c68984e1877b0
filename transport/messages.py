"""Every message of the planwire protocol, as typed msgspec structs.

A message is one JSON header (these structs, tagged by ``type``) plus raw frames that the header points
to by index. schemas/ is generated from these structs (``python -m planwire.transport.schemagen``) and a
test keeps the two identical, so the protocol document cannot drift from the code.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

PROTOCOL_VERSION = 1

Key = Annotated[str, Meta(min_length=1, max_length=256, description="A stored tensor's id, chosen by the client.")]
Tag = Annotated[str, Meta(min_length=1, max_length=256)]
RequestId = Annotated[int, Meta(ge=0, le=2**63 - 1, description="Chosen by the client; echoed as `re`.")]
Size = Annotated[int, Meta(ge=0, le=2**62)]  # one axis of a real tensor (spec.Dim is a declared axis)
MAX_RANK = 64
"""Most axes a tensor may have (numpy's limit): a longer shape is refused as invalid_message."""
Shape = Annotated[list[Size], Meta(max_length=MAX_RANK)]
FrameIndex = Annotated[int, Meta(ge=0, description="Index of the raw frame after the header (0 = first).")]
# Tensor element types: ONNX TensorProto.DataType names in lower case (transport/dtypes.py maps them).
DType = Annotated[
    Literal[
        "float",
        "double",
        "float16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    ],
    Meta(description="ONNX element type name in lower case (float = float32, double = float64)."),
]


class _Block(Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """Base of every struct here (its options inherited): a JSON object, unknown fields refused, defaults left
    out. ``gc=False``: it holds only JSON data (no reference cycles), so the garbage collector need not track
    it; a client with thousands of replies unread (pipelined calls) then gives it less to walk."""


class _Message(_Block, tag_field="type"):
    """Base: a JSON object with a ``type`` tag."""


# --- building blocks -------------------------------------------------------------------------------


class Tensor(_Block):
    """A tensor carried in this message: its bytes are frame ``frame``, little-endian, C order."""

    dtype: DType
    shape: Shape
    frame: FrameIndex


class PutTensor(_Block):
    """A tensor to store under ``key`` with optional tags."""

    key: Key
    dtype: DType
    shape: Shape
    frame: FrameIndex
    tags: list[Tag] = []


class KeyedTensor(_Block):
    """A stored tensor returned by value."""

    key: Key
    dtype: DType
    shape: Shape
    frame: FrameIndex


class TensorInfo(_Block):
    """What a stored tensor is, without its bytes. ``private``: it never leaves the worker (the worker's
    own data, or a result computed from private data). ``owner``: ``worker`` for the worker's own data,
    ``client`` for the asking client's own tensors (no client ever sees another's). ``release``: for a
    private result the data owner's policy lets leave, what a read returns: ``as_is`` (the value) or
    ``update`` (the value minus the one the client stored for the input it updates); absent, it never leaves."""

    key: Key
    dtype: DType
    shape: Shape
    tags: list[Tag] = []
    private: bool = False
    owner: Literal["worker", "client"] = "client"
    release: Literal["as_is", "update"] | UnsetType = UNSET


class Arg(_Block):
    """One plan argument: exactly one of ``ref`` (a stored tensor) or ``tensor`` (inline); never null."""

    ref: Key | UnsetType = UNSET
    tensor: Tensor | UnsetType = UNSET


class Port(_Block):
    """A plan input or output as the worker's runtime sees it; a str dim is a dynamic axis, a null dim an
    axis of unknown size, and a null ``shape`` an unknown rank (any number of axes)."""

    name: str
    dtype: DType
    shape: list[int | str | None] | None


class Limits(_Block, frozen=True):
    """What a worker accepts per message (required) and, optionally, the caps it holds its clients to
    (PROTOCOL.md §8.1): an absent cap is one the worker does not announce, not necessarily one it lacks."""

    max_message_bytes: int
    max_plan_bytes: int
    max_frames: int
    max_store_bytes: Annotated[int, Meta(ge=1, description="All clients' stored tensors together.")] | UnsetType = UNSET
    max_client_store_bytes: Annotated[int, Meta(ge=1, description="One client's stored tensors.")] | UnsetType = UNSET
    max_plans: Annotated[int, Meta(ge=1, description="Plans registered at once.")] | UnsetType = UNSET
    max_client_queue: (
        Annotated[int, Meta(ge=1, description="Requests queued and replies unread per connection.")] | UnsetType
    ) = UNSET
    run_timeout_seconds: (
        Annotated[float, Meta(gt=0, description="A run or registration is stopped after this long.")] | UnsetType
    ) = UNSET
    max_run_memory_bytes: (
        Annotated[int, Meta(ge=1, description="Memory a run or registration may add to the process running it.")]
        | UnsetType
    ) = UNSET


# --- requests (client -> worker) -------------------------------------------------------------------


class Hello(_Message, tag="hello"):
    """Opens a conversation: the worker answers with Welcome (version, id, providers, limits)."""

    id: RequestId
    version: int = PROTOCOL_VERSION
    client: str = ""
    identity: Annotated[
        str,
        Meta(
            max_length=256,
            description="Without CURVE: the identity a previous welcome issued, to keep its objects after a reconnect.",
        ),
    ] = ""


class Ping(_Message, tag="ping"):
    id: RequestId


class Put(_Message, tag="put"):
    """Store tensors (overwrites an existing non-private key)."""

    id: RequestId
    tensors: list[PutTensor]


class Get(_Message, tag="get"):
    """Return tensors by value; unless ``keep``, they are removed from the worker (moved)."""

    id: RequestId
    keys: list[Key]
    keep: bool = False


class Delete(_Message, tag="delete"):
    """Forget tensors; unknown keys are ignored (deletes race with garbage collection)."""

    id: RequestId
    keys: list[Key]


class Search(_Message, tag="search"):
    """Tensors carrying all the given tags."""

    id: RequestId
    tags: list[Tag]


class Describe(_Message, tag="describe"):
    """dtype, shape and tags of stored tensors."""

    id: RequestId
    keys: list[Key]


class RegisterPlan(_Message, tag="register_plan"):
    """Store a plan: frame ``frame`` holds the ONNX model bytes; its id is their SHA-256."""

    id: RequestId
    frame: FrameIndex = 0
    name: str = ""


class HasPlan(_Message, tag="has_plan"):
    id: RequestId
    plan: str


class DeletePlan(_Message, tag="delete_plan"):
    """Unregister a plan; an unknown plan id is ignored (as ``delete`` ignores unknown keys)."""

    id: RequestId
    plan: str


class Run(_Message, tag="run"):
    """Run a plan; output i is stored under ``outputs[i]``. Outputs listed in ``fetch``, and every output
    of at most ``inline_max`` bytes, are also returned in the reply (still stored)."""

    id: RequestId
    plan: str
    args: list[Arg]
    outputs: Annotated[list[Key], Meta(extra_json_schema={"uniqueItems": True})]
    fetch: list[Annotated[int, Meta(ge=0)]] = []
    inline_max: Annotated[
        int, Meta(ge=0, description="Also return outputs of at most this many bytes, so get needs no round trip.")
    ] = 0


class Cancel(_Message, tag="cancel"):
    """Cancel this connection's run ``run`` (its request id) while it is queued or running: the run is
    answered with error ``cancelled`` and its outputs are marked failed with that reason. Answered at once,
    even while a run executes: ok, or ``bad_argument`` when no such run is queued or running."""

    id: RequestId
    run: RequestId


Request = Hello | Ping | Put | Get | Delete | Search | Describe | RegisterPlan | HasPlan | Run | DeletePlan | Cancel


# --- replies (worker -> client); every reply names the request (``re``) and the worker's session -----


class Welcome(_Message, tag="welcome"):
    re: RequestId
    session: str
    worker: str
    version: int
    providers: list[str]
    opsets: dict[str, int]
    limits: Limits
    identity: Annotated[
        str,
        Meta(
            description="Without CURVE: the client's identity on this worker (secret: present it in a later hello "
            "to keep its objects); absent with CURVE, where the client's public key is its identity."
        ),
    ] = ""


class Ok(_Message, tag="ok"):
    re: RequestId
    session: str


class Tensors(_Message, tag="tensors"):
    """Tensors by value (reply to get, and to run with ``fetch``)."""

    re: RequestId
    session: str
    tensors: list[KeyedTensor]


class Found(_Message, tag="found"):
    """Tensor descriptions (reply to search and describe)."""

    re: RequestId
    session: str
    tensors: list[TensorInfo]


class PlanInfo(_Message, tag="plan"):
    """A registered plan: its id and ports (reply to register_plan and has_plan when present)."""

    re: RequestId
    session: str
    plan: str
    inputs: list[Port]
    outputs: list[Port]
    placement: Annotated[
        str,
        Meta(
            description="Present when not every node of the plan runs on the worker's device: where they run, e.g. "
            "'cuda:0 with 3 nodes on CPU (Shape×2, NonZero)' (each such node costs host-device copies per run)."
        ),
    ] = ""


class Missing(_Message, tag="missing"):
    """has_plan: the worker does not have this plan."""

    re: RequestId
    session: str
    plan: str


ErrorCode = Literal[
    "bad_signature",
    "bad_version",
    "bad_header",
    "unknown_type",
    "invalid_message",
    "bad_frames",
    "too_large",
    "unknown_tensor",
    "unknown_plan",
    "forbidden",
    "bad_plan",
    "bad_argument",
    "run_failed",
    "internal",
    "quota_exceeded",
    "plan_too_large",
    "private_data",
    "plan_crashed",
    "plan_timeout",
    "out_of_memory",
    "cancelled",
]


class Error(_Message, tag="error"):
    """A request failed. ``re`` is -1 when the request id could not be read."""

    re: Annotated[int, Meta(ge=-1)]
    session: str
    code: ErrorCode
    message: str


Reply = Welcome | Ok | Tensors | Found | PlanInfo | Missing | Error

REQUESTS: tuple[type[_Message], ...] = Request.__args__  # type: ignore[attr-defined]
REPLIES: tuple[type[_Message], ...] = Reply.__args__  # type: ignore[attr-defined]

reply_decoder = msgspec.json.Decoder(Reply)
encoder = msgspec.json.Encoder()


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise msgspec.DecodeError(f"duplicate key {dup!r} in a JSON object")
    return out


class RequestDecoder:
    """Decodes a request header as msgspec does, and also refuses duplicate keys (PROTOCOL.md §2), which
    msgspec would merge (last wins).

    Fast path, exact: without a backslash in the header, JSON strings read the same before and after
    decoding, so every ``:`` outside them is one object member. When re-encoding the decoded message
    (defaults omitted) gives the header itself (a planwire client's: no ``:`` counted) or as many ``:``, no
    member was repeated. Otherwise (escapes, defaults written out, a repeat) the header is parsed again.
    """

    def __init__(self) -> None:
        self._decode = msgspec.json.Decoder(Request).decode
        self._encode = encoder.encode

    def decode(self, header: bytes | memoryview) -> _Message:
        msg = self._decode(header)
        if not self._exact(header, msg):
            raw = header if type(header) is bytes else bytes(header)
            json.loads(raw, object_pairs_hook=_no_duplicates)  # raises msgspec.DecodeError on a repeat
        return msg

    def decode_fast(self, header: bytes | memoryview) -> _Message | None:
        """The request when the fast path proves no member repeated; None when only the full parse can tell
        (escapes, defaults written out, or a repeat); msgspec's error for a header that does not decode."""
        msg = self._decode(header)
        return msg if self._exact(header, msg) else None

    def _exact(self, header: bytes | memoryview, msg: _Message) -> bool:
        raw = header if type(header) is bytes else bytes(header)
        # find, not ``in``: bytes' ``in`` tries its operand as an int first (a TypeError made and dropped per call)
        again = self._encode(msg) if raw.find(b"\\") < 0 else None
        return again is not None and (raw == again or raw.count(b":") == again.count(b":"))


request_decoder = RequestDecoder()


def type_name(cls: type[Struct]) -> str:
    """The ``type`` tag of a message class."""
    return cls.__struct_config__.tag  # type: ignore[return-value]
