"""planwire.flower: planwire training plans as the payload of Flower apps (``pip install planwire[flower]``).

The server wraps any Flower strategy in :class:`PlanStrategy`, which ships the plan's ONNX bytes to each
node once; :func:`plan_client_app` is a ClientApp that trains with that plan in plain onnxruntime (flwr,
onnxruntime and numpy only: no torch); a node whose config names ``planwire-worker`` forwards the plan
to a plan-worker over planwire's protocol instead. ``state_to_arrays``/``arrays_to_state`` convert a
plan's state to and from Flower ``ArrayRecord``s.
"""

from planwire.flower.bridge import bridge_client_app
from planwire.flower.cache import NodePolicy, PlanRefused
from planwire.flower.client import plan_client_app
from planwire.flower.ports import PlanPorts, fingerprint
from planwire.flower.records import arrays_to_state, state_to_arrays
from planwire.flower.runner import PlanRunner
from planwire.flower.server import PlanStrategy

__all__ = [
    "NodePolicy",
    "PlanPorts",
    "PlanRefused",
    "PlanRunner",
    "PlanStrategy",
    "arrays_to_state",
    "bridge_client_app",
    "fingerprint",
    "plan_client_app",
    "state_to_arrays",
]
