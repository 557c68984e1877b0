"""Writes to a state directory (worker/statedir.py), one at a time or as a group commit.

Every change is written whole under a temporary name (``.tmp-NAME`` beside it), fsynced, renamed over the
old file, and its directory fsynced (``--state-sync none``: no fsyncs): a crash leaves the old file or the
new one, never half of one. Grouped (:meth:`Writes.group`, under the supervisor), the temporary files of a
burst of requests are written, then fsynced together (concurrently), renamed, and each changed directory
fsynced once, before any of the burst's replies is sent (worker/state.py's ReplyGate).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planwire.transport.errors import ProtocolError
from planwire.worker.statefiles import fsync_dir, write_atomic, write_temp

log = logging.getLogger("planwire.worker")

EXIT_NOT_DURABLE = 75  # the worker's exit status when a group commit's fsync fails (EX_TEMPFAIL)


class Writes:
    """The writes to the state directory at ``root``: atomic each, or staged until :meth:`commit`."""

    def __init__(self, root: Path, sync: bool = True) -> None:
        self.root = root
        self.sync = sync  # fsync each change (power-loss safe); without: safe against the worker's crash only
        self.grouped = False  # group commit (see group()): writes are staged until commit()
        self._staged: dict[Path, tuple[Path, int]] = {}  # path -> its written, not yet synced temporary file
        self._dirs: set[Path] = set()  # directories changed since the last commit
        self._pool: Any = None  # threads for concurrent fsyncs (the file system's journal batches them)

    def write(self, path: Path, parts: Sequence[Any], what: str) -> None:
        """``parts`` as the whole of ``path``; a ProtocolError naming ``what`` when it cannot be written."""
        try:
            if self.grouped:
                self.unstage(path)
                self._staged[path] = write_temp(path, parts)
            else:
                write_atomic(path, parts, self.sync)
        except OSError as e:
            raise refusal(what, self.root, e) from None

    def dir_changed(self, path: Path) -> None:
        """An entry of directory ``path`` was created or removed: fsync it (now, or with the group)."""
        if self.grouped:
            self._dirs.add(path)
        elif self.sync:
            fsync_dir(path)

    def dir_gone(self, path: Path) -> None:
        """Directory ``path`` was removed whole: nothing left in it to fsync (its parent's change is recorded
        with :meth:`dir_changed`)."""
        self._dirs.discard(path)

    def staged_in(self, d: Path) -> list[Path]:
        """The paths in directory ``d`` whose writes wait for the commit."""
        return [p for p in self._staged if p.parent == d]

    def group(self) -> None:
        """Group commit, for a loop that holds its replies while :attr:`dirty` and calls :meth:`commit`
        before it sends them (worker/state.py's ReplyGate): from now on a write leaves its temporary file
        unsynced and unrenamed, a removal its directory unsynced, until the next commit. Without fsyncs
        (``--state-sync none``) there is nothing to group: writes go on as before."""
        self.grouped = self.sync

    @property
    def dirty(self) -> bool:
        """Whether a change waits for :meth:`commit`."""
        return bool(self._staged or self._dirs)

    def commit(self) -> None:
        """Make every staged change durable, in one round: fsync every staged file (concurrently, so that
        the file system's journal commits them together), rename each over its name, fsync each changed
        directory once. When that fails (EIO: the kernel may have dropped the pages it could not write) the
        worker exits at once, as PostgreSQL does on a failed fsync: no reply may acknowledge what is not
        kept, and a restart reads back what was acknowledged before."""
        try:
            self._commit()
        except OSError as e:
            log.critical("--state-dir %s: cannot make changes durable (%s): the worker stops now", self.root, e)
            os._exit(EXIT_NOT_DURABLE)

    def _commit(self) -> None:
        staged, self._staged = self._staged, {}
        dirs, self._dirs = self._dirs, set()
        try:
            self._each(os.fsync, [fd for _, fd in staged.values()])
        finally:
            for _, fd in staged.values():
                os.close(fd)
        for path, (tmp, _) in staged.items():
            os.replace(tmp, path)
            dirs.add(path.parent)
        self._each(fsync_dir, list(dirs))

    def _each(self, fn: Any, items: list) -> None:
        if len(items) <= 1:
            for item in items:
                fn(item)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(16, thread_name_prefix="state-fsync")
        for _ in self._pool.map(fn, items):  # raises the first error
            pass

    def unstage(self, path: Path) -> None:
        """Forget a staged write of ``path`` (it is being replaced or removed)."""
        staged = self._staged.pop(path, None)
        if staged is not None:
            os.close(staged[1])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged[0])

    def close(self) -> None:
        if self.dirty:  # what no reply acknowledged yet: kept if it can be, as a crash could have kept it
            try:
                self._commit()
            except OSError as e:
                log.error("--state-dir: changes not acknowledged yet could not be written: %s", e)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def refusal(what: str, path: Path, e: OSError) -> ProtocolError:
    """The error of a request whose effect could not be made durable (nothing of it was kept in memory)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ProtocolError(
            "quota_exceeded", f"{what} not kept: the worker's --state-dir {path} is full ({e.strerror})"
        )
    log.error("--state-dir %s: cannot write %s: %s", path, what, e)
    return ProtocolError("internal", f"{what} not kept: the worker cannot write its --state-dir ({e.strerror or e})")
