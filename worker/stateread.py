"""Reading a plan-worker state directory back at start (worker/statedir.py holds and writes it; its format is
worker/statefiles.py), as hostile input: every file is validated (its magic, its header against its schema,
sizes, where it lies, a plan's hash and the plan checks of transport/plancheck.py), and one that fails is
skipped with a log line naming it: never loaded, never fatal. A write a crash interrupted (a temporary file,
a plan without its holders) was never acknowledged: it is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec
import numpy as np

from planwire.transport.errors import ProtocolError
from planwire.transport.plancheck import PlanRejected, check_model
from planwire.transport.spec import plan_id
from planwire.worker.runtime import Signature
from planwire.worker.statefiles import (
    FORMAT,
    SESSION_RE,
    HoldersRecord,
    KeptRelease,
    Names,
    OwnersRecord,
    PlanHeader,
    PrivacyRecord,
    SessionRecord,
    TensorHeader,
    digest,
    read_framed,
    read_tensor,
    write_atomic,
)
from planwire.worker.store import ClientId

log = logging.getLogger("planwire.worker")
R = TypeVar("R", SessionRecord, OwnersRecord, PrivacyRecord, HoldersRecord)  # the JSON records, each with a format

__all__ = ["Restored", "StateReader"]


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


class StateReader:
    """The directory at ``path``, its layout and its records read back; ``skipped`` lists the files refused."""

    def __init__(self, path: Path, sync: bool = True) -> None:
        self.path = path
        self.sync = sync  # fsync each change (power-loss safe); without: safe against the worker's crash only
        self.tensors = path / "tensors"
        self.plans = path / "plans"
        self.names = Names()
        self.skipped: list[str] = []

    def skip(self, path: Path, why: str) -> None:
        """Refuse ``path`` (never loaded, never fatal): logged with ``why`` and counted in ``skipped``."""
        self.skipped.append(str(path))
        log.error("--state-dir: skipped %s: %s", path, why)

    def _owner_dir(self, owner: ClientId) -> Path:
        return self.tensors / digest(self.names.name(owner))

    def tensor_path(self, owner: ClientId, key: str) -> Path:
        return self._owner_dir(owner) / f"{digest(key)}.t"

    def load_session(self, fresh: str) -> tuple[str, bool]:
        """The kept session, or ``fresh`` (then written) when there is none; (session, new)."""
        path = self.path / "session"
        if path.exists():
            try:
                s = _record(path, SessionRecord)
                if not SESSION_RE.fullmatch(s.session):
                    raise ValueError(f"session {s.session[:40]!r}")
                return s.session, False
            except (OSError, ValueError, msgspec.DecodeError) as e:
                self.skip(path, f"{e}; a new session starts (clients will register their plans again)")
        write_atomic(path, [msgspec.json.encode(SessionRecord(format=FORMAT, session=fresh))], self.sync)
        return fresh, True

    def load_tokens(self) -> dict[str, ClientId]:
        path = self.path / "owners"
        if not path.exists():
            return {}
        try:
            o = _record(path, OwnersRecord)
        except (OSError, ValueError, msgspec.DecodeError) as e:
            self.skip(path, f"{e}; clients get new identities at their next hello")
            return {}
        return {token: self.names.owner(name) for token, name in o.tokens.items()}

    def load_tensors(self) -> Iterable[tuple[ClientId, str, TensorHeader, np.ndarray | None, KeptRelease | None]]:
        """Every valid tensor file: (owner, key, header, array or None for a failed run's record, its pending
        release if any)."""
        for d in sorted(self.tensors.iterdir()):
            if not d.is_dir() or d.is_symlink():
                self.skip(d, "not a directory of tensors")
                continue
            for path in sorted(d.iterdir()):
                if path.name.startswith(".tmp-"):
                    self._unfinished(path)  # a write that a crash interrupted: never acknowledged
                    continue
                try:
                    item = read_tensor(d, path, self.names)
                except (OSError, ValueError, msgspec.DecodeError) as e:
                    self.skip(path, str(e))
                    continue
                yield item

    def load_spent(self) -> dict[ClientId, dict[float, int]]:
        """The noised releases each owner was given: owner -> {noise multiplier: count} (``privacy``);
        ValueError (logged) when the file is damaged."""
        path = self.path / "privacy"
        if not path.exists():
            return {}
        try:
            doc = _record(path, PrivacyRecord)
        except (OSError, ValueError, msgspec.DecodeError) as e:  # never ignored: budgets would start at 0
            self.skip(path, f"{e}; noised releases are refused until it is repaired (or removed, which resets "
                       "every client's spent privacy budget)")  # fmt: skip
            raise ValueError(f"the record of the privacy budget spent ({path}) is damaged: {e}") from None
        out: dict[ClientId, dict[float, int]] = {}
        for name, events in doc.spent.items():
            counts = out.setdefault(self.names.owner(name), {})
            for noise, count in events:
                counts[noise] = counts.get(noise, 0) + count
        return out

    def _unfinished(self, path: Path) -> None:
        """Remove a write's temporary file; anything else under that name (a directory) is skipped, not fatal."""
        if path.is_dir() and not path.is_symlink():
            self.skip(path, "a directory where only a write's temporary file belongs")
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
                    self.skip(path, "no plan file beside it")
                continue
            if path.suffix != ".plan":
                self.skip(path, "not a plan file")
                continue
            holders_path = path.with_suffix(".holders")
            if not holders_path.exists():  # a registration a crash interrupted: never acknowledged
                log.info("--state-dir: removing %s (its registration did not finish)", path)
                path.unlink(missing_ok=True)
                continue
            try:
                yield self._load_plan(path, holders_path, max_plan_bytes)
            except (OSError, ValueError, msgspec.DecodeError, PlanRejected, ProtocolError) as e:
                self.skip(path, str(e))

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
        try:
            holders = _record(holders_path, HoldersRecord)
        except ValueError as e:  # msgspec.DecodeError included
            raise ValueError(f"{holders_path.name}: {e}") from None
        return pid, h.name, data, ports, summary.unknown_rank, [self.names.owner(n) for n in holders.holders]


def _record(path: Path, kind: type[R]) -> R:
    """The JSON record at ``path``, of this format; OSError, or ValueError saying what is wrong with it."""
    doc = msgspec.json.decode(path.read_bytes(), type=kind)
    if doc.format != FORMAT:
        raise ValueError(f"format {doc.format}")
    return doc
