"""Durable state (plan-worker --state-dir: the Python worker's worker/state.py and the Node.js worker's
src/durable.js): after kill -9 and a restart on the same directory every acknowledged put, run output, move,
delete, failed-run record, registration and client identity is back under the same session, and clients go
on without registering again; damaged files in the directory are skipped with a log line naming them; one
worker per directory. Each test runs on both workers, and a directory written by one worker is read by the
other (one format: PROTOCOL.md §11.1)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import planwire
from planwire.transport import RemoteError, WorkerLost
from planwire.transport import messages as m
from planwire.transport.client import WorkerClient
from planwire.transport.connection import Connection
from planwire.transport.dealer import DealerLink
from planwire.worker import statedir as state_mod
from planwire.worker import statefiles
from planwire.worker.policy import Policy, parse
from planwire.worker.release import epsilon_of
from planwire.worker.service import Service
from planwire.worker.state import Restored, StateDir, StateError, attach
from planwire.worker.virtual import ServiceLink
from tests import handmade
from tests.conformance.wire import Peer
from tests.conformance.workers import node_missing, start

F32 = np.float32
KINDS = ["python", "node"]


class _Link(ServiceLink):
    """An in-process link on a connection of its own (``conn``), as a socket's routing id would be."""

    def __init__(self, service: Service, conn: bytes) -> None:
        super().__init__(service)
        self.conn = conn

    def send(self, frames: list) -> None:
        self._replies.append([bytes(f) for f in self.service.handle([bytes(f) for f in frames], self.conn)])


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Incarnation:
    """One in-process Python worker life on a state directory, with a client that presents ``identity``."""

    def __init__(
        self,
        path: Path,
        identity: str = "",
        data: tuple = (),
        sync: bool = True,
        idle_ttl: float | None = None,
        policy: Policy | None = None,
    ) -> None:
        logger, self._lines = logging.getLogger("planwire.worker"), _Lines()
        level = logger.level
        logger.addHandler(self._lines)
        logger.setLevel(logging.INFO)
        try:
            self.state = StateDir.open(path, sync=sync)
            self.service = Service("w", data=data, idle_ttl=idle_ttl, policy=policy)
            self.restored = attach(self.service, self.state)
        finally:
            logger.removeHandler(self._lines)
            logger.setLevel(level)
        self._conns = 0
        self.client = self.connect(identity)

    def connect(self, identity: str = "") -> WorkerClient:
        """A client on a connection of its own that presents ``identity`` at hello."""
        self._conns += 1
        client = WorkerClient(Connection(_Link(self.service, b"conn-%d" % self._conns), name="w"))
        client.identity = identity
        client.hello()
        return client

    def log(self) -> str:
        """What the worker logged while it restored the directory."""
        return "\n".join(self._lines.lines)

    def close(self) -> None:
        self.state.close()  # as kill -9 would: nothing flushed or said goodbye


_RESTORED = re.compile(
    r"(new|kept) session (\w+); restored (\d+) tensors \((\d+) bytes\), (\d+) failed-run records, (\d+) plans, "
    r"(\d+) clients \((\d+) identities\)(?:; (\d+) damaged entries skipped)?"
)


class NodeIncarnation:
    """One life of a Node.js plan-worker process on a state directory, ended by SIGKILL: the same interface,
    ``restored`` read from its log line."""

    def __init__(self, path: Path, identity: str = "", sync: bool = True, idle_ttl: float | None = None) -> None:
        if reason := node_missing():
            pytest.skip(reason)
        extra = ["--state-dir", str(path), "--state-sync", "fsync" if sync else "none"]
        if idle_ttl is not None:
            extra += ["--idle-ttl", str(idle_ttl)]
        self.proc = start("node", "w", extra=extra)
        found = _RESTORED.search(self.proc.log())
        assert found, self.proc.log()
        new, session, *counts = found.groups()
        tensors, nbytes, failed, plans, owners, identities, skipped = (int(n or 0) for n in counts)
        self.restored = Restored(
            session,
            tensors=tensors,
            tensor_bytes=nbytes,
            failed=failed,
            plans=plans,
            owners=owners,
            identities=identities,
            skipped=skipped,
            new=new == "new",
        )
        self._clients: list[WorkerClient] = []
        self.client = self.connect(identity)

    def connect(self, identity: str = "") -> WorkerClient:
        client = WorkerClient(Connection(DealerLink(self.proc.url), name="w", timeout=60))
        client.identity = identity
        client.hello()
        self._clients.append(client)
        return client

    def log(self) -> str:
        return self.proc.log()

    def close(self) -> None:
        os.kill(self.proc.proc.pid, signal.SIGKILL)  # nothing flushed or said goodbye
        self.proc.proc.wait(10)
        self.proc.close()
        for client in self._clients:
            client.connection.close()  # the link only: frees of its pointers would go nowhere


def life(kind: str, path: Path, **kwargs) -> Incarnation | NodeIncarnation:
    """A worker of ``kind`` (the Python one in-process, the Node.js one as a process) on the directory ``path``."""
    return NodeIncarnation(path, **kwargs) if kind == "node" else Incarnation(path, **kwargs)


