"""The operator's view of a live worker: ``plan-worker status ADDR`` over the worker's admin socket.

The admin socket is separate from the clients' endpoints (by default an ipc socket, mode 0600, in a
directory only the worker's user can enter), so only the operator can ask. Its messages are msgspec
structs framed as ``[ADMIN_SIGNATURE, JSON header]``; they are not part of the client protocol and the
main socket refuses them. A thread answers from Stats' snapshot, so status comes back even while the
worker is busy running a plan.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import zmq

from planwire.transport import messages as m
from planwire.transport.sockets import configure
from planwire.worker.peers import clean
from planwire.worker.stats import Stats

log = logging.getLogger("planwire.admin")

ADMIN_SIGNATURE = b"PWIRE-ADMIN/1"
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


class StatusRequest(msgspec.Struct, tag="status", tag_field="type", forbid_unknown_fields=True):
    """Ask for the worker's Status."""


class Holdings(msgspec.Struct):
    tensors: int
    tensor_bytes: int
    plans: int
    plan_bytes: int


class ClientStatus(Holdings):
    """A client: CURVE public key (``curve:KEY``) or connection (``ADDRESS/fdN``), what it holds and did."""

    client: str
    name: str
    requests: int
    refused: int
    idle_s: float


class OwnerStatus(Holdings):
    """An owner (worker/owners.py; named as in the audit log: ``key:KEY`` or ``conn:ID``): what it holds, when
    it was last seen, what was released to it and the privacy budget that cost (None: no noised release)."""

    owner: str
    name: str
    connections: list[str]
    idle_s: float
    last_seen: float
    releases: int
    epsilon: float | None = None
    delta: float | None = None
    requests: int = 0  # over all its connections, folded ones included
    refused: int = 0
    connections_folded: int = 0  # connections whose rows were folded into this one (gone a while)


class PlanStatus(msgspec.Struct):
    plan: str
    name: str
    bytes: int
    runs: int
    failed: int


class Status(msgspec.Struct, tag="status", tag_field="type"):
    """What a worker is, holds and did since it started."""

    worker: str
    version: str
    protocol: int
    session: str
    pid: int
    uptime_s: float
    providers: list[str]
    endpoints: list[str]
    curve: str  # "off", "listed clients", or "any client"
    own_data: Holdings
    clients: list[ClientStatus]
    plans: list[PlanStatus]
    requests: dict[str, int]
    runs: int
    runs_failed: int
    run_p50_ms: float
    run_p99_ms: float
    private_releases: int  # tensors of the worker's own data sent to clients
    owners: list[OwnerStatus] = []  # per owner (a reconnecting client is one owner, several connections)
    clients_folded: int = 0  # connection rows folded into their owners' rows (not seen for a while)
    # Tensors crossing between the supervisor's host memory and the runner's device (worker/resident.py):
    # uploads, downloads (and their bytes), host_copies made, output buffers reused, tensors lost, held now;
    # and the direct lane's direct_runs, direct_fallbacks. A Node worker reports only the lane's.
    device_copies: dict[str, int] = {}


class AdminError(msgspec.Struct, tag="error", tag_field="type"):
    message: str


_request_decoder = msgspec.json.Decoder(StatusRequest)
_reply_decoder = msgspec.json.Decoder(Status | AdminError)


def default_admin_path(worker_id: str) -> Path:
    """An ipc path only this user can reach: ``$XDG_RUNTIME_DIR/planwire`` or ``$TMPDIR/planwire-UID``."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    run_dir = Path(base) / "planwire" if base else Path(tempfile.gettempdir()) / f"planwire-{os.getuid()}"
    try:
        run_dir.mkdir(mode=0o700, exist_ok=True)
        st = run_dir.stat()
    except OSError as e:
        raise ValueError(
            f"admin directory {run_dir}: {e.strerror or e} (pass --admin ipc://PATH, or --admin none)"
        ) from None
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(f"admin directory {run_dir} is not this user's alone (mode 0700): remove it or pass --admin")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in worker_id)[:40]
    return run_dir / f"{safe}-{os.getpid()}.admin"


def check_admin_endpoint(url: str) -> None:
    """Admin endpoints are ipc:// or loopback tcp://: the operator's, never the network's."""
    if url.startswith("ipc://"):
        return
    if url.startswith("tcp://") and url[6:].rpartition(":")[0] in LOOPBACK:
        return
    raise ValueError(f"--admin {url!r}: must be ipc://PATH or tcp://127.0.0.1:PORT (the operator's, not the network's)")


