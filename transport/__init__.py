"""planwire.transport: the wire protocol over ZeroMQ (pyzmq, msgspec and numpy only, never torch)."""

from planwire.transport.client import Client
from planwire.transport.errors import (
    ForbiddenError,
    PrivateDataError,
    ProtocolError,
    RemoteError,
    RemoteTimeoutError,
    UnknownTensorError,
)
from planwire.transport.messages import PROTOCOL_VERSION
from planwire.transport.pointers import PointerPlan, PointerTensor
from planwire.transport.remote import RemoteWorker, connect
from planwire.transport.spec import PlanSource, PlanVariant, TensorSpec

__all__ = [
    "PROTOCOL_VERSION",
    "Client",
    "ForbiddenError",
    "PrivateDataError",
    "PlanSource",
    "PlanVariant",
    "PointerPlan",
    "PointerTensor",
    "ProtocolError",
    "RemoteError",
    "RemoteTimeoutError",
    "RemoteWorker",
    "TensorSpec",
    "UnknownTensorError",
    "connect",
]