@pytest.mark.parametrize(
    ("before", "after", "sync"),
    [
        ("python", "python", True),
        ("python", "python", False),
        ("node", "node", True),
        ("node", "node", False),
        ("python", "node", True),  # one format: a directory one worker wrote, the other reads
        ("node", "python", True),
    ],
    ids=["python", "python-no-fsync", "node", "node-no-fsync", "python-then-node", "node-then-python"],
)
def test_everything_acknowledged_is_back_after_a_restart(tmp_path, before, after, sync):
    first = life(before, tmp_path / "state", sync=sync)
    c = first.client
    pp = c.plan_pointer(handmade.double_abs())
    x = c.put(np.array([1, -2, 3], F32), tags=["train", "x"])
    y = pp(x)  # a run's output
    moved = c.put(np.arange(4, dtype=np.int64), key="moved")
    deleted = c.put(np.ones(2, F32), key="deleted")
    assert moved.get().tolist() == [0, 1, 2, 3]  # a get moves it off the worker
    c.delete(deleted)
    bad = handmade.reshape_to_3()
    pbad = c.plan_pointer(bad)
    five = c.put(np.ones(5, F32))
    failed = pbad(five)  # fails at run time: its output is recorded as failed
    gone = c.plan_pointer(handmade.sum_and_diff())
    c.delete_plan(handmade.sum_and_diff().variants[0].id)
    c.flush()
    session, identity = c.session, c.identity
    first.close()

    second = life(after, tmp_path / "state", identity=identity, sync=sync)
    c2 = second.client
    assert second.restored.session == session and not second.restored.new
    assert c2.session == session  # the same session: the client's plan cache stays valid
    assert c2.identity == identity
    assert c2.fetch_arrays([x.key], keep=True)[0].tolist() == [1, -2, 3]
    assert c2.fetch_arrays([y.key], keep=True)[0].tolist() == [2, 4, 6]
    assert {p.key for p in c2.search("train", "x")} == {x.key}
    with pytest.raises(RemoteError, match="unknown_tensor|no tensor 'moved'"):
        c2.fetch_arrays(["moved"])
    with pytest.raises(RemoteError, match="no tensor 'deleted'"):
        c2.fetch_arrays(["deleted"])
    with pytest.raises(RemoteError, match="run_failed|failed"):
        c2.fetch_arrays([failed.key])
    pid = handmade.double_abs().variants[0].id
    reply, _ = c2.request(lambda rid: m.HasPlan(id=rid, plan=pid))
    assert type(reply).__name__ == "PlanInfo"  # still registered for this client
    reply, _ = c2.request(lambda rid: m.HasPlan(id=rid, plan=gone.source.variants[0].id))
    assert type(reply).__name__ == "Missing"  # delete_plan was kept too
    # The client goes on without registering: a run by plan id works at once.
    out = c2.run(handmade.double_abs().variants[0], [np.array([-4], F32)], fetch=[0])
    assert out[0].get().tolist() == [8]
    assert second.restored.plans == 2 and second.restored.tensors == 3 and second.restored.failed == 1
    second.close()

    # A client that never presented its identity cannot reach the restored objects.
    stranger = life(after, tmp_path / "state")
    with pytest.raises(RemoteError, match="no tensor"):
        stranger.client.fetch_arrays([x.key], keep=True)
    stranger.close()


@pytest.mark.parametrize("kind", KINDS)
def test_clients_freed_by_idle_ttl_stay_freed_after_a_restart(tmp_path, kind):
    first = life(kind, tmp_path / "s", idle_ttl=0.05)
    gone = first.connect()
    gone.put(np.ones(3, F32))
    gone.plan_pointer(handmade.double_abs())
    time.sleep(0.2)
    other = first.connect()  # a request after the TTL: the idle clients are freed, on disk too
    kept, identity = other.put(np.full(2, 5, F32)), other.identity
    first.close()
    assert len(list((tmp_path / "s" / "tensors").iterdir())) == 1  # one owner's tensors left
    second = life(kind, tmp_path / "s", identity=identity)
    assert second.restored.tensors == 1 and second.restored.plans == 0 and second.restored.identities == 1
    assert second.client.fetch_arrays([kept.key], keep=True)[0].tolist() == [5, 5]
    second.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_directory_starts_a_new_session_and_keeps_it(tmp_path, kind):
    a = life(kind, tmp_path / "s")
    assert a.restored.new and a.client.session == a.restored.session
    session = a.client.session
    a.close()
    b = life(kind, tmp_path / "s")
    assert not b.restored.new and b.client.session == session
    b.close()
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "s" / "owners").stat().st_mode & 0o777 == 0o600  # identities are secrets