class AdminServer:
    """Answers StatusRequest on ``url`` from a daemon thread until ``stop()``."""

    def __init__(self, url: str, stats: Stats, *, info: dict, context: zmq.Context | None = None) -> None:
        self.stats = stats
        self.info = info  # the fixed part of Status: worker, version, session, providers, ...
        self._sock = (context or zmq.Context.instance()).socket(zmq.ROUTER)
        configure(self._sock, max_message_bytes=1 << 16)
        old_umask = os.umask(0o177)  # the ipc socket file is created 0600
        try:
            self._sock.bind(url)
        except zmq.ZMQError:
            self._sock.close(linger=0)
            raise
        finally:
            os.umask(old_umask)
        self.url = self._sock.get_string(zmq.LAST_ENDPOINT) if url.endswith(":0") else url
        if url.startswith("ipc://"):
            os.chmod(url[6:], 0o600)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="planwire-admin", daemon=True)
        self._thread.start()

    def status(self) -> Status:
        return msgspec.convert({**self.info, **self.stats.snapshot()}, Status)

    def _answer(self, frames: list[bytes]) -> msgspec.Struct:
        if len(frames) != 2 or frames[0] != ADMIN_SIGNATURE:
            return AdminError(message=f"an admin request is [{ADMIN_SIGNATURE!r}, JSON header]")
        try:
            _request_decoder.decode(frames[1])
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return AdminError(message=f"invalid admin request: {e}")
        return self.status()

    def _serve(self) -> None:
        sock = self._sock
        sock.setsockopt(zmq.RCVTIMEO, 200)
        while not self._stop.is_set():
            try:
                peer, *frames = sock.recv_multipart()
            except zmq.Again:
                continue
            except zmq.ZMQError:  # closed under us
                break
            try:
                reply = self._answer(frames)
            except Exception as e:  # never let the operator's view take the thread down
                log.exception("admin request failed")
                reply = AdminError(message=f"{type(e).__name__}: {e}")
            try:
                sock.send_multipart([peer, ADMIN_SIGNATURE, m.encoder.encode(reply)], zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.warning("admin reply dropped: %s", e)
        sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self.url.startswith("ipc://"):  # libzmq unlinks it from its I/O thread, maybe after we exit
            Path(self.url[6:]).unlink(missing_ok=True)


def query(url: str, timeout: float = 5.0, context: zmq.Context | None = None) -> Status:
    """The Status of the worker whose admin socket is ``url``; ConnectionError says why there is none."""
    if url.startswith("ipc://") and not Path(url[6:]).exists():
        raise ConnectionError(
            f"no admin socket at {url!r}: is the worker running? (its log says 'admin on ...' at start)"
        )
    sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
    try:
        configure(sock)
        sock.connect(url)
        sock.send_multipart([ADMIN_SIGNATURE, m.encoder.encode(StatusRequest())])
        deadline = time.monotonic() + timeout
        if not sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            raise ConnectionError(f"no answer from admin socket {url!r} within {timeout:g} s (is the worker running?)")
        frames = sock.recv_multipart()
    finally:
        sock.close(linger=0)
    if len(frames) != 2 or frames[0] != ADMIN_SIGNATURE:
        raise ConnectionError(f"{url!r} is not a plan-worker admin socket")
    reply = _reply_decoder.decode(frames[1])
    if isinstance(reply, AdminError):
        raise ConnectionError(f"admin socket {url!r} refused the request: {reply.message}")
    return reply


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 86400}d {s % 86400 // 3600:02d}h {s % 3600 // 60:02d}m {s % 60:02d}s".removeprefix("0d ")


def _lanes(d: dict[str, int]) -> list[str]:
    """Where runs execute, as the worker reported it: its sandboxed runner's counts (a Python worker's runner
    holds tensors between runs: worker/handles.py) and its direct lane's (either worker); nothing it did not
    report (a Node worker reports only its lane's)."""
    lines = []
    if "held" in d:
        lines.append(
            f"device    {d['held']} tensors held by the runner; {d.get('uploads', 0)} uploads "
            f"({_size(d.get('upload_bytes', 0))}), {d.get('downloads', 0)} downloads "
            f"({_size(d.get('download_bytes', 0))}), {d.get('reused', 0)} output buffers reused, "
            f"{d.get('lost', 0)} lost; at most {d.get('in_flight_max', 0)} runs in flight to it"
        )
    if "direct_runs" in d:
        lines.append(
            f"direct    {d['direct_runs']} tiny runs in the worker process (direct lane), "
            f"{d.get('direct_fallbacks', 0)} handed to the runner after onnxruntime refused them there"
        )
    return lines


def format_status(st: Status) -> str:
    """A screen of text for an operator; peers' strings (client names, plan names) are escaped."""
    od = st.own_data
    lines = [
        f"worker    {clean(st.worker)} (planwire {st.version}, protocol {st.protocol}, pid {st.pid})",
        f"session   {st.session}",
        f"uptime    {_duration(st.uptime_s)}",
        f"listen    {', '.join(st.endpoints)}",
        f"providers {', '.join(st.providers)}",
        f"curve     {st.curve}",
        f"runs      {st.runs} served, {st.runs_failed} failed, p50 {st.run_p50_ms:.3f} ms, p99 {st.run_p99_ms:.3f} ms",
        f"own data  {od.tensors} tensors, {_size(od.tensor_bytes)}; "
        f"{st.private_releases} released to clients (private data gets)",
        "requests  " + (", ".join(f"{k} {v}" for k, v in sorted(st.requests.items())) or "none"),
        f"clients   {len(st.clients)}"
        + (f" ({st.clients_folded} earlier connections folded into their owners' rows)" if st.clients_folded else ""),
    ]
    lines[-1:-1] = _lanes(st.device_copies)
    if st.clients:
        head = f"  {'CLIENT':<48} {'NAME':<12} {'REQUESTS':>8} {'REFUSED':>7} {'TENSORS':>7} {'BYTES':>10}"
        lines.append(head + f" {'PLANS':>5} {'PLAN BYTES':>10} {'IDLE':>8}")
        for c in st.clients:
            lines.append(
                f"  {clean(c.client):<48} {clean(c.name)[:12]:<12} {c.requests:>8} {c.refused:>7} {c.tensors:>7} "
                f"{_size(c.tensor_bytes):>10} {c.plans:>5} {_size(c.plan_bytes):>10} {c.idle_s:>7.0f}s"
            )
    lines.append(f"owners    {len(st.owners)} (privacy budget: epsilon spent on noised releases, at delta)")
    if st.owners:
        head = f"  {'OWNER':<48} {'NAME':<12} {'TENSORS':>7} {'BYTES':>10} {'PLANS':>5} {'RELEASES':>8}"
        lines.append(head + f" {'EPSILON':>16} {'LAST SEEN':>19}")
        for o in st.owners:
            eps = "-" if o.epsilon is None else f"{o.epsilon:.3g} ({o.delta:g})"
            seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(o.last_seen))
            lines.append(
                f"  {clean(o.owner)[:48]:<48} {clean(o.name)[:12]:<12} {o.tensors:>7} {_size(o.tensor_bytes):>10} "
                f"{o.plans:>5} {o.releases:>8} {eps:>16} {seen:>19}"
            )
    lines.append(f"plans     {len(st.plans)}")
    for p in st.plans:
        lines.append(f"  {p.plan[:12]}  {clean(p.name)!r:<24} {_size(p.bytes):>10}  {p.runs} runs, {p.failed} failed")
    return "\n".join(lines)
