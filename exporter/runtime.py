"""Running plan bytes locally in onnxruntime (the same engine a worker uses)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from planwire.transport.ortoptions import session_options
from planwire.transport.spec import PlanVariant

LOCAL_THREADS = min(4, os.cpu_count() or 1)


def make_session(data: bytes) -> ort.InferenceSession:
    """A CPU session for plan bytes (created once per variant and reused)."""
    return ort.InferenceSession(data, session_options(LOCAL_THREADS), providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, variant: PlanVariant, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Outputs of one run; ``arrays`` must already fit ``variant`` (see PlanVariant.mismatch)."""
    feeds = {spec.name: arr for spec, arr in zip(variant.inputs, arrays, strict=True)}
    return session.run([o.name for o in variant.outputs], feeds)