def test_one_worker_per_directory(tmp_path):
    held = StateDir.open(tmp_path / "s")
    with pytest.raises(StateError, match=f"in use by another plan-worker \\(pid {os.getpid()}\\)"):
        StateDir.open(tmp_path / "s")
    held.close()
    StateDir.open(tmp_path / "s").close()  # released with its holder
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="not a directory"):
        StateDir.open(tmp_path / "file")
    # A planted link is never followed: not as the lock, not as a temporary file being written.
    (tmp_path / "victim").write_text("keep me")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "lock").symlink_to(tmp_path / "victim")
    with pytest.raises(StateError, match="cannot use it"):
        StateDir.open(tmp_path / "linked")
    held = StateDir.open(tmp_path / "s")
    (tmp_path / "s" / ".tmp-session").symlink_to(tmp_path / "victim")
    statefiles.write_atomic(tmp_path / "s" / "session", [b"{}"])
    assert (tmp_path / "victim").read_text() == "keep me" and (tmp_path / "s" / "session").read_bytes() == b"{}"
    held.close()


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_files_are_skipped_with_a_log_line_and_the_rest_restored(tmp_path, kind):
    first = life(kind, tmp_path / "s")
    c = first.client
    keep = c.put(np.full(3, 7, F32), key="keep")
    held = [c.put(np.ones(1000, F32), key=k) for k in ("truncated", "magic", "header", "misplaced")]
    c.plan_pointer(handmade.double_abs())
    c.plan_pointer(handmade.sum_and_diff())
    c.flush()
    identity = c.identity
    first.close()
    del held

    root = tmp_path / "s"
    owner_dir = next((root / "tensors").iterdir())

    def path_of(key: str) -> Path:
        return owner_dir / f"{statefiles.digest(key)}.t"

    truncated, magic, header, misplaced = (path_of(k) for k in ("truncated", "magic", "header", "misplaced"))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    magic.write_bytes(b"\x80\x04pickle?" + magic.read_bytes()[8:])
    raw = bytearray(header.read_bytes())
    raw[12:20] = b'{"evil":'  # the JSON header no longer decodes to its schema
    header.write_bytes(bytes(raw))
    os.replace(misplaced, owner_dir / f"{statefiles.digest('elsewhere')}.t")  # a file under the wrong name
    (owner_dir / "junk.t").write_bytes(b"\x00" * 3)
    (root / "tensors" / "stray-file").write_text("not a directory")
    (owner_dir / "link.t").symlink_to("/etc/passwd")
    bad_plan = root / "plans" / f"{handmade.sum_and_diff().variants[0].id}.plan"
    raw = bytearray(bad_plan.read_bytes())
    raw[-5] ^= 0xFF  # its bytes no longer hash to its plan id
    bad_plan.write_bytes(bytes(raw))
    (root / "plans" / ".tmp-x.plan").write_bytes(b"half a write")
    planted = [owner_dir / ".tmp-d.t", root / "plans" / ".tmp-d.plan"]  # directories under a write's name
    for d in planted:
        (d / "inside").mkdir(parents=True)

    second = life(kind, root, identity=identity)
    log = second.log()
    for p in (truncated, magic, header, owner_dir / f"{statefiles.digest('elsewhere')}.t", owner_dir / "junk.t",
              owner_dir / "link.t", root / "tensors" / "stray-file", bad_plan, *planted):  # fmt: skip
        assert f"skipped {p}" in log, p
    assert "needs 4000 bytes, the file holds 3990" in log
    assert "bad magic" in log and "misplaced" in log and "do not match its plan id" in log
    assert second.restored.tensors == 1 and second.restored.plans == 1 and second.restored.skipped == 10
    assert second.client.fetch_arrays([keep.key], keep=True)[0].tolist() == [7, 7, 7]
    assert not (root / "plans" / ".tmp-x.plan").exists() and all(d.is_dir() for d in planted)
    # The session survived; a damaged plan is simply registered again by the client that uses it.
    pp = second.client.plan_pointer(handmade.sum_and_diff())
    s, d = pp(np.ones((1, 2), F32), np.ones((1, 2), F32))
    assert s.get().tolist() == [[2, 2]]
    second.close()


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_session_and_identities_start_afresh(tmp_path, kind):
    first = life(kind, tmp_path / "s")
    first.client.put(np.ones(2, F32), key="k")
    session, identity = first.client.session, first.client.identity
    first.close()
    (tmp_path / "s" / "session").write_text('{"format": 1, "session": "../../etc"}')
    (tmp_path / "s" / "owners").write_text("{not json")
    second = life(kind, tmp_path / "s", identity=identity)
    assert "a new session starts" in second.log() and "clients get new identities" in second.log()
    assert second.client.session != session and second.restored.new
    assert second.client.identity != identity  # an identity the worker cannot vouch for is not honoured
    second.close()


def test_a_put_the_disk_cannot_hold_is_refused_whole(tmp_path, monkeypatch):
    # The Python worker only: the full disk is simulated by raising its reserve in this process (the Node
    # worker's check, src/statedir.js checkRoom, is the same code with the same words, untested here).
    inc = Incarnation(tmp_path / "s")
    c = inc.client
    before = c.put(np.ones(4, F32), key="before")
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    monkeypatch.setattr(state_mod, "DISK_RESERVE", free)  # as if the disk were full
    with pytest.raises(RemoteError, match=r"quota_exceeded|--state-dir .* free") as err:
        c.put_many({"a": np.ones(4, F32), "b": np.ones(4, F32)})
    assert "--state-dir" in str(err.value)
    monkeypatch.setattr(state_mod, "DISK_RESERVE", 0)
    with pytest.raises(RemoteError, match="no tensor 'a'"):
        c.fetch_arrays(["a"])
    assert before.get(keep=True).tolist() == [1, 1, 1, 1]
    inc.close()


