"""plan-worker: serve a Service over ZeroMQ. Never imports torch: onnxruntime alone runs the plans."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import zmq

from planwire.transport.messages import PROTOCOL_VERSION
from planwire.transport.server import Server
from planwire.transport.session import Limits
from planwire.transport.sockets import tune_io_threads
from planwire.worker.sandbox import Sandbox
from planwire.worker.service import Service
from planwire.worker.supervisor import Supervisor

log = logging.getLogger("planwire.worker")


def load_data(spec: str) -> list[tuple[str, np.ndarray, list[str]]]:
    """Tensors of one ``--data FILE[:TAG,...]``: a .npy (tags from the spec, else the file stem) or an
    .npz (each key is a tag of its array, plus the spec's tags). Never loads Python objects."""
    path, _, tag_text = spec.partition(":")
    tags = [t for t in tag_text.split(",") if t]
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--data {spec!r}: no such file {path!r}")
    try:
        loaded = np.load(p)  # numpy >= 1.16.3 refuses object arrays by default: data only
    except ValueError as e:
        raise ValueError(f"--data {path!r}: not a plain numpy file ({e})") from None
    if isinstance(loaded, np.ndarray):
        return [(f"data:{p.name}", loaded, tags or [p.stem])]
    with loaded:
        try:
            return [(f"data:{p.name}:{k}", loaded[k], [k, *tags]) for k in loaded.files]
        except ValueError as e:  # an object array inside the archive: refused, never loaded
            raise ValueError(f"--data {path!r}: not a plain numpy file ({e})") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="plan-worker", description="Serve planwire plans over ZeroMQ.")
    ap.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="URL",
        help="endpoint to bind, tcp://HOST:PORT or ipc://PATH (repeatable)",
    )
    ap.add_argument("--id", default="worker", help="worker id reported to clients")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ap.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE[:TAG,...]",
        help="a .npy/.npz file of this worker's own tensors (repeatable)",
    )
    ap.add_argument("--public", action="store_true", help="let clients copy the worker's own data")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per plan")
    ap.add_argument("--max-message-mb", type=int, default=1024, help="largest message accepted")
    ap.add_argument("--max-plan-mb", type=int, default=512, help="largest plan accepted")
    ap.add_argument(
        "--run-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="stop a run or a plan's registration after this long (plan_timeout); default 60",
    )
    ap.add_argument(
        "--max-run-memory-mb",
        type=int,
        default=2048,
        metavar="MB",
        help="memory a run or a registration may add to the sandboxed runner (out_of_memory); 0: none; default 2048",
    )
    ap.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run plans inside the worker process (faster tiny calls; for trusted plans only: a crashing "
        "plan takes the worker and its data down, and --run-timeout/--max-run-memory-mb do not apply)",
    )
    ap.add_argument("--curve-secret", metavar="FILE", help="zmq.auth secret key file: encrypt with CURVE")
    ap.add_argument("--curve-clients", metavar="DIR", help="directory of allowed client public keys")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    limits = Limits(max_message_bytes=args.max_message_mb << 20, max_plan_bytes=args.max_plan_mb << 20)
    if args.run_timeout <= 0:
        print("plan-worker: --run-timeout must be positive", file=sys.stderr)
        return 2
    if args.max_run_memory_mb < 0:
        print("plan-worker: --max-run-memory-mb must be 0 (no bound) or positive", file=sys.stderr)
        return 2
    try:  # every configuration error exits with 2 and one clear line
        data = [item for spec in args.data for item in load_data(spec)]
        service = Service(
            args.id, data=data, public=args.public, device=args.device, threads=args.threads, limits=limits
        )
    except (RuntimeError, ValueError) as e:
        print(f"plan-worker: {e}", file=sys.stderr)
        return 2
    tune_io_threads(zmq.Context.instance())  # before the first socket (authenticator or server) starts them
    auth = None
    curve_secret = None
    if args.curve_secret:
        from planwire.transport.auth import load_secret, start_authenticator

        curve_secret = load_secret(args.curve_secret)
        auth = start_authenticator(args.curve_clients)
    sandbox = None
    if not args.no_sandbox:
        sandbox = Sandbox(
            providers=service.providers,
            threads=args.threads,
            memory_mb=args.max_run_memory_mb,
            timeout=args.run_timeout,
        )
    server = Server(service.handle, args.listen, max_message_bytes=limits.max_message_bytes, curve_secret=curve_secret)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if sandbox is None:
        log.warning("--no-sandbox: plans run inside this process; a crashing plan takes it down")
    else:
        log.info(
            "plans run in a sandboxed runner process: --run-timeout %g s, --max-run-memory-mb %d",
            args.run_timeout,
            args.max_run_memory_mb,
        )
    log.info(
        "plan-worker %s ready on %s (protocol %d, providers %s, onnxruntime %s, pid %d, %d own tensors)",
        args.id,
        ", ".join(server.endpoints),
        PROTOCOL_VERSION,
        ",".join(service.providers),
        ort.__version__,
        os.getpid(),
        len(data),
    )
    try:
        if sandbox is None:
            server.serve_forever()
        else:
            Supervisor(service, server, sandbox).serve_forever()  # plans run in the sandbox, never here
    finally:
        if sandbox is not None:
            sandbox.close()
        server.close()
        if auth is not None:
            auth.stop()
        log.info("plan-worker %s stopped", args.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
