"""Generate schemas/: one JSON Schema (2020-12) per message, from the msgspec structs.

``python -m planwire.transport.schemagen [DIR]`` writes them; tests/test_schemas.py fails when the
checked-in files differ from what the code would generate, so schemas/ and the codec cannot drift.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import msgspec

from planwire.transport import messages as m

DIALECT = "https://json-schema.org/draft/2020-12/schema"
BASE_ID = f"https://planwire.dev/schemas/v{m.PROTOCOL_VERSION}/"


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            found.add(ref.removeprefix("#/$defs/"))
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def _clean(node: Any) -> Any:
    """Descriptions as ``inspect.cleandoc`` gives them: msgspec releases dedent docstrings differently, and
    the schema must depend on what the code says, not on which msgspec rendered it."""
    if isinstance(node, dict):
        return {
            k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _clean(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_clean(v) for v in node]
    return node


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two decoded schemas differ in meaning, one line per JSON path (``$defs.Run.properties...``).

    Descriptions are compared after ``inspect.cleandoc`` and with runs of whitespace collapsed, so a
    re-wrapped docstring is not a difference; a changed word, type, bound or field is."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(old.keys() | new.keys()):
            where = f"{path}.{key}" if path else key
            if key not in new:
                out.append(f"{where}: only in the checked-in file")
            elif key not in old:
                out.append(f"{where}: only in what the code generates")
            else:
                out += differences(old[key], new[key], where)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    same_words = isinstance(old, str) and isinstance(new, str) and " ".join(old.split()) == " ".join(new.split())
    if same_words and path.endswith("description"):
        return []
    if old == new and type(old) is type(new):
        return []
    return [f"{path}: checked in {json.dumps(old)[:200]}, generated {json.dumps(new)[:200]}"]


def schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema, for every request and reply type."""
    types = [*m.REQUESTS, *m.REPLIES]
    _, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    components = _clean(components)
    # What msgspec cannot say: a run argument is a reference or an inline tensor, exactly one of them.
    components["Arg"] = {**components["Arg"], "minProperties": 1, "maxProperties": 1}
    out: dict[str, dict[str, Any]] = {}
    for cls in types:
        name = m.type_name(cls)
        root = dict(components[cls.__name__])
        needed: set[str] = set()
        _refs(root, needed)
        while True:  # close over nested references
            more = set(needed)
            for dep in needed:
                _refs(components[dep], more)
            if more == needed:
                break
            needed = more
        direction = "request" if cls in m.REQUESTS else "reply"
        schema: dict[str, Any] = {
            "$schema": DIALECT,
            "$id": BASE_ID + f"{name}.json",
            "title": f"{name} ({direction})",
            **root,
        }
        if needed:
            schema["$defs"] = {d: components[d] for d in sorted(needed)}
        out[f"{name}.json"] = schema
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    target = Path((argv or sys.argv[1:] or ["schemas"])[0])
    target.mkdir(parents=True, exist_ok=True)
    for fname, schema in schemas().items():
        (target / fname).write_text(render(schema))
    print(f"wrote {len(schemas())} schemas to {target}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