def test_a_failure_record_the_disk_refuses_still_fails_the_key(tmp_path, monkeypatch):
    """A failed run's output keys are failed in memory even when the record cannot be written (a client that
    never reads run replies must not get the key's old value), and the old value's file goes with it."""
    inc = Incarnation(tmp_path / "s")
    c = inc.client
    c.put(np.ones(3, F32), key="y")
    pbad = c.plan_pointer(handmade.reshape_to_3())

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StateDir, "save_failure", full)
    c.run(pbad.source.variants[0], [np.ones(5, F32)], outputs=["y"])  # fails at run time
    with pytest.raises(RemoteError, match="run_failed"):
        c.fetch_arrays(["y"], keep=True)
    identity = c.identity
    inc.close()
    monkeypatch.undo()
    again = Incarnation(tmp_path / "s", identity=identity)
    with pytest.raises(RemoteError, match="no tensor 'y'"):  # not its old value
        again.client.fetch_arrays(["y"], keep=True)
    again.close()


# -- a real plan-worker, killed with SIGKILL -----------------------------------------------------------------


def _free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _worker_kind(kind: str) -> str:
    if kind == "node" and (reason := node_missing()):
        pytest.skip(reason)
    return kind


@pytest.mark.parametrize("worker", KINDS)
@pytest.mark.parametrize("kind", ["tcp", "ipc"])
def test_kill_9_and_restart_on_the_same_dir_the_client_goes_on(tmp_path, kind, worker):
    worker = _worker_kind(worker)
    url = _free_tcp() if kind == "tcp" else f"ipc://{tmp_path}/w.ipc"
    extra = ["--state-dir", str(tmp_path / "state")]
    first = start(worker, "durable", listen=url, extra=extra)
    c = planwire.connect(url, timeout=60)
    second = None
    try:
        pp = c.plan_pointer(handmade.double_abs())
        x = c.put(np.array([1, -2], F32))
        y = pp(x)
        z = pp(y)
        assert z.get(keep=True).tolist() == [4, 8]
        session = c.session
        with Peer(url) as raw:  # acknowledged, then killed at once: it must be back
            identity = raw.ok({"type": "hello"})["identity"]
            raw.put("last-put", np.arange(3, dtype=np.int32))
            os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        with pytest.raises(WorkerLost):  # while it is down (the identity cannot be presented yet either)
            c.put(np.ones(1, F32))
        second = start(worker, "durable", listen=url, extra=extra)
        assert "kept session " + session in second.log()
        with Peer(url) as raw:
            assert raw.ok({"type": "hello", "identity": identity})["identity"] == identity
            assert raw.get1("last-put").tolist() == [0, 1, 2]
        assert c.fetch_arrays([y.key], keep=True)[0].tolist() == [2, 4]  # the client's pointers still hold
        assert pp(z).get().tolist() == [8, 16]  # and its plan is still registered: not sent again
        assert c.session == session
        assert "registered plan" not in second.log()
        assert x.get().tolist() == [1, -2]
        with pytest.raises(RemoteError, match="no tensor"):
            x.worker.fetch_arrays([x.key])  # moved by the get above
    finally:
        c.close()
        first.close()
        if second is not None:
            second.close()


@pytest.mark.parametrize(("holder", "other"), [(a, b) for a in KINDS for b in KINDS])
def test_a_worker_refuses_a_state_dir_another_worker_holds(tmp_path, holder, other):
    # One lock for both workers (flock on DIR/lock): neither takes a directory the other holds.
    extra = ["--state-dir", str(tmp_path / "state")]
    with start(_worker_kind(holder), "a", listen=f"ipc://{tmp_path}/a.ipc", extra=extra) as a:
        with pytest.raises(RuntimeError, match=r"exited with 2[\s\S]*in use by another plan-worker \(pid \d+\)"):
            start(_worker_kind(other), "b", listen=f"ipc://{tmp_path}/b.ipc", extra=extra)
        assert a.proc.poll() is None
    start(other, "b", listen=f"ipc://{tmp_path}/b.ipc", extra=extra).close()  # released with its holder


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_dir_that_cannot_be_used_stops_the_worker_at_start(tmp_path, kind):
    kind = _worker_kind(kind)
    listen = f"ipc://{tmp_path}/w.ipc"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RuntimeError, match=r"exited with 2[\s\S]*--state-dir '.*file' exists and is not a dir"):
        start(kind, "w", listen=listen, extra=["--state-dir", str(tmp_path / "file")])
    (tmp_path / "victim").write_text("keep me")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "lock").symlink_to(tmp_path / "victim")  # a planted link is never followed
    with pytest.raises(RuntimeError, match=r"exited with 2[\s\S]*--state-dir '.*linked': cannot use it \(Too many"):
        start(kind, "w", listen=listen, extra=["--state-dir", str(tmp_path / "linked")])
    (tmp_path / "fresh").mkdir(mode=0o700)
    (tmp_path / "fresh" / ".tmp-session").symlink_to(tmp_path / "victim")  # nor as a file being written
    start(kind, "w", listen=listen, extra=["--state-dir", str(tmp_path / "fresh")]).close()
    assert (tmp_path / "victim").read_text() == "keep me"
    assert b'"session"' in (tmp_path / "fresh" / "session").read_bytes()
    nowhere = "/sys/planwire-test-nowhere/state"  # a directory nobody can make, root included
    with pytest.raises(
        RuntimeError, match=r"exited with 2[\s\S]*cannot use it \((Operation not permitted|Permission denied)\)"
    ):
        start(kind, "w", listen=listen, extra=["--state-dir", nowhere])


