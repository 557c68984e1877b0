"""Content-keyed cache of exported plan bytes: in memory, plus an optional directory on disk.

Rebuilding an unchanged plan (same code, state values, signature and library versions) reads the bytes
back instead of exporting again. The directory comes from ``PLANWIRE_CACHE_DIR`` (read at each use;
empty disables the disk cache), default ``~/.cache/planwire``. Entries are only an accelerator: every
build verifies what it got against eager torch, and a stale entry is dropped and re-exported.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_DIR = "PLANWIRE_CACHE_DIR"
MEMORY_ENTRIES = 128


@dataclass
class CacheStats:
    """How builds were served since the process started (or :func:`clear_cache`)."""

    exports: int = 0  # real torch.onnx.export calls
    memory_hits: int = 0
    disk_hits: int = 0


stats = CacheStats()
_memory: OrderedDict[str, bytes] = OrderedDict()
_lock = threading.Lock()


def cache_dir() -> Path | None:
    """The on-disk cache directory, or None when disabled (``PLANWIRE_CACHE_DIR=""``)."""
    value = os.environ.get(ENV_DIR)
    if value is None:
        return Path.home() / ".cache" / "planwire"
    return Path(value).expanduser() if value else None


def make_key(*parts: Any) -> str:
    """A sha256 over JSON-serializable parts (order matters)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def get(key: str) -> bytes | None:
    """Cached bytes for ``key`` from memory, then disk; counts the hit."""
    with _lock:
        data = _memory.get(key)
        if data is not None:
            _memory.move_to_end(key)
            stats.memory_hits += 1
            return data
    directory = cache_dir()
    if directory is None:
        return None
    try:
        data = (directory / f"{key}.onnx").read_bytes()
    except OSError:
        return None
    with _lock:
        stats.disk_hits += 1
        _remember(key, data)
    return data


def put(key: str, data: bytes) -> None:
    """Store freshly exported bytes in memory and (best effort, atomically) on disk."""
    with _lock:
        _remember(key, data)
    directory = cache_dir()
    if directory is None:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    except OSError:  # read-only home: the cache is optional
        return
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, directory / f"{key}.onnx")
    except OSError:  # full disk
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def keys() -> list[str]:
    """The keys held in memory, least recently used first (for tests and diagnostics)."""
    with _lock:
        return list(_memory)


def discard(key: str) -> None:
    """Forget an entry that turned out stale."""
    with _lock:
        _memory.pop(key, None)
    directory = cache_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            (directory / f"{key}.onnx").unlink()


def clear_cache(*, disk: bool = False) -> None:
    """Empty the in-memory cache and reset :data:`stats`; with ``disk`` also delete the cache files."""
    with _lock:
        _memory.clear()
        stats.exports = stats.memory_hits = stats.disk_hits = 0
    directory = cache_dir()
    if disk and directory is not None and directory.is_dir():
        for path in directory.glob("*.onnx"):
            with contextlib.suppress(OSError):
                path.unlink()


def _remember(key: str, data: bytes) -> None:
    _memory[key] = data
    _memory.move_to_end(key)
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)
