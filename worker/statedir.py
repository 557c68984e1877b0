"""The state directory of ``plan-worker --state-dir DIR`` (worker/state.py wires it into the worker): holding
it, and writing its records (their format: worker/statefiles.py; how a write is made durable, alone or in a
group commit: worker/statecommit.py; reading them back at start, as hostile input: worker/stateread.py). The
order of durability inside a group is not promised, except that the ``privacy`` file is committed at once
(with whatever the group held) before a released value is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from planwire.transport.errors import ProtocolError
from planwire.worker.runtime import Signature
from planwire.worker.statecommit import EXIT_NOT_DURABLE, Writes, refusal
from planwire.worker.statefiles import (
    ALIGN,
    FORMAT,
    HoldersRecord,
    KeptRelease,
    OwnersRecord,
    Part,
    PlanHeader,
    PortRecord,
    PrivacyRecord,
    ReleaseRecord,
    TensorHeader,
    digest,
    framed,
)
from planwire.worker.stateread import Restored, StateReader
from planwire.worker.store import ClientId

log = logging.getLogger("planwire.worker")

__all__ = ["EXIT_NOT_DURABLE", "Restored", "StateDir", "StateError"]

DISK_RESERVE = 64 << 20  # bytes a put or run must leave free on the state directory's file system


class StateError(Exception):
    """The state directory cannot be used (another worker holds it, not a directory, not writable)."""


class StateDir(StateReader):
    """One worker's state directory: held (flock) from :meth:`open` to :meth:`close`; read back at start
    through the :class:`StateReader` it is, kept up to date through :meth:`save_tensor` and the others."""

    def __init__(self, path: Path, lock_fd: int, sync: bool = True) -> None:
        super().__init__(path, sync)
        self.writes = Writes(path, sync)
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, sync: bool = True) -> StateDir:
        """Create (mode 0700) or open ``path`` and take its lock; StateError naming the problem otherwise.
        ``sync=False`` (``--state-sync none``): no fsyncs, for a worker whose machine is not at risk."""
        p = Path(path).absolute()
        try:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not p.is_dir():
                raise StateError(f"--state-dir {str(p)!r} is not a directory")
            fd = os.open(p / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise StateError(f"--state-dir {str(p)!r} exists and is not a directory") from None
        except OSError as e:
            raise StateError(f"--state-dir {str(p)!r}: cannot use it ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise StateError(
                f"--state-dir {str(p)!r} is in use by another plan-worker (pid {holder}): stop it, or give this "
                "worker a directory of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for d in ("tensors", "plans"):
            with contextlib.suppress(FileExistsError):
                (p / d).mkdir(mode=0o700)
        if p.stat().st_mode & 0o077:
            log.warning("--state-dir %s is readable by others: it holds client data and identities (chmod 700)", p)
        return cls(p, fd, sync)

    # -- group commit (worker/statecommit.py) ----------------------------------------------------------

    def group(self) -> None:
        """Writes are staged until :meth:`commit` from now on (see :meth:`Writes.group`)."""
        self.writes.group()

    @property
    def grouped(self) -> bool:
        return self.writes.grouped

    @property
    def dirty(self) -> bool:
        """Whether a change waits for :meth:`commit`."""
        return self.writes.dirty

    def commit(self) -> None:
        """Every staged change made durable, or the worker exits (see :meth:`Writes.commit`)."""
        self.writes.commit()

    def close(self) -> None:
        self.writes.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    def _write(self, path: Path, parts: Sequence[Any], what: str) -> None:
        self.writes.write(path, parts, what)

    # -- session and identities ------------------------------------------------------------------------

    def save_tokens(self, tokens: dict[str, ClientId]) -> None:
        doc = OwnersRecord(format=FORMAT, tokens={t: self.names.name(o) for t, o in tokens.items()})
        self._write(self.path / "owners", [msgspec.json.encode(doc)], "client identities")

    # -- tensors ---------------------------------------------------------------------------------------

    def save_tensor(
        self,
        owner: ClientId,
        key: str,
        array: np.ndarray,
        tags: Sequence[str],
        private: bool,
        rows: int,
        release: KeptRelease | None = None,
    ) -> None:
        from planwire.transport import codec

        wire, shape, buf = codec.to_frame(array)
        header = TensorHeader(
            owner=self.names.name(owner), key=key, dtype=wire, shape=shape, tags=list(tags), private=private, rows=rows
        )
        payload: list[Any] = [buf]
        if release is not None:
            rec = ReleaseRecord(release.plan, release.output, release.how, release.rows, release.param)  # type: ignore[arg-type]
            for name in ("base", "released"):
                extra = getattr(release, name)
                if extra is None:
                    continue
                wire, shape, extra_buf = codec.to_frame(extra)
                setattr(rec, name, Part(wire, shape))
                payload += [bytes(-sum(memoryview(b).nbytes for b in payload) % ALIGN), extra_buf]
            header.release = rec
        self._save_tensor(owner, key, header, *payload)

    def save_failure(self, owner: ClientId, key: str, why: str) -> None:
        self._save_tensor(owner, key, TensorHeader(owner=self.names.name(owner), key=key, failed=why), b"")

    def _save_tensor(self, owner: ClientId, key: str, header: TensorHeader, *payload: Any) -> None:
        d = self._owner_dir(owner)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise refusal(f"tensor {key!r}", self.path, e) from None
        else:
            self.writes.dir_changed(self.tensors)
        self._write(d / f"{digest(key)}.t", [*framed(msgspec.json.encode(header)), *payload], f"tensor {key!r}")

    def remove_tensors(self, owner: ClientId, keys: Iterable[str]) -> None:
        d = self._owner_dir(owner)
        removed = False
        for key in keys:
            path = d / f"{digest(key)}.t"
            self.writes.unstage(path)
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
            except OSError as e:  # it would come back after a restart; the request itself went through
                log.error("--state-dir: cannot remove tensor %r's file: %s", key, e)
        if removed:
            self.writes.dir_changed(d)

    def remove_owner(self, owner: ClientId) -> None:
        d = self._owner_dir(owner)
        for path in self.writes.staged_in(d):
            self.writes.unstage(path)
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            self.writes.dir_gone(d)
            self.writes.dir_changed(self.tensors)

    def check_room(self, nbytes: int, what: str) -> None:
        """quota_exceeded when the file system of the directory cannot take ``nbytes`` more (and a reserve)."""
        if nbytes <= 0:
            return
        try:
            st = os.statvfs(self.path)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if nbytes + DISK_RESERVE > free:
            raise ProtocolError(
                "quota_exceeded",
                f"{what} needs {nbytes >> 20} MiB on disk, but the worker's --state-dir has {free >> 20} MiB free "
                f"(less a reserve of {DISK_RESERVE >> 20} MiB): get or delete tensors first, or give the worker "
                "more room",
            )

    # -- privacy accounting ----------------------------------------------------------------------------

    def save_spent(self, spent: dict[ClientId, dict[float, int]]) -> None:
        doc = PrivacyRecord(
            format=FORMAT,
            spent={self.names.name(o): sorted(c.items()) for o, c in spent.items() if c},
        )
        self._write(self.path / "privacy", [msgspec.json.encode(doc)], "the privacy budget spent")
        if self.grouped:  # durable before the released value is even written (which a group may stage)
            self.commit()

    # -- plans -----------------------------------------------------------------------------------------

    def save_plan(self, pid: str, name: str, data: bytes, ports: Signature) -> None:
        header = PlanHeader(
            plan=pid,
            name=name,
            inputs=[PortRecord(n, t, list(s)) for n, t, s in ports.inputs],
            outputs=[PortRecord(n, t, list(s)) for n, t, s in ports.outputs],
        )
        self._write(self.plans / f"{pid}.plan", [*framed(msgspec.json.encode(header)), data], f"plan {name!r}")

    def save_holders(self, pid: str, holders: Iterable[ClientId]) -> None:
        doc = HoldersRecord(format=FORMAT, holders=sorted(self.names.name(o) for o in holders))
        self._write(self.plans / f"{pid}.holders", [msgspec.json.encode(doc)], f"plan {pid[:12]}'s holders")

    def remove_plan(self, pid: str) -> None:
        for suffix in (".holders", ".plan"):  # holders first: a plan file alone is an unfinished registration
            self.writes.unstage(self.plans / f"{pid}{suffix}")
            with contextlib.suppress(FileNotFoundError):
                (self.plans / f"{pid}{suffix}").unlink()
        self.writes.dir_changed(self.plans)