def test_the_node_worker_keeps_pending_releases_and_the_privacy_budget_spent(tmp_path):
    # The privacy records of PROTOCOL.md §11.1: after kill -9 a released value comes back unchanged (no new
    # noise), a result released after the restart is accounted on top of what was spent before it.
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    from tests.test_policy import run_step, step_plan

    _worker_kind("node")
    plan, sigma = step_plan(), 1.5
    np.save(tmp_path / "secret.npy", np.float32([3, -1, 2]))
    (tmp_path / "policy.toml").write_text(
        f'[[plan]]\nfingerprint = "{plan.variants[0].id}"\noutputs.new_w = {{ update = "w" }}\n'
        f"update = {{ clip_norm = 1.0, noise_multiplier = {sigma} }}\n"
    )
    audit = tmp_path / "audit.jsonl"
    extra = ["--policy", str(tmp_path / "policy.toml"), "--plans-dir", "none", "--audit", str(audit)]
    extra += ["--state-dir", str(tmp_path / "state")]
    data = [f"{tmp_path / 'secret.npy'}:secret"]
    first = start("node", "dp", data=data, extra=extra)
    c = WorkerClient(Connection(DealerLink(first.url), name="dp", timeout=60))
    c.hello()
    (x,) = c.search("secret")
    for i in (1, 2, 3):
        run_step(c, plan, np.zeros(3, F32), x, np.float32(1.0), outputs=[f"w{i}", f"loss{i}"])
    released = c.fetch_arrays(["w1"], keep=True)[0]  # noised once, accounted once
    identity = c.identity
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    first.close()
    c.connection.close()

    with start("node", "dp", data=data, extra=extra) as second:
        c = WorkerClient(Connection(DealerLink(second.url), name="dp", timeout=60))
        c.identity = identity
        c.hello()
        assert np.array_equal(c.fetch_arrays(["w1"], keep=True)[0], released)  # the same value, no new noise
        again = c.fetch_arrays(["w2"], keep=True)[0]  # a pending release restored: released now
        assert again.shape == (3,) and not np.array_equal(again, released)
        with pytest.raises(RemoteError, match="private"):
            c.fetch_arrays(["loss1"], keep=True)  # no rule releases it: still private after the restart
        c.connection.close()
        os.kill(second.proc.pid, signal.SIGKILL)
    (tmp_path / "state" / "privacy").write_text('{"format": 1, "spent": {"x": [[-1, 1]]}}')
    with start("node", "dp", data=data, extra=extra) as third:  # a budget it cannot read is never a clean slate
        assert "skipped" in third.log() and "noised releases are refused until it is repaired" in third.log()
        c = WorkerClient(Connection(DealerLink(third.url), name="dp", timeout=60))
        c.identity = identity
        c.hello()
        with pytest.raises(RemoteError, match="privacy budget spent .* is damaged: .*no noised release is made"):
            c.fetch_arrays(["w3"], keep=True)
        assert np.array_equal(c.fetch_arrays(["w1"], keep=True)[0], released)  # released before: as it was
        c.connection.close()
    epsilons = [r["epsilon"] for r in map(json.loads, audit.read_text().splitlines()) if r["event"] == "released"]
    accountant = rdp_privacy_accountant.RdpAccountant()
    for got in epsilons:  # 1 then 2 releases: the restart forgot none
        accountant.compose(dp_event.GaussianDpEvent(sigma))
        assert got == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert len(epsilons) == 2


# -- private results: pending releases and the privacy budget spent -------------------------------------------

SIGMA = 2.0  # the noise multiplier of the step plan's update


def _budget_policy_text(fp: str) -> str:
    """A policy releasing the step plan's loss as it is and its weights as a noised update, with a privacy
    budget (max_epsilon) that allows exactly two noised releases per client."""
    two, three = epsilon_of({SIGMA: 2}, 1e-5), epsilon_of({SIGMA: 3}, 1e-5)
    return (
        f'max_epsilon = {(two + three) / 2}\n[[plan]]\nfingerprint = "{fp}"\nname = "step"\n'
        'outputs.loss = "as_is"\noutputs.new_w = { update = "w" }\n'
        f"update = {{ clip_norm = 1.0, noise_multiplier = {SIGMA} }}\n"
    )


def _step(client, x, w, out: str):
    from tests.test_policy import step_plan

    variant = step_plan().variants[0]
    client.ensure_plan(variant, "step")
    return client.run(variant, [w, x, np.float32(0.1)], outputs=[out, f"loss-{out}"], wait=True)


