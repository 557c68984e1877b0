"""The one set of onnxruntime session options, shared by the worker (runs) and the exporter (verify, local
runs): few threads, no spinning, sequential execution, the ONNX protobuf loader only, no custom op libraries,
no files written. Contract layer: imports onnxruntime, never zmq or a side."""

from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int, *, arena: bool = True) -> ort.SessionOptions:
    """Options for shared hosts: few threads, no spinning, sequential execution, no custom op libraries.
    ``arena=False``: no CPU memory arena, so memory a big run took goes back when it ends (an arena keeps
    it: measured 800 MB held after one run with a 400 MB intermediate)."""
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_profiling = False  # no files written
    so.optimized_model_filepath = ""
    so.add_session_config_entry("session.load_model_format", "ONNX")  # never the unchecked ORT format
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so
