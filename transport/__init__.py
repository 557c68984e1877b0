"""planwire.transport: the wire protocol over ZeroMQ (pyzmq, msgspec and numpy only, never torch)."""

from planwire.transport.bound import BoundPlan, BoundPointer
from planwire.transport.client import Client, WorkerClient
from planwire.transport.connection import Connection
from planwire.transport.errors import (
    CurveRefused,
    ForbiddenError,
    NothingFound,
    NoWorkerListening,
    PrivateDataError,
    ProtocolError,
    RemoteError,
    RemoteTimeoutError,
    UnknownTensorError,
    WorkerLost,
)
from planwire.transport.messages import PROTOCOL_VERSION
from planwire.transport.pointers import PointerPlan, PointerTensor, SearchResult
from planwire.transport.remote import RemoteWorker, connect
from planwire.transport.spec import PlanSource, PlanVariant, TensorSpec

__all__ = [
    "PROTOCOL_VERSION",
    "BoundPlan",
    "BoundPointer",
    "Client",
    "Connection",
    "CurveRefused",
    "ForbiddenError",
    "NoWorkerListening",
    "NothingFound",
    "PrivateDataError",
    "PlanSource",
    "PlanVariant",
    "PointerPlan",
    "PointerTensor",
    "ProtocolError",
    "RemoteError",
    "RemoteTimeoutError",
    "RemoteWorker",
    "SearchResult",
    "TensorSpec",
    "UnknownTensorError",
    "WorkerClient",
    "WorkerLost",
    "connect",
]