def test_spent_privacy_budget_and_pending_releases_survive_a_restart(tmp_path):
    import tomllib

    from tests.test_policy import step_plan

    fp = step_plan().variants[0].id
    policy = parse(tomllib.loads(_budget_policy_text(fp)))
    secret = ("secret", np.random.default_rng(0).standard_normal(16).astype(F32), ("secret",))
    one, two = epsilon_of({SIGMA: 1}, 1e-5), epsilon_of({SIGMA: 2}, 1e-5)

    first = Incarnation(tmp_path / "s", data=(secret,), policy=policy)
    c = first.client
    (x,) = c.search("secret")
    _step(c, x, np.zeros(16, F32), "w1")
    v1 = c.fetch_arrays(["w1"], keep=True)[0]  # noised: one release spent
    _step(c, x, np.zeros(16, F32), "w2")  # its release pending, not read before the crash
    c.flush()
    assert list(first.service.releaser.spent().values()) == [pytest.approx(one)]
    identity = c.identity
    first.close()

    second = Incarnation(tmp_path / "s", identity=identity, data=(secret,), policy=policy)
    c = second.client
    assert second.restored.releases == 4 and second.restored.budgets == 1  # w1, w2 and both losses
    assert list(second.service.releaser.spent().values()) == [pytest.approx(one)]  # the budget spent is back
    assert np.array_equal(c.fetch_arrays(["w1"], keep=True)[0], v1)  # the same value: no fresh noise...
    assert list(second.service.releaser.spent().values()) == [pytest.approx(one)]  # ...and nothing spent again
    v2 = c.fetch_arrays(["w2"], keep=True)[0]  # a restored pending release is released
    assert not np.array_equal(v1, v2)
    assert c.fetch_arrays(["loss-w2"], keep=True)[0] == pytest.approx(float(secret[1].sum()))  # as_is, too
    (x,) = c.search("secret")
    _step(c, x, np.zeros(16, F32), "w3")
    with pytest.raises(RemoteError, match="max_epsilon"):  # a third noised release is past the budget
        c.fetch_arrays(["w3"], keep=True)
    first_spent = second.service.releaser.spent()
    second.close()

    third = Incarnation(tmp_path / "s", identity=identity, data=(secret,), policy=policy)
    c = third.client
    assert third.service.releaser.spent() == pytest.approx(first_spent) and list(first_spent.values()) == [
        pytest.approx(two)
    ]
    with pytest.raises(RemoteError, match="max_epsilon"):  # still refused after a restart
        c.fetch_arrays(["w3"], keep=True)
    assert np.array_equal(c.fetch_arrays(["w2"], keep=True)[0], v2)
    third.close()

    # A policy that no longer approves the plan: the restored results stay private.
    strict = Incarnation(tmp_path / "s", identity=identity, data=(secret,), policy=parse({"plan": []}))
    with pytest.raises(RemoteError, match="private_data|never leaves"):
        strict.client.fetch_arrays(["w2"], keep=True)
    strict.close()

    # A damaged record of the budget is never taken for a clean slate: noised releases are refused.
    (tmp_path / "s" / "privacy").write_text('{"format": 1, "spent": {"x": "nope"}}')
    damaged = Incarnation(tmp_path / "s", identity=identity, data=(secret,), policy=policy)
    c = damaged.client
    (x,) = c.search("secret")
    _step(c, x, np.zeros(16, F32), "w4")
    with pytest.raises(RemoteError, match="privacy budget spent .* is damaged"):
        c.fetch_arrays(["w4"], keep=True)
    assert c.fetch_arrays(["loss-w4"], keep=True)[0] == pytest.approx(float(secret[1].sum()))
    damaged.close()


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_keeps_the_privacy_budget_spent_and_pending_releases(tmp_path, kind):
    from tests.test_policy import step_plan

    kind = _worker_kind(kind)

    url = f"ipc://{tmp_path}/w.ipc"
    data = tmp_path / "secret.npy"
    secret = np.random.default_rng(1).standard_normal(16).astype(F32)
    np.save(data, secret)
    policy = tmp_path / "policy.toml"
    policy.write_text(_budget_policy_text(step_plan().variants[0].id))
    audit = tmp_path / "audit.jsonl"
    extra = ["--state-dir", str(tmp_path / "state"), "--policy", str(policy), "--audit", str(audit)]
    extra += ["--plans-dir", str(tmp_path / "plans")]
    first = start(kind, "durable", listen=url, data=[f"{data}:secret"], extra=extra)
    c = planwire.connect(url, timeout=60)  # the first noised release imports dp-accounting
    second = None
    try:
        (x,) = c.search("secret")
        _step(c, x, np.zeros(16, F32), "w1")
        v1 = c.fetch_arrays(["w1"], keep=True)[0]  # acknowledged: its epsilon is spent
        _step(c, x, np.zeros(16, F32), "w2")
        c.flush()  # the run acknowledged
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        second = start(kind, "durable", listen=url, data=[f"{data}:secret"], extra=extra)
        assert np.array_equal(c.fetch_arrays(["w1"], keep=True)[0], v1)
        v2 = c.fetch_arrays(["w2"], keep=True)[0]
        assert not np.array_equal(v1, v2)
        _step(c, x, np.zeros(16, F32), "w3")
        with pytest.raises(RemoteError, match="max_epsilon"):
            c.fetch_arrays(["w3"], keep=True)
        other = planwire.connect(url, timeout=60)  # another client on a new connection: no fresh budget
        try:
            (x2,) = other.search("secret")
            _step(other, x2, np.zeros(16, F32), "o1")
            with pytest.raises(RemoteError, match="all clients' noised releases.*max_epsilon"):
                other.fetch_arrays(["o1"], keep=True)
        finally:
            other.close()
    finally:
        c.close()
        first.close()
        if second is not None:
            second.close()
    import json

    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["event"], r["outputs"]) for r in lines] == [
        ("released", ["new_w"]),
        ("released", ["new_w"]),
        ("refused", ["new_w"]),
        ("refused", ["new_w"]),  # the other client's
    ]
    assert lines[0]["epsilon"] == pytest.approx(epsilon_of({SIGMA: 1}, 1e-5))
    assert lines[1]["epsilon"] == pytest.approx(epsilon_of({SIGMA: 2}, 1e-5))  # counted on from before the kill


