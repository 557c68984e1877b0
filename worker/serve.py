"""``plan-worker --listen URL ...``: build the Service the options describe and serve it (plans in the
sandboxed runner unless --no-sandbox), with its admin socket, metrics, state directory and policy.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort
import zmq

from planwire.transport.framing import DEFAULT_LIMITS
from planwire.transport.messages import PROTOCOL_VERSION
from planwire.transport.server import Server
from planwire.transport.sockets import tune_io_threads
from planwire.worker.device import describe
from planwire.worker.direct import DirectLane
from planwire.worker.endpoints import (
    FD_RESERVE,
    bind_error,
    check_ipc_free,
    check_listen,
    check_network,
    raise_open_files,
)
from planwire.worker.options import ConfigError, check_curve, parse_metrics, version
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
    expected = "expected a .npy or .npz file of numeric arrays (numpy.save / numpy.savez)"
    try:
        loaded = np.load(p)  # numpy >= 1.16.3 refuses object arrays by default: data only
    except OSError as e:
        raise ValueError(f"--data {path!r}: cannot read it ({e.strerror or e})") from None
    except (ValueError, EOFError) as e:
        # numpy reports both a Python-object file and any file that is not .npy/.npz the same way
        what = ": it holds Python objects, which a worker never loads" if "Object arrays" in str(e) else ""
        raise ValueError(f"--data {path!r}: not a plain numpy file{what}; {expected}") from None
    if isinstance(loaded, np.ndarray):
        return [(f"data:{p.name}", loaded, tags or [p.stem])]
    with loaded:
        try:
            return [(f"data:{p.name}:{k}", loaded[k], [k, *tags]) for k in loaded.files]
        except ValueError:  # an object array inside the archive: refused, never loaded
            raise ValueError(
                f"--data {path!r}: not a plain numpy file: it holds Python objects, which a worker never loads; "
                f"{expected}"
            ) from None


def serve(args: argparse.Namespace, cleanup: list) -> int:
    from planwire.worker.admin import AdminServer, check_admin_endpoint, default_admin_path
    from planwire.worker.stats import Stats

    check_curve(args)
    for url in args.listen:
        check_listen(url)
    exposed = check_network(args)
    metrics_addr = parse_metrics(args.metrics) if args.metrics else None
    if args.run_timeout <= 0:
        raise ConfigError("--run-timeout must be positive")
    if args.host_copy_after < 0:
        raise ConfigError("--host-copy-after must be 0 (off) or a positive number of seconds")
    if args.max_run_memory_mb < 0:
        raise ConfigError("--max-run-memory-mb must be 0 (no bound) or positive")
    if not 0 <= args.direct_max_mb <= 1024:
        raise ConfigError("--direct-max-mb must be between 0 (every run in the sandbox) and 1024")
    limits = msgspec.structs.replace(
        DEFAULT_LIMITS, max_message_bytes=args.max_message_mb << 20, max_plan_bytes=args.max_plan_mb << 20
    )
    try:
        admin_url = args.admin or f"ipc://{default_admin_path(args.id)}"
        if admin_url != "none":
            check_admin_endpoint(admin_url)
            if admin_url.startswith("ipc://"):
                check_ipc_free(admin_url, "--admin")
        curve_secret = None
        if args.curve_secret:
            from planwire.transport.auth import check_clients_dir, load_secret

            curve_secret = load_secret(args.curve_secret)
            if args.curve_clients:
                check_clients_dir(args.curve_clients)
        data = [item for spec in args.data for item in load_data(spec)]
        from planwire.worker.review import default_plans_dir

        plans_dir = (
            None if args.plans_dir == "none" else Path(args.plans_dir) if args.plans_dir else default_plans_dir()
        )
        policy = None
        if args.policy:
            from planwire.worker.policy import load

            policy = load(args.policy)
        if args.audit:
            try:
                open(args.audit, "a").close()
            except OSError as e:
                raise ValueError(f"--audit {args.audit!r}: cannot append to it ({e.strerror or e})") from None
        service = Service(
            args.id,
            data=data,
            public=args.public,
            device=args.device,
            gpu_mem_limit=args.gpu_mem_limit,
            threads=args.threads,
            nchwc=args.nchwc,
            limits=limits,
            max_plans=args.max_plans,
            max_store_bytes=args.max_store_mb << 20,
            max_client_store_bytes=None if args.max_client_store_mb is None else args.max_client_store_mb << 20,
            curve=curve_secret is not None,
            idle_ttl=args.idle_ttl,
            policy=policy,
            audit=args.audit,
            plans_dir=plans_dir,
            max_plans_dir_bytes=int(args.max_plans_dir_mb * (1 << 20)),
        )
        cleanup.append(service.releaser.close)
        if service.device.cuda:  # a usable device, or one line naming why not, before anything is bound
            from planwire.worker.device import check_device, probe

            found = probe(service.device) if args.no_sandbox else check_device(service.device)
            log.info("device %s: %s", service.device, describe(found))
        if args.state_dir:
            restore_state(service, args.state_dir, args.state_sync == "fsync", cleanup)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    tune_io_threads(zmq.Context.instance())  # before the first socket (authenticator or server) starts them
    if curve_secret is not None:
        from planwire.transport.auth import start_authenticator

        auth = start_authenticator(args.curve_clients)
        cleanup.append(auth.stop)
    files = raise_open_files()
    try:
        server = Server(
            service.handle,
            args.listen,
            max_message_bytes=limits.max_message_bytes,
            curve_secret=curve_secret,
            max_queue=args.max_client_queue,
            max_connections=args.max_connections or max(16, files - FD_RESERVE),
        )
    except zmq.ZMQError as e:
        raise bind_error(args.listen, e) from None
    cleanup.append(server.close)
    if exposed:
        log.warning("--insecure: %s reachable from the network without CURVE", ", ".join(exposed))
    sandbox = None
    if not args.no_sandbox:
        sandbox = Sandbox(
            device=service.device,
            threads=args.threads,
            nchwc=args.nchwc,
            memory_mb=args.max_run_memory_mb,
            timeout=args.run_timeout,
            sync_after=args.host_copy_after,
        )
        cleanup.append(sandbox.close)
    service.announced["max_client_queue"] = args.max_client_queue
    if sandbox is not None:
        service.announced["run_timeout_seconds"] = args.run_timeout
        if args.max_run_memory_mb:
            service.announced["max_run_memory_bytes"] = args.max_run_memory_mb << 20
    stats = service.stats = Stats(service, curve=curve_secret is not None)
    lane = None  # tiny runs of provably harmless plans, in this process (worker/direct.py); CPU workers only
    if sandbox is not None and args.direct_max_mb > 0 and not service.device.cuda:
        direct_mb = min(args.direct_max_mb, args.max_run_memory_mb or args.direct_max_mb)  # never past a run's bound
        lane = DirectLane(max_bytes=int(direct_mb * (1 << 20)))
    if sandbox is not None:
        stats.device = sandbox.copies if lane is None else lambda: {**sandbox.copies(), **lane.counts}
    curve_mode = "off" if curve_secret is None else "any client" if args.curve_any_client else "listed clients"
    info = {
        "worker": args.id,
        "version": version(),
        "protocol": PROTOCOL_VERSION,
        "session": service.session,
        "pid": os.getpid(),
        "providers": service.providers,
        "endpoints": server.endpoints,
        "curve": curve_mode,
    }
    if metrics_addr is not None:
        try:
            port = stats.metrics.serve(*metrics_addr)
        except OSError as e:
            raise ConfigError(f"--metrics {args.metrics!r}: cannot serve there ({e.strerror or e})") from None
    if admin_url != "none":
        try:
            admin = AdminServer(admin_url, stats, info=info)
        except zmq.ZMQError as e:
            raise bind_error([admin_url], e) from None
        cleanup.append(admin.stop)
        log.info("admin on %s (plan-worker status %s)", admin.url, admin.url)
    if metrics_addr is not None:
        log.info("metrics on http://%s:%d/metrics", metrics_addr[0], port)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if args.policy:
        signal.signal(signal.SIGHUP, lambda *_: reload_policy(service, args.policy))
        log.info("policy %s: %d approved plans (SIGHUP reloads it)", args.policy, len(policy.rules))  # type: ignore[union-attr]
    if sandbox is None:
        log.warning("--no-sandbox: plans run inside this process; a crashing plan takes it down")
    else:
        log.info(
            "plans run in a sandboxed runner process: --run-timeout %g s, --max-run-memory-mb %d%s",
            args.run_timeout,
            args.max_run_memory_mb,
            f"; tiny runs of float-only plans here (--direct-max-mb {args.direct_max_mb:g})" if lane else "",
        )
    log.info(
        "plan-worker %s ready on %s (protocol %d, providers %s, onnxruntime %s, pid %d, %d own tensors, curve %s)",
        args.id,
        ", ".join(server.endpoints),
        PROTOCOL_VERSION,
        ",".join(service.providers),
        ort.__version__,
        os.getpid(),
        len(service.store),
        curve_mode,
    )
    try:
        if sandbox is None:
            server.serve_forever()
        else:
            Supervisor(service, server, sandbox, lane).serve_forever()  # plans run in the sandbox (tiny safe ones here)
    finally:
        log.info("plan-worker %s stopped", args.id)
    return 0


def restore_state(service: Service, path: str, sync: bool, cleanup: list) -> None:
    """--state-dir: hold the directory, keep the service's state there and restore what it holds."""
    from planwire.worker.state import StateDir, StateError, attach

    try:
        state = StateDir.open(path, sync=sync)
    except StateError as e:
        raise ConfigError(str(e)) from None
    cleanup.append(state.close)
    t0 = time.perf_counter()
    try:
        got = attach(service, state)
    except OSError as e:  # the directory itself unreadable (a damaged file is skipped, not fatal)
        raise ConfigError(f"--state-dir {path!r}: cannot read it ({e.strerror or e})") from None
    log.info(
        "state dir %s (%s): %s session %s; restored %d tensors (%d bytes), %d failed-run records, %d plans, "
        "%d clients (%d identities)%s in %.2f s",
        state.path,
        "fsync each change" if sync else "no fsync",
        "new" if got.new else "kept",
        got.session,
        got.tensors,
        got.tensor_bytes,
        got.failed,
        got.plans,
        got.owners,
        got.identities,
        f"; {got.skipped} damaged entries skipped (see above)" if got.skipped else "",
        time.perf_counter() - t0,
    )


def reload_policy(service: Service, path: str) -> None:
    """SIGHUP: read the policy again; a broken file keeps the one in force, and the log says why."""
    from planwire.worker.policy import PolicyError, load

    try:
        policy = load(path)
    except PolicyError as e:
        log.error("policy not reloaded, the previous one stays in force: %s", e)
        return
    service.releaser.policy = policy
    log.info("policy %s reloaded: %d approved plans", path, len(policy.rules))
