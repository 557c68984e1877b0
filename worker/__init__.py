"""planwire.worker: stores tensors and runs plans in onnxruntime (never imports torch)."""

from planwire.worker.service import Service
from planwire.worker.virtual import VirtualWorker

__all__ = ["Service", "VirtualWorker"]