# -- group commit: a burst's writes made durable together, no reply before ----------------------------------


def test_group_commit_stages_writes_and_holds_replies_until_they_are_durable(tmp_path):
    from planwire.worker.state import ReplyGate

    state = StateDir.open(tmp_path / "s")
    sent: list = []

    class Server:
        def send(self, peer, reply):
            sent.append((peer, reply))

    server = Server()
    gate = ReplyGate(state).install(server)
    assert gate is not None and state.grouped
    owner = b"k:" + b"ab" * 16
    server.send(b"p", ["pong"])  # nothing staged: sent at once
    assert sent == [(b"p", ["pong"])]
    state.save_tensor(owner, "a", np.ones(3, F32), (), False, 0)
    state.save_tensor(owner, "b", np.ones(2, F32), (), False, 0)
    state.save_tensor(owner, "gone", np.ones(2, F32), (), False, 0)
    state.remove_tensors(owner, ["gone"])  # staged, then removed: never written
    path = state.tensor_path(owner, "a")
    assert state.dirty and not path.exists() and path.with_name(".tmp-" + path.name).exists()
    server.send(b"p", ["ok a"])
    server.send(b"q", ["ok b"])  # held too: replies keep their order
    assert len(sent) == 1
    gate.flush()
    assert sent[1:] == [(b"p", ["ok a"]), (b"q", ["ok b"])] and not state.dirty
    assert path.exists() and not state.tensor_path(owner, "gone").exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]
    kept = {key: array.tolist() for _, key, _, array, _ in state.load_tensors()}
    assert kept == {"a": [1, 1, 1], "b": [1, 1]}
    state.close()
    # Without fsyncs there is nothing to group: writes land at once and no reply is held.
    nosync = StateDir.open(tmp_path / "n", sync=False)
    assert ReplyGate(nosync).install(Server()) is None and not nosync.grouped
    nosync.close()


_NODE_GROUP = """
import * as fs from "node:fs";
import { StateDir } from "SRC/statedir.js";
import { Tensor } from "SRC/codec.js";
const [root, nosyncRoot] = process.argv.slice(2);
const seen = {};
const state = StateDir.open(root);
state.group();
const owner = "s:k" + "ab".repeat(16);
const f32 = (n) => new Tensor("float", [n], Buffer.from(new Float32Array(n).fill(1).buffer));
for (const [key, n] of [["a", 3], ["b", 2], ["gone", 2]]) state.saveTensor(owner, key, f32(n), [], false, 0);
state.removeTensors(owner, ["gone"]); // staged, then removed: never written
const a = state.tensorPath(owner, "a");
const tmp = (p) => p.replace(/[^/]+$/, (n) => ".tmp-" + n);
seen.staged = [state.grouped, state.dirty, fs.existsSync(a), fs.existsSync(tmp(a))];
state.commit();
const d = state.ownerDir(owner);
const tmps = fs.readdirSync(d).filter((n) => n.startsWith(".tmp-"));
seen.committed = [state.dirty, fs.existsSync(a), fs.existsSync(state.tensorPath(owner, "gone")), tmps];
state.saveTensor(owner, "c", f32(1), [], false, 0); // no reply waits for it: committed at the end of the turn
seen.late = [state.dirty, fs.existsSync(state.tensorPath(owner, "c"))];
await new Promise((r) => setImmediate(r));
seen.turn = [state.dirty, fs.existsSync(state.tensorPath(owner, "c"))];
const values = (t) => [...new Float32Array(Uint8Array.from(t.data).buffer)];
seen.kept = Object.fromEntries([...state.loadTensors()].map((t) => [t.key, values(t.tensor)]));
state.close();
const nosync = StateDir.open(nosyncRoot, { sync: false }); // nothing to group: writes land at once
nosync.group();
nosync.saveTensor(owner, "a", f32(1), [], false, 0);
seen.nosync = [nosync.grouped, nosync.dirty, fs.existsSync(nosync.tensorPath(owner, "a"))];
nosync.close();
console.log(JSON.stringify(seen));
"""


