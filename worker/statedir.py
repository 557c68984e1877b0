"""The state directory of ``plan-worker --state-dir DIR`` (worker/state.py wires it into the worker): holding
it, and writing and reading its records (their format: worker/statefiles.py; how a write is made durable,
alone or in a group commit: worker/statecommit.py). The order of durability inside a group is not promised,
except that the ``privacy`` file is committed at once (with whatever the group held) before a released
value is written.

The directory is read as hostile at start: every file is validated (its magic, its header against its
schema, sizes, where it lies, a plan's hash and the plan checks of transport/plancheck.py), and one that
fails is skipped with a log line naming it: never loaded, never fatal.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from planwire.transport.errors import ProtocolError
from planwire.transport.plancheck import PlanRejected, check_model
from planwire.transport.spec import plan_id
from planwire.worker.runtime import Signature
from planwire.worker.statecommit import EXIT_NOT_DURABLE, Writes, refusal
from planwire.worker.statefiles import (
    ALIGN,
    FORMAT,
    SESSION_RE,
    HoldersRecord,
    KeptRelease,
    Names,
    OwnersRecord,
    Part,
    PlanHeader,
    PortRecord,
    PrivacyRecord,
    ReleaseRecord,
    SessionRecord,
    TensorHeader,
    digest,
    framed,
    read_framed,
    read_tensor,
    write_atomic,
)
from planwire.worker.store import ClientId

log = logging.getLogger("planwire.worker")

__all__ = ["EXIT_NOT_DURABLE", "Restored", "StateDir", "StateError"]

DISK_RESERVE = 64 << 20  # bytes a put or run must leave free on the state directory's file system


class StateError(Exception):
    """The state directory cannot be used (another worker holds it, not a directory, not writable)."""


# -- the directory ----------------------------------------------------------------------------------------


@dataclass
class Restored:
    """What a start found in the directory."""

    session: str
    tensors: int = 0
    tensor_bytes: int = 0
    failed: int = 0
    releases: int = 0  # private results restored with their pending release
    budgets: int = 0  # clients whose spent privacy budget was restored
    plans: int = 0
    owners: int = 0
    identities: int = 0
    skipped: int = 0
    new: bool = False


class StateDir:
    """One worker's state directory: held (flock) from :meth:`open` to :meth:`close`."""

    def __init__(self, path: Path, lock_fd: int, sync: bool = True) -> None:
        self.path = path
        self.sync = sync  # fsync each change (power-loss safe); without: safe against the worker's crash only
        self.writes = Writes(path, sync)
        self._lock_fd = lock_fd
        self.tensors = path / "tensors"
        self.plans = path / "plans"
        self.names = Names()
        self.skipped: list[str] = []

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

    def _skip(self, path: Path, why: str) -> None:
        self.skipped.append(str(path))
        log.error("--state-dir: skipped %s: %s", path, why)

    # -- session and identities ------------------------------------------------------------------------

    def load_session(self, fresh: str) -> tuple[str, bool]:
        """The kept session, or ``fresh`` (then written) when there is none; (session, new)."""
        path = self.path / "session"
        if path.exists():
            try:
                s = msgspec.json.decode(path.read_bytes(), type=SessionRecord)
                if s.format != FORMAT or not SESSION_RE.fullmatch(s.session):
                    raise ValueError(f"format {s.format}, session {s.session[:40]!r}")
                return s.session, False
            except (OSError, ValueError, msgspec.DecodeError) as e:
                self._skip(path, f"{e}; a new session starts (clients will register their plans again)")
        write_atomic(path, [msgspec.json.encode(SessionRecord(format=FORMAT, session=fresh))], self.sync)
        return fresh, True

    def load_tokens(self) -> dict[str, ClientId]:
        path = self.path / "owners"
        if not path.exists():
            return {}
        try:
            o = msgspec.json.decode(path.read_bytes(), type=OwnersRecord)
            if o.format != FORMAT:
                raise ValueError(f"format {o.format}")
        except (OSError, ValueError, msgspec.DecodeError) as e:
            self._skip(path, f"{e}; clients get new identities at their next hello")
            return {}
        return {token: self.names.owner(name) for token, name in o.tokens.items()}

    def save_tokens(self, tokens: dict[str, ClientId]) -> None:
        doc = OwnersRecord(format=FORMAT, tokens={t: self.names.name(o) for t, o in tokens.items()})
        self._write(self.path / "owners", [msgspec.json.encode(doc)], "client identities")

    # -- tensors ---------------------------------------------------------------------------------------

    def _owner_dir(self, owner: ClientId) -> Path:
        return self.tensors / digest(self.names.name(owner))

    def _tensor_path(self, owner: ClientId, key: str) -> Path:
        return self._owner_dir(owner) / f"{digest(key)}.t"

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

    def load_tensors(self) -> Iterable[tuple[ClientId, str, TensorHeader, np.ndarray | None, KeptRelease | None]]:
        """Every valid tensor file: (owner, key, header, array or None for a failed run's record, its pending
        release if any)."""
        for d in sorted(self.tensors.iterdir()):
            if not d.is_dir() or d.is_symlink():
                self._skip(d, "not a directory of tensors")
                continue
            for path in sorted(d.iterdir()):
                if path.name.startswith(".tmp-"):
                    self._unfinished(path)  # a write that a crash interrupted: never acknowledged
                    continue
                try:
                    item = read_tensor(d, path, self.names)
                except (OSError, ValueError, msgspec.DecodeError) as e:
                    self._skip(path, str(e))
                    continue
                yield item

    # -- privacy accounting ----------------------------------------------------------------------------

    def load_spent(self) -> dict[ClientId, dict[float, int]]:
        """The noised releases each owner was given: owner -> {noise multiplier: count} (``privacy``);
        ValueError (logged) when the file is damaged."""
        path = self.path / "privacy"
        if not path.exists():
            return {}
        try:
            doc = msgspec.json.decode(path.read_bytes(), type=PrivacyRecord)
            if doc.format != FORMAT:
                raise ValueError(f"format {doc.format}")
        except (OSError, ValueError, msgspec.DecodeError) as e:  # never ignored: budgets would start at 0
            self._skip(path, f"{e}; noised releases are refused until it is repaired (or removed, which resets "
                       "every client's spent privacy budget)")  # fmt: skip
            raise ValueError(f"the record of the privacy budget spent ({path}) is damaged: {e}") from None
        out: dict[ClientId, dict[float, int]] = {}
        for name, events in doc.spent.items():
            counts = out.setdefault(self.names.owner(name), {})
            for noise, count in events:
                counts[noise] = counts.get(noise, 0) + count
        return out

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

    def _unfinished(self, path: Path) -> None:
        """Remove a write's temporary file; anything else under that name (a directory) is skipped, not fatal."""
        if path.is_dir() and not path.is_symlink():
            self._skip(path, "a directory where only a write's temporary file belongs")
        else:
            path.unlink(missing_ok=True)

    def load_plans(self, max_plan_bytes: int) -> Iterable[tuple[str, str, bytes, Signature, frozenset, list[ClientId]]]:
        """Every valid plan: (pid, name, bytes, ports, ports of unknown rank, holders)."""
        for path in sorted(self.plans.iterdir()):
            if path.name.startswith(".tmp-"):
                self._unfinished(path)
                continue
            if path.suffix == ".holders":
                if not path.with_suffix(".plan").exists():
                    self._skip(path, "no plan file beside it")
                continue
            if path.suffix != ".plan":
                self._skip(path, "not a plan file")
                continue
            holders_path = path.with_suffix(".holders")
            if not holders_path.exists():  # a registration a crash interrupted: never acknowledged
                log.info("--state-dir: removing %s (its registration did not finish)", path)
                path.unlink(missing_ok=True)
                continue
            try:
                yield self._load_plan(path, holders_path, max_plan_bytes)
            except (OSError, ValueError, msgspec.DecodeError, PlanRejected, ProtocolError) as e:
                self._skip(path, str(e))

    def _load_plan(
        self, path: Path, holders_path: Path, max_plan_bytes: int
    ) -> tuple[str, str, bytes, Signature, frozenset, list[ClientId]]:
        if path.is_symlink() or not path.is_file():
            raise ValueError("not a regular file")
        header_bytes, f, size = read_framed(path)
        with f:
            if size > max_plan_bytes:
                raise ValueError(f"a plan of {size} bytes, over --max-plan-mb")
            h = msgspec.json.decode(header_bytes, type=PlanHeader)
            data = f.read(size)
        pid = plan_id(data)
        if pid != h.plan or path.stem != pid:
            raise ValueError("its bytes do not match its plan id (corrupt, or not this plan's file)")
        summary = check_model(data, max_bytes=max_plan_bytes)
        ports = Signature(
            h.name, [(p.name, p.dtype, p.shape) for p in h.inputs], [(p.name, p.dtype, p.shape) for p in h.outputs]
        )
        holders = msgspec.json.decode(holders_path.read_bytes(), type=HoldersRecord)
        if holders.format != FORMAT:
            raise ValueError(f"{holders_path.name}: format {holders.format}")
        return pid, h.name, data, ports, summary.unknown_rank, [self.names.owner(n) for n in holders.holders]
