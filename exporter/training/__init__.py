"""Training steps and gradient functions as plain ONNX graphs (forward, loss, backward, update).

* :func:`build_training_step`: a model + loss + optimizer -> one ONNX graph taking the batch,
  hyper-parameters and state, returning loss, metrics and the updated state (see :mod:`.step`).
* :func:`build_function_step`: any function of tensors, ``torch.func.grad`` inside included, -> an
  ONNX graph (what ``func2plan`` uses for functions that take gradients; see :mod:`.function`).
* :func:`training_decompositions`: the aten decompositions that make backward ops exportable
  (:mod:`.decompositions` holds the table; :mod:`.conv_backward`, :mod:`.pool_backward` and
  :mod:`.batch_norm` the functions for convolutions, pooling and batch norm).

Inside: :mod:`.trace` traces (with :mod:`.functionals` swapped and :mod:`.attribution` tagging layers),
:mod:`.graph_export` exports through the one build driver (:mod:`planwire.exporter.build`).
"""

from planwire.exporter.errors import TrainingExportError
from planwire.exporter.training.decompositions import training_decompositions
from planwire.exporter.training.function import FunctionStep, build_function_step
from planwire.exporter.training.losses import loss_kind
from planwire.exporter.training.result import TrainingStep
from planwire.exporter.training.step import build_training_step

__all__ = [
    "FunctionStep",
    "TrainingExportError",
    "TrainingStep",
    "build_function_step",
    "build_training_step",
    "loss_kind",
    "training_decompositions",
]
