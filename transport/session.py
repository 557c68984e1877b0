"""The framing module's old name: see :mod:`planwire.transport.framing` (kept so old imports work)."""

from planwire.transport.framing import (
    DEFAULT_LIMITS,
    MAX_HEADER_BYTES,
    SIGNATURE,
    SIGNATURE_PREFIX,
    Frame,
    Limits,
    frame_at,
    pack,
    request_id,
    unpack_reply,
    unpack_request,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_HEADER_BYTES",
    "SIGNATURE",
    "SIGNATURE_PREFIX",
    "Frame",
    "Limits",
    "frame_at",
    "pack",
    "request_id",
    "unpack_reply",
    "unpack_request",
]
