"""Build: plan build time vs plain torch.onnx.export(dynamo=True); filled in once the exporter exists."""

from __future__ import annotations

from bench.env import Env
from bench.timing import Report

FAMILY = "build"


def run(env: Env, report: Report, quick: bool) -> None:
    report.skipped[FAMILY] = "exporter not available yet"
