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
from planwire.worker.service import Service

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


FD_RESERVE = 256
"""File descriptors kept for everything but client connections (plans, logs, ZeroMQ's own)."""


def raise_open_files() -> int:
    """Raise the soft open-file limit to the hard one where allowed; returns the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, want, e)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


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
    ap.add_argument("--max-store-mb", type=int, default=4096, help="clients' tensors on this worker, all together")
    ap.add_argument(
        "--max-client-store-mb", type=int, default=None, help="one client's tensors (default: --max-store-mb)"
    )
    ap.add_argument("--max-plans", type=int, default=1000, help="plans registered at once")
    ap.add_argument(
        "--max-client-queue",
        type=int,
        default=10_000,
        help="queued requests and unread replies per client (messages); past it its replies are dropped",
    )
    ap.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="open client connections (default: the open-file limit, raised to its maximum, less a reserve)",
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
    try:  # every configuration error exits with 2 and one clear line
        data = [item for spec in args.data for item in load_data(spec)]
        service = Service(
            args.id,
            data=data,
            public=args.public,
            device=args.device,
            threads=args.threads,
            limits=limits,
            max_plans=args.max_plans,
            max_store_bytes=args.max_store_mb << 20,
            max_client_store_bytes=None if args.max_client_store_mb is None else args.max_client_store_mb << 20,
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
    files = raise_open_files()
    server = Server(
        service.handle,
        args.listen,
        max_message_bytes=limits.max_message_bytes,
        curve_secret=curve_secret,
        max_queue=args.max_client_queue,
        max_connections=args.max_connections or max(16, files - FD_RESERVE),
    )

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
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
        server.serve_forever()
    finally:
        server.close()
        if auth is not None:
            auth.stop()
        log.info("plan-worker %s stopped", args.id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
