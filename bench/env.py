"""The processes a benchmark run talks to, started on demand and always stopped.

- plan-workers (``WorkerProcess``) on tcp and ipc loopback, one per transport, plus a client each;
- raw pyzmq echo servers (``bench.echo``) bound on tcp and ipc: one whose I/O threads (and its clients')
  are scheduled as planwire's, one at the default scheduling;
- a torch.distributed.rpc peer (``bench.rpcpeer``, rank 1) with this process as rank 0, TensorPipe
  restricted to its tcp transport ("uv"): its default shared-memory transport busy-polls a whole core
  per process even when idle, which on a 2-core host would starve everything else measured here.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import zmq

from bench.machine import io_thread_policies
from planwire.transport.remote import RemoteWorker
from planwire.transport.sockets import IO_SCHED_ENV, configure
from planwire.worker.process import WorkerProcess

RPC_PEER = "peer"
ROOT = Path(__file__).resolve().parent.parent  # children run ``-m bench.*`` from here, wherever we started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ready(cmd: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` (stdout piped) and return it with its first stdout line; bounded by ``timeout``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if line:
                return proc, line.strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2:4]} exited with {proc.returncode} before it was ready")
    stop_process(proc)
    raise TimeoutError(f"{cmd[2:4]} not ready within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bounded(fn: Any, timeout: float, what: str) -> None:
    """Run ``fn`` in a daemon thread; TimeoutError if it has not returned within ``timeout`` s."""
    err: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            err.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout} s")
    if err:
        raise err[0]


class Env:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="planwire-bench-"))
        self.ctx = zmq.Context()
        self._workers: dict[str, tuple[WorkerProcess, RemoteWorker]] = {}
        self._echo: dict[tuple[bool, bool], subprocess.Popen] = {}
        self.echo_urls: dict[tuple[str, bool, bool], str] = {}
        self._echo_socks: dict[tuple[str, bool, bool, str], zmq.Socket] = {}
        self._tuned_ctx: zmq.Context | None = None
        self._rpc_peer: subprocess.Popen | None = None
        self.client_io_threads: list[str] = []
        self.providers: list[str] = []  # onnxruntime providers the workers report
        self.rpc_started = False
        self.run = 1  # which run of `python -m bench --runs N` this is (1-based): families may rotate by it
        self._prestart: threading.Thread | None = None
        self._prestart_error: BaseException | None = None

    # -- started ahead -------------------------------------------------------------------------------

    def prestart(self, families: set[str]) -> None:
        """Start, in a background thread, the processes ``families`` will ask for (plan-workers, echo servers,
        the torch.rpc peer), so that their start-ups overlap with each other and with the families' own
        imports instead of running one after the other. Nothing is timed while it runs: every method that
        hands out one of these processes waits for the thread first (``ready``)."""
        tasks: list[Any] = []
        if families & {"latency", "communication", "bulk", "pipelining", "training"}:
            tasks += [lambda: self.worker("tcp"), lambda: self.worker("ipc")]
        if families & {"latency", "pipelining"}:
            tasks.append(lambda: self.worker("tcp", io_sched="default"))
        if families & {"latency", "bulk", "node"}:
            tasks += [lambda: self._echo_server(True, False), lambda: self._echo_server(False, False)]
        if "latency" in families:
            tasks.append(lambda: self._echo_server(True, True))
        rpc = bool(families & {"latency", "communication", "bulk"})
        if not tasks and not rpc:
            return

        def run() -> None:
            try:
                peer = self._start_rpc_peer() if rpc else None  # its torch import overlaps the starts below
                for task in tasks:
                    task()
                if peer is not None:
                    self._join_rpc(peer)
            except BaseException as e:  # noqa: BLE001 - raised again by ready()
                self._prestart_error = e

        self._prestart = threading.Thread(target=run, name="bench-prestart", daemon=True)
        self._prestart.start()

    def ready(self) -> None:
        """Wait for the processes started ahead (``prestart``); a failure there is raised here."""
        if self._prestart is not None and self._prestart is not threading.current_thread():
            self._prestart.join()
            self._prestart = None
            if self._prestart_error is not None:
                err, self._prestart_error = self._prestart_error, None
                raise err

    # -- plan-workers -------------------------------------------------------------------------------

    def listen_url(self, transport: str, name: str) -> str:
        return "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{self.tmp}/{name}.ipc"

    def worker(self, transport: str, io_sched: str = "batch") -> RemoteWorker:
        """The plan-worker for ``transport`` and a client to it. ``io_sched="default"``: a second worker and
        client whose ZeroMQ I/O threads keep the default scheduling (PLANWIRE_IO_SCHED=default), to show
        what planwire's SCHED_BATCH I/O threads change, in the same run."""
        self.ready()
        key = transport if io_sched == "batch" else f"{transport}/{io_sched}"
        if key not in self._workers:
            old = os.environ.get(IO_SCHED_ENV)
            os.environ[IO_SCHED_ENV] = io_sched
            try:
                proc = WorkerProcess(
                    f"bench-{transport}-{io_sched}", listen=self.listen_url(transport, key.replace("/", "-"))
                )
            finally:
                if old is None:
                    del os.environ[IO_SCHED_ENV]
                else:
                    os.environ[IO_SCHED_ENV] = old
            try:  # the default client context is tuned by planwire; an untuned one is a plain zmq.Context
                client = RemoteWorker(proc.url, timeout=60, context=None if io_sched == "batch" else self.ctx)
            except BaseException:
                proc.close()
                raise
            self._workers[key] = (proc, client)
            self.providers = client.providers
            if io_sched == "batch" and not self.client_io_threads:
                self.client_io_threads = io_thread_policies()  # only planwire's default context has started
        return self._workers[key][1]

    def private_worker(self, transport: str, data: Any, fingerprint: str, output: str) -> RemoteWorker:
        """A plan-worker whose own data is ``data`` (private), with a policy that approves plan
        ``fingerprint`` and releases ``output`` as it is, and an audit log (the owner's set-up); a client."""
        self.ready()
        key = f"{transport}/private"
        if key not in self._workers:
            import numpy as np

            secret, policy, audit = self.tmp / "secret.npy", self.tmp / "policy.toml", self.tmp / "audit.jsonl"
            np.save(secret, np.asarray(data))
            policy.write_text(f'[[plan]]\nfingerprint = "{fingerprint}"\nname = "bench"\noutputs.{output} = "as_is"\n')
            extra = ["--policy", str(policy), "--audit", str(audit), "--plans-dir", "none"]
            proc = WorkerProcess(
                f"bench-{transport}-private",
                listen=self.listen_url(transport, "private"),
                data=[f"{secret}:private"],
                extra=extra,
            )
            try:
                client = RemoteWorker(proc.url, timeout=60)
            except BaseException:
                proc.close()
                raise
            self._workers[key] = (proc, client)
        return self._workers[key][1]

    def worker_pid(self, transport: str) -> int:
        self.worker(transport)
        return self._workers[transport][0].proc.pid

    # -- raw pyzmq echo -----------------------------------------------------------------------------

    def echo(self, transport: str, tuned: bool = True, client: str = "", hop: bool = False) -> zmq.Socket:
        """A DEALER (planwire's socket options) connected to the echo server over ``transport``; ``tuned``:
        both ends' I/O threads scheduled as planwire's are (as the plan-workers and clients here); untuned:
        a second server and a plain client context, both at the default scheduling. Each ``client`` name gets
        a DEALER of its own (the server keeps per-peer replies: see bench.echo). ``hop``: a server of its own
        that passes each message through a second process and back (bench.echo ``--hop``)."""
        self.ready()
        self._echo_server(tuned, hop)
        if (transport, tuned, hop, client) not in self._echo_socks:
            ctx = self.ctx
            if tuned:
                if self._tuned_ctx is None:
                    from planwire.transport.sockets import tune_io_threads

                    self._tuned_ctx = zmq.Context()
                    tune_io_threads(self._tuned_ctx)
                ctx = self._tuned_ctx
            s = ctx.socket(zmq.DEALER)
            configure(s)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self.echo_urls[transport, tuned, hop])
            self._echo_socks[transport, tuned, hop, client] = s
        return self._echo_socks[transport, tuned, hop, client]

    def echo_pid(self, tuned: bool = True, hop: bool = False) -> int:
        """The process id of the echo server that ``echo(..., tuned, hop=hop)`` talks to (started if it is not
        running): for reading its CPU time."""
        self._echo_server(tuned, hop)
        return self._echo[tuned, hop].pid

    def _echo_server(self, tuned: bool, hop: bool) -> None:
        if (tuned, hop) not in self._echo:
            flag = ["--tuned"] if tuned else []
            name = "echo-tuned" if tuned else "echo"
            if hop:
                flag, name = [*flag, "--hop"], name + "-hop"
            cmd = [sys.executable, "-m", "bench.echo", *flag, "tcp://127.0.0.1:0", f"ipc://{self.tmp}/{name}.ipc"]
            self._echo[tuned, hop], line = spawn_ready(cmd, 30)
            tcp, ipc = line.removeprefix("ready on ").split()
            self.echo_urls.update({("tcp", tuned, hop): tcp, ("ipc", tuned, hop): ipc})

    # -- torch.distributed.rpc ------------------------------------------------------------------------

    def rpc(self) -> str:
        """Name of the rpc peer; this process joins the group as rank 0 on first use."""
        self.ready()
        if not self.rpc_started:
            self._join_rpc(self._start_rpc_peer())
        return RPC_PEER

    def _start_rpc_peer(self) -> int:
        """Start the rank-1 peer process (it waits for rank 0); returns the port."""
        port = free_port()
        cmd = [sys.executable, "-m", "bench.rpcpeer", "--port", str(port), "--rank", "1", "--transport", "uv"]
        self._rpc_peer = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        return port

    def _join_rpc(self, port: int) -> None:
        """This process joins the group as rank 0."""
        warnings.filterwarnings("ignore", module="torch.distributed")
        import torch.distributed.rpc as rpc

        from bench.rpcpeer import options

        bounded(
            lambda: rpc.init_rpc("caller", rank=0, world_size=2, rpc_backend_options=options(port, "uv")),
            120,
            "torch.distributed.rpc init",
        )
        self.rpc_started = True

    def rpc_isolated_tiny(self, transport: str, runs: int) -> list[float]:
        """Tiny rpc_sync latency timed by two fresh processes using ``transport``, alone."""
        import json

        port = free_port()
        base = [sys.executable, "-m", "bench.rpcpeer", "--port", str(port), "--transport", transport]
        peer = subprocess.Popen([*base, "--rank", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            out = subprocess.run(
                [*base, "--rank", "0", "--tiny", str(runs)], capture_output=True, text=True, timeout=180, cwd=ROOT
            )
            peer.wait(30)
        finally:
            stop_process(peer)
        lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"rpc {transport} run failed: {out.stderr[-500:]}")
        return json.loads(lines[-1])

    # -- teardown -------------------------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(BaseException):
            self.ready()
        if self.rpc_started:
            import torch.distributed.rpc as rpc

            with contextlib.suppress(Exception):
                bounded(lambda: rpc.shutdown(graceful=True), 60, "torch.distributed.rpc shutdown")
            self.rpc_started = False
        if self._rpc_peer is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._rpc_peer.wait(10)
            stop_process(self._rpc_peer)
        for s in self._echo_socks.values():
            s.close(0)
        for proc in self._echo.values():
            stop_process(proc)
        if self._tuned_ctx is not None:
            self._tuned_ctx.term()
        for proc, client in self._workers.values():
            with contextlib.suppress(Exception):
                client.close()
            proc.close()
        self.ctx.term()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
