"""Framing: one module owns it. A message is [signature, JSON header, *raw frames].

The signature frame names the protocol and its major version; the header is one msgspec struct; raw
frames carry tensor and plan bytes. Both worker and client go through here, in process or over ZeroMQ.
(This module was ``transport/session.py``; "session" now means only the worker incarnation a reply names.)
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError

SIGNATURE = b"PWIRE/%d" % m.PROTOCOL_VERSION
SIGNATURE_PREFIX = b"PWIRE/"
MAX_HEADER_BYTES = 1 << 20

Frame = bytes | bytearray | memoryview


Limits = m.Limits  # size limits a peer enforces on what it receives (the worker announces its own in Welcome)
DEFAULT_LIMITS = m.Limits(max_message_bytes=1 << 30, max_plan_bytes=256 << 20, max_frames=4096)


def pack(msg: msgspec.Struct, buffers: Sequence[Frame] = ()) -> list[Frame]:
    """Frames of one message: signature, header, then the raw buffers in order."""
    return [SIGNATURE, m.encoder.encode(msg), *buffers]


def request_id(frames: Sequence[Frame]) -> int:
    """Request id of a message refused before decoding (e.g. too large), or -1 when it cannot be read."""
    if len(frames) < 2 or bytes(frames[0]) != SIGNATURE or len(frames[1]) > MAX_HEADER_BYTES:
        return -1
    return _request_id(bytes(frames[1]))


def _request_id(header: Frame) -> int:
    """Best-effort request id of a header that failed validation (-1 when unreadable)."""
    try:
        rid = msgspec.json.decode(header, type=dict).get("id", -1)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return -1
    # type() rather than isinstance(): JSON true/false decode to bool, which must not be echoed as `re`.
    return rid if type(rid) is int and 0 <= rid < 2**63 else -1


def unpack_request(frames: Sequence[Frame], limits: Limits | None = None) -> tuple[m._Message, list[memoryview]]:
    """Validate and decode a request. ProtocolError(code, message) says what is wrong; ``.re`` is set."""
    limits = limits or DEFAULT_LIMITS
    rid = -1
    try:
        if len(frames) < 2:
            raise ProtocolError(
                "bad_signature", f"a message needs a signature and a header frame, got {len(frames)} frame(s)"
            )
        sig, header = bytes(frames[0]), frames[1]
        if sig != SIGNATURE:
            if sig.startswith(SIGNATURE_PREFIX):
                raise ProtocolError(
                    "bad_version",
                    f"protocol {sig.decode(errors='replace')!r} not supported; "
                    f"this worker speaks {SIGNATURE.decode()!r}",
                )
            raise ProtocolError("bad_signature", f"first frame must be {SIGNATURE!r}, got {sig[:32]!r}")
        if len(header) > MAX_HEADER_BYTES:
            raise ProtocolError("too_large", f"header of {len(header)} bytes, over the limit of {MAX_HEADER_BYTES}")
        if len(frames) - 2 > limits.max_frames:
            rid = _request_id(header)
            raise ProtocolError("too_large", f"{len(frames) - 2} frames, over the limit of {limits.max_frames}")
        try:
            msg = m.request_decoder.decode(header)
        except msgspec.ValidationError as e:
            rid = _request_id(header)  # only for refused headers: a valid one is decoded once
            text = str(e)
            code = (
                "unknown_type" if "`$.type`" in text or "missing required field `type`" in text else "invalid_message"
            )
            raise ProtocolError(code, f"invalid request: {text}") from None
        except msgspec.DecodeError as e:
            raise ProtocolError("bad_header", f"header is not valid JSON: {e}") from None
        except RecursionError:  # valid JSON nested too deeply to decode (no schema allows it)
            rid = _request_id(header)
            raise ProtocolError("invalid_message", "invalid request: JSON nested too deeply") from None
        return msg, [memoryview(f) for f in frames[2:]]
    except ProtocolError as e:
        e.re = rid  # type: ignore[attr-defined]
        raise


_decode_reply = m.reply_decoder.decode


def unpack_reply(frames: Sequence[Frame]) -> tuple[m._Message, list[Frame]]:
    """Decode a reply from a worker; ProtocolError if the worker broke the protocol. The raw frames come
    back as the link delivered them (any buffer: codec.from_frame reads them without a copy)."""
    if len(frames) < 2 or frames[0] != SIGNATURE:  # bytes or 1-D byte memoryviews: compared by content
        raise ProtocolError("bad_signature", "reply does not start with the planwire signature")
    try:
        msg = _decode_reply(frames[1])  # msgspec reads any buffer: no copy
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise ProtocolError("invalid_message", f"invalid reply: {e}") from None
    return msg, frames[2:] if type(frames) is list else list(frames[2:])


def frame_at(buffers: Sequence[Frame], index: int, what: str) -> Frame:
    """The raw frame a header points to; ProtocolError names the field when it is missing."""
    if index >= len(buffers):
        raise ProtocolError(
            "bad_frames", f"{what} points to frame {index}, but the message has {len(buffers)} raw frame(s)"
        )
    return buffers[index]