def test_node_group_commit_stages_writes_until_they_are_committed(tmp_path):
    # The Node worker's state directory as worker/statecommit.py's: grouped, a burst's files are written under
    # their temporary names and renamed only by the commit (src/server.js commits before a batch of replies
    # leaves; a change no reply waits for is committed at the end of the event loop's turn).
    import json
    import subprocess

    from planwire.worker.process import NODE_DIR

    _worker_kind("node")
    script = tmp_path / "group.mjs"
    script.write_text(_NODE_GROUP.replace("SRC", str(NODE_DIR / "src")))
    done = subprocess.run(
        ["node", str(script), str(tmp_path / "s"), str(tmp_path / "n")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["staged"] == [True, True, False, True]
    assert seen["committed"] == [False, True, False, []]
    assert seen["late"] == [True, False] and seen["turn"] == [False, True]
    assert seen["kept"] == {"a": [1, 1, 1], "b": [1, 1], "c": [1]}
    assert seen["nosync"] == [False, False, True]


@pytest.mark.parametrize("worker", KINDS)
def test_kill_9_during_pipelined_puts_keeps_every_acknowledged_one(tmp_path, worker):
    """A client pipelines puts (many share a group commit); the worker is killed -9 mid-burst: every put
    whose reply arrived is back after the restart."""
    from tests.conformance.wire import encode

    worker = _worker_kind(worker)
    url = f"ipc://{tmp_path}/w.ipc"
    extra = ["--state-dir", str(tmp_path / "state")]
    first = start(worker, "durable", listen=url, extra=extra)
    second = None
    acked: list[int] = []
    try:
        with Peer(url) as raw:
            identity = raw.ok({"type": "hello"})["identity"]
            ids = {}
            for i in range(400):
                desc, data = encode(np.full(8, i, np.int64))
                ids[raw.send({"type": "put", "tensors": [{"key": f"k{i}", **desc, "frame": 0}]}, [data])] = i
            while len(acked) < 150:
                reply = raw.recv()
                assert reply.kind == "ok", reply
                acked.append(ids[reply["re"]])
            os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        second = start(worker, "durable", listen=url, extra=extra)
        with Peer(url) as raw:
            assert raw.ok({"type": "hello", "identity": identity})["identity"] == identity
            got = raw.get([f"k{i}" for i in acked], keep=True)
        assert [int(a[0]) for a in got] == acked
    finally:
        first.close()
        if second is not None:
            second.close()


@pytest.mark.parametrize("worker", KINDS)
def test_a_write_that_fails_in_a_burst_refuses_only_its_own_put(tmp_path, worker):
    """One put of a pipelined burst cannot be written (its temporary file's name is taken by a directory):
    that put is answered with the error and not kept; the others of the burst are acknowledged and survive
    kill -9."""
    from tests.conformance.wire import encode

    worker = _worker_kind(worker)
    url = f"ipc://{tmp_path}/w.ipc"
    root = tmp_path / "state"
    extra = ["--state-dir", str(root)]
    first = start(worker, "durable", listen=url, extra=extra)
    second = None
    try:
        with Peer(url) as raw:
            identity = raw.ok({"type": "hello"})["identity"]
            raw.put("first", np.zeros(2, np.int64))
            (owner_dir,) = (root / "tensors").iterdir()
            blocker = owner_dir / f".tmp-{statefiles.digest('bad')}.t"
            blocker.mkdir()
            ids = {}
            for key in ["a", "bad", "b"]:
                desc, data = encode(np.full(4, len(key), np.int64))
                ids[raw.send({"type": "put", "tensors": [{"key": key, **desc, "frame": 0}]}, [data])] = key
            replies = {ids[r["re"]]: r for r in (raw.recv() for _ in ids)}
            assert replies["a"].kind == "ok" and replies["b"].kind == "ok", replies
            assert replies["bad"].kind == "error" and replies["bad"]["code"] == "internal", replies["bad"]
            assert "tensor 'bad' not kept" in replies["bad"]["message"]
            raw.error({"type": "get", "keys": ["bad"]}, code="unknown_tensor")
            os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
        blocker.rmdir()
        second = start(worker, "durable", listen=url, extra=extra)
        with Peer(url) as raw:
            assert raw.ok({"type": "hello", "identity": identity})["identity"] == identity
            assert [a.tolist() for a in raw.get(["first", "a", "b"], keep=True)] == [[0, 0], [1] * 4, [1] * 4]
            raw.error({"type": "get", "keys": ["bad"]}, code="unknown_tensor")
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_client_removed_whole_in_a_group_leaves_no_fsync_of_its_gone_directory(tmp_path):
    # A burst that removes one of a client's tensors (its directory waits for the group's fsync) and then
    # the whole client (--idle-ttl): the commit must not fsync the removed directory (that would fail and
    # stop the worker with EXIT_NOT_DURABLE).
    state = StateDir.open(tmp_path / "s")
    try:
        state.save_tensor(b"alice", "a", np.ones(2, F32), [], False, 0)
        state.save_tensor(b"alice", "b", np.ones(2, F32), [], False, 0)
        state.group()
        state.remove_tensors(b"alice", ["a"])
        state.remove_owner(b"alice")
        state.writes._commit()  # the commit's own work, which raises where commit() would exit the worker
        assert not state.dirty and list((tmp_path / "s" / "tensors").iterdir()) == []
    finally:
        state.close()
