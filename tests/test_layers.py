"""The dependency rule, checked: every module's imports (including those inside functions) are read with
``ast`` and each edge is held against the layers the README's architecture section names.

    exporter  ->  transport  <-  worker          torch only in exporter/; zmq never in the contract layer

The contract layer (messages, framing, codec, dtypes, errors, specs, the plan checker, onnxruntime session
options) is below both sides and imports neither the wire (zmq) nor any side."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "exporter": "planwire.exporter",
    "transport": "planwire.transport",
    "worker": "planwire.worker",
    "flower": "planwire.flower",
}
THIRD_PARTY_TORCH = ("torch", "onnxscript")
ZMQ = ("zmq",)


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    out["planwire"] = ROOT / "planwire" / "__init__.py"
    return out


def imports_of(path: Path, module: str) -> set[str]:
    """Absolute names imported anywhere in the file (relative imports resolved against ``module``)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
    return found


def starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# The contract layer: imported by both sides, imports neither side nor zmq.
CONTRACT = tuple(
    f"planwire.transport.{m}"
    for m in (
        "messages",
        "framing",
        "codec",
        "dtypes",
        "errors",
        "spec",
        "schemagen",
        "onnxproto",
        "plansize",
        "plandomains",
        "plancheck",
        "ortoptions",
        "protowire",
        "dataflow",
        "estimate",
        "graph",
        "dims",
        "shapes",
        "review",
    )
)


def forbidden(importer: str, imported: str) -> str | None:
    """Why the edge importer -> imported breaks the rule, or None when it is allowed."""
    if starts(imported, THIRD_PARTY_TORCH) and not starts(importer, ("planwire.exporter",)):
        return "torch is imported only in exporter/"
    if starts(importer, ("planwire.exporter",)) and starts(imported, ("planwire.worker",)):
        return "the exporter never imports the worker (share it through the contract layer in transport/)"
    if starts(importer, ("planwire.worker",)) and starts(imported, ("planwire.exporter",)):
        return "the worker never imports the exporter"
    if starts(importer, ("planwire.transport",)) and starts(
        imported, ("planwire.exporter", "planwire.worker", "planwire.flower")
    ):
        return "transport/ is below both sides and imports neither"
    if starts(importer, ("planwire.flower",)) and starts(imported, ("planwire.exporter",)):
        return "a Flower node runs plans without torch: planwire.flower never imports the exporter"
    if starts(importer, CONTRACT) and starts(imported, ZMQ):
        return "the contract layer moves no frames: zmq belongs to sockets/server/client modules"
    return None


def test_the_walker_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import torch\ndef f():\n    from planwire.worker import runtime\nfrom .errors import E\n")
    found = imports_of(src, "planwire.transport.x")
    assert {"torch", "planwire.worker", "planwire.worker.runtime", "planwire.transport.errors"} <= found
    assert forbidden("planwire.transport.x", "planwire.worker.runtime")
    assert forbidden("planwire.worker.cli", "torch")
    assert forbidden("planwire.transport.codec", "zmq")
    assert forbidden("planwire.exporter.plan", "torch") is None
    assert forbidden("planwire.worker.service", "planwire.transport.codec") is None


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_follow_the_dependency_rule(module):
    path = modules()[module]
    broken = sorted(
        {f"{imported}: {why}" for imported in imports_of(path, module) if (why := forbidden(module, imported))}
    )
    assert not broken, f"{path.relative_to(ROOT)} imports " + "; ".join(broken)
