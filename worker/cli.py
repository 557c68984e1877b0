"""plan-worker: serve a Service over ZeroMQ. Never imports torch: onnxruntime alone runs the plans.

``plan-worker --listen URL ...`` serves; ``plan-worker keys DIR`` makes a CURVE key pair; ``plan-worker
status ADDR`` shows a live worker to its operator. A configuration error is one line on stderr and exit
status 2, before anything is bound.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import socket
import stat
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import msgspec
import numpy as np
import onnxruntime as ort
import zmq

from planwire.transport.framing import DEFAULT_LIMITS
from planwire.transport.messages import PROTOCOL_VERSION
from planwire.transport.server import Server
from planwire.transport.sockets import tune_io_threads
from planwire.worker.sandbox import Sandbox
from planwire.worker.service import Service
from planwire.worker.supervisor import Supervisor

log = logging.getLogger("planwire.worker")

EXAMPLE = """\
example:
  plan-worker --listen tcp://0.0.0.0:5555 --id hospital-a --data scans.npz:train \\
      --curve-secret keys/worker.key_secret --curve-clients keys/clients --metrics 127.0.0.1:9105

other commands:
  plan-worker keys DIR [--name NAME]   make a CURVE key pair (NAME.key public, NAME.key_secret secret)
  plan-worker status ADDR              show a live worker (ADDR: its admin socket, logged at start)
  plan-worker review PLAN|FINGERPRINT  review a plan (a file, or one this worker kept) and print a policy snippet
  plan-worker check [--device DEVICE]  check where plans would run: provider, device name and memory
                                       (also: plan-worker --device cuda --check)
"""


class ConfigError(Exception):
    """A configuration mistake: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (and exit status 2), pointing at --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with each option's default (when it has a meaningful one) and the epilog's layout kept."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def version() -> str:
    try:
        return metadata.version("planwire")
    except metadata.PackageNotFoundError:  # running from a source tree
        from planwire import __version__

        return __version__


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


DEFAULT_MAX_PLANS_DIR_MB = 1024  # --plans-dir cap: plans are at most --max-plan-mb each


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


def check_listen(url: str) -> None:
    """``tcp://HOST:PORT`` or ``ipc://PATH``; an ipc path held by a live process is refused, a stale one
    (left by a worker that died) is taken over."""
    if url.startswith("tcp://"):
        host, sep, port = url[6:].rpartition(":")
        if not (host and sep and (port == "*" or (port.isdigit() and int(port) < 65536))):
            raise ConfigError(f"--listen {url!r}: expected tcp://HOST:PORT (e.g. tcp://0.0.0.0:5555)")
        return
    if not url.startswith("ipc://") or len(url) == 6:
        raise ConfigError(f"--listen {url!r}: expected tcp://HOST:PORT or ipc://PATH (e.g. tcp://0.0.0.0:5555)")
    check_ipc_free(url, "--listen")


def check_ipc_free(url: str, flag: str) -> None:
    """Refuse an ipc path where something answers (another worker) or that is not a socket."""
    path = url[6:]
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{flag} {url!r}: {path} exists and is not a socket: choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("%s %s: taking over a stale socket (nothing answers there)", flag, url)
        return
    except OSError as e:
        raise ConfigError(f"{flag} {url!r}: cannot probe {path} ({e.strerror or e})") from None
    finally:
        probe.close()
    raise ConfigError(f"{flag} {url!r}: a live process (another worker?) answers there: stop it or choose another path")


def bind_error(urls: list[str], e: zmq.ZMQError) -> ConfigError:
    """One line naming the endpoint that could not be bound (pyzmq puts it in the message) and what to do."""
    found = re.search(r"\(addr='(.*)'\)", e.strerror or "")
    url = found.group(1) if found else ", ".join(urls)
    reason = re.sub(r"\s*\(addr=.*\)$", "", e.strerror or str(e))
    hint = {
        errno.EADDRINUSE: "another process holds this port: stop it or choose another port",
        errno.EADDRNOTAVAIL: "this machine has no such address: use one of its own, or 0.0.0.0 for all",
        errno.ENODEV: "no such host or interface here: use one of this machine's addresses, or 0.0.0.0 for all",
        errno.EACCES: "not allowed: ports below 1024 need privileges, or the path is not writable",
        errno.ENOENT: "the directory of the ipc path does not exist",
    }.get(e.errno, "check the address")
    return ConfigError(f"cannot listen on {url!r}: {reason} ({hint})")


LOOPBACK_HOSTS = ("localhost", "::1", "[::1]")


def is_loopback(url: str) -> bool:
    """Whether a --listen URL is reachable only from this machine (ipc, or tcp on a loopback address)."""
    if not url.startswith("tcp://"):
        return True
    host = url[6:].rpartition(":")[0]
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def check_network(args: argparse.Namespace) -> list[str]:
    """Secure by default: a worker reachable from the network needs CURVE, or --insecure said out loud.
    Returns the endpoints left open to the network without CURVE (to warn about once bound)."""
    exposed = [u for u in args.listen if not is_loopback(u)]
    if exposed and not args.curve_secret and not args.insecure:
        raise ConfigError(
            f"--listen {exposed[0]!r} is reachable from the network, and without CURVE anyone who reaches it "
            "can connect and read the traffic: make keys with 'plan-worker keys keys' (the worker's) and "
            "'plan-worker keys keys/clients --name alice' (one per client; give each its .key_secret), then add "
            "--curve-secret keys/worker.key_secret --curve-clients keys/clients; or pass --insecure on a network "
            "you trust"
        )
    return exposed if not args.curve_secret else []


DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def duration(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``15m``, ``12h`` or ``1d``."""
    found = DURATION.fullmatch(text.strip())
    if not found or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive duration such as 3600, 90s, 15m, 12h or 1d, got {text!r}")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def parse_metrics(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics {text!r}: expected HOST:PORT (e.g. 127.0.0.1:9105)")
    return host.strip("[]") or "0.0.0.0", int(port)


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
    ap = _Parser(
        prog="plan-worker",
        description="Serve planwire plans over ZeroMQ.",
        formatter_class=_Formatter,
        epilog=EXAMPLE,
    )
    ap.add_argument(
        "--version",
        action="version",
        version=f"plan-worker {version()} (protocol {PROTOCOL_VERSION}, onnxruntime {ort.__version__})",
    )
    ap.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="URL",
        help="endpoint to bind, tcp://HOST:PORT or ipc://PATH (repeatable)",
    )
    ap.add_argument("--id", default="worker", help="worker id reported to clients")
    ap.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where plans run: cpu, cuda, cuda:N (CUDA device N; refused at start unless onnxruntime-gpu runs "
        "there: see plan-worker check), auto (cuda if onnxruntime has its provider)",
    )
    ap.add_argument(
        "--gpu-mem-limit",
        type=int,
        default=0,
        metavar="MB",
        help="cap the CUDA provider's memory arena at this many MiB (its gpu_mem_limit); 0: no cap",
    )
    ap.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE[:TAG,...]",
        help="a .npy/.npz file of this worker's own tensors (repeatable)",
    )
    ap.add_argument("--public", action="store_true", help="let clients copy the worker's own data")
    ap.add_argument(
        "--idle-ttl",
        type=duration,
        default="1d",
        metavar="DURATION",
        help="free the tensors and plans of a client not seen for this long (e.g. 3600, 90s, 15m, 12h, 1d)",
    )
    ap.add_argument(
        "--policy",
        metavar="FILE",
        help="the data owner's release rules (TOML): approved plans and which private-derived outputs may leave "
        "(none without it); SIGHUP reloads it",
    )
    ap.add_argument(
        "--plans-dir",
        metavar="DIR",
        help="where a worker with private data keeps every plan it receives, by fingerprint, for "
        "'plan-worker review' ('none': not kept; default: $XDG_STATE_HOME/planwire/plans)",
    )
    ap.add_argument(
        "--max-plans-dir-mb",
        type=positive_float,
        default=DEFAULT_MAX_PLANS_DIR_MB,
        metavar="MB",
        help="cap of --plans-dir (MiB): beyond it the kept plans least recently received that are neither "
        "registered nor approved by the policy are removed (logged)",
    )
    ap.add_argument(
        "--audit", metavar="FILE", help="append one JSON line per release or refusal of private-derived data"
    )
    ap.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without CURVE (anyone who reaches it can connect and read traffic)",
    )
    ap.add_argument("--threads", type=positive_int, default=1, help="onnxruntime intra-op threads per plan")
    ap.add_argument("--max-message-mb", type=positive_int, default=1024, help="largest message accepted (MiB)")
    ap.add_argument("--max-plan-mb", type=positive_int, default=512, help="largest plan accepted (MiB)")
    ap.add_argument(
        "--max-store-mb", type=positive_int, default=4096, help="clients' tensors on this worker, all together (MiB)"
    )
    ap.add_argument(
        "--max-client-store-mb", type=positive_int, default=None, help="one client's tensors (MiB; default: all)"
    )
    ap.add_argument("--max-plans", type=positive_int, default=1000, help="plans registered at once")
    ap.add_argument(
        "--max-client-queue",
        type=positive_int,
        default=10_000,
        help="queued requests and unread replies per client (messages); past it its replies are dropped",
    )
    ap.add_argument(
        "--max-connections",
        type=positive_int,
        default=None,
        help="open client connections (default: the open-file limit, raised to its maximum, less a reserve)",
    )
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
        "--state-dir",
        metavar="DIR",
        help="keep tensors, plans, client identities and the session in DIR (written before each reply), so a "
        "worker restarted on DIR after a crash or kill -9 has them all back under the same session",
    )
    ap.add_argument(
        "--state-sync",
        choices=["fsync", "none"],
        default="fsync",
        help="with --state-dir: fsync each change before the reply (survives a power loss), or none (faster; "
        "survives the worker's crash or kill -9, not the machine's)",
    )
    ap.add_argument(
        "--host-copy-after",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="a result the runner holds on its device gets a host copy once kept this long while the worker is "
        "idle (so it survives the runner even then); 0: only when read or before a later run; default 1",
    )
    ap.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run plans inside the worker process (faster tiny calls; for trusted plans only: a crashing "
        "plan takes the worker and its data down, and --run-timeout/--max-run-memory-mb do not apply)",
    )
    ap.add_argument("--curve-secret", metavar="FILE", help="zmq.auth secret key file: encrypt with CURVE")
    ap.add_argument("--curve-clients", metavar="DIR", help="directory of allowed client public keys (*.key)")
    ap.add_argument(
        "--curve-any-client",
        action="store_true",
        help="with --curve-secret: encrypt but admit any client key (no authentication)",
    )
    ap.add_argument(
        "--admin",
        metavar="URL",
        help="operator's status socket: ipc://PATH or loopback tcp; 'none' turns it off "
        "(default: a 0600 ipc socket in $XDG_RUNTIME_DIR/planwire or $TMPDIR/planwire-UID)",
    )
    ap.add_argument(
        "--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP (e.g. 127.0.0.1:9105; off if unset)"
    )
    ap.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log detail (to stderr)"
    )
    return ap.parse_args(argv)


def check_curve(args: argparse.Namespace) -> None:
    """Half a CURVE configuration is refused: it would run unencrypted, or admit any key, by surprise."""
    if args.curve_clients and not args.curve_secret:
        raise ConfigError(
            "--curve-clients needs --curve-secret (the worker's secret key): without it nothing is encrypted "
            "or authenticated"
        )
    if args.curve_any_client and not args.curve_secret:
        raise ConfigError("--curve-any-client needs --curve-secret (the worker's secret key)")
    if args.curve_secret and args.curve_clients and args.curve_any_client:
        raise ConfigError("--curve-clients and --curve-any-client contradict each other: choose one")
    if args.curve_secret and not (args.curve_clients or args.curve_any_client):
        raise ConfigError(
            "--curve-secret needs --curve-clients DIR (the client keys to admit), or --curve-any-client to "
            "encrypt without authenticating clients"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return keys_main(argv[1:])
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    if argv[:1] == ["check"] or "--check" in argv:
        return check_main([a for a in argv if a != "--check"][1 if argv[:1] == ["check"] else 0 :])
    if argv[:1] == ["review"]:
        from planwire.worker.review import main as review_main

        return review_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cleanup: list = []
    try:
        return serve(args, cleanup)
    except ConfigError as e:  # every configuration error exits with 2 and one clear line
        print(f"plan-worker: {e}", file=sys.stderr)
        return 2
    finally:
        for close in reversed(cleanup):
            close()


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
            log.info("device %s: %s", service.device, _device_words(found))
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
    if sandbox is not None:
        stats.device = sandbox.copies
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
            "plans run in a sandboxed runner process: --run-timeout %g s, --max-run-memory-mb %d",
            args.run_timeout,
            args.max_run_memory_mb,
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
            Supervisor(service, server, sandbox).serve_forever()  # plans run in the sandbox, never here
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


def check_main(argv: list[str]) -> int:
    """``plan-worker check [--device DEVICE]``: where plans would run, or one line saying why they cannot."""
    ap = _Parser(
        prog="plan-worker check",
        description="Check where this worker's plans would run: the onnxruntime provider, the device's name and "
        "memory. Exits 1 with one line naming the reason when the device is not usable.",
        formatter_class=_Formatter,
        epilog="example:\n  plan-worker check --device cuda\n  plan-worker --device cuda:1 --check",
    )
    ap.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--gpu-mem-limit", type=int, default=0, metavar="MB", help="the arena cap to check with")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args, _ = ap.parse_known_args(argv)  # the other options of a serving command line are ignored
    from planwire.worker.device import Device, check_device

    try:
        found = check_device(Device.parse(args.device, args.gpu_mem_limit))
    except (RuntimeError, ValueError) as e:
        print(f"plan-worker check: {e}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(found))
    else:
        print(f"provider     {found['provider']}")
        print(f"device       {found['device']}: {_device_words(found)}")
        print(f"onnxruntime  {found['onnxruntime']}")
    return 0


def _device_words(found: dict) -> str:
    words = f"{found['name']}, {found['memory_bytes'] >> 20} MiB"
    if found.get("cores"):
        words += f", {found['cores']} cores"
    if found.get("gpu_mem_limit_bytes"):
        words += f" (arena capped at {found['gpu_mem_limit_bytes'] >> 20} MiB)"
    return words


def keys_main(argv: list[str]) -> int:
    """``plan-worker keys DIR [--name NAME]``: a CURVE key pair with zmq.auth."""
    ap = _Parser(
        prog="plan-worker keys",
        description="Make a CURVE key pair: NAME.key (public: give it to peers) and NAME.key_secret (keep it).",
        formatter_class=_Formatter,
        epilog="example:\n  plan-worker keys keys --name worker\n  plan-worker keys keys/clients --name alice",
    )
    ap.add_argument("dir", metavar="DIR", help="directory to write the keys into (created if missing)")
    ap.add_argument("--name", default="worker", help="file name of the pair")
    args = ap.parse_args(argv)
    from planwire.transport.auth import create_keys

    try:
        public, secret = create_keys(args.dir, args.name)
    except (OSError, ValueError) as e:
        print(f"plan-worker keys: {e}", file=sys.stderr)
        return 2
    print(f"public key {public}\nsecret key {secret} (mode 0600: keep it, never send it)")
    return 0


def status_main(argv: list[str]) -> int:
    """``plan-worker status ADDR``: what a live worker holds and did, from its admin socket."""
    ap = _Parser(
        prog="plan-worker status",
        description="Show a live worker: id, uptime, clients, their tensors and plans, runs, releases.",
        formatter_class=_Formatter,
        epilog="example:\n  plan-worker status ipc:///run/user/1000/planwire/worker-4242.admin",
    )
    ap.add_argument("addr", metavar="ADDR", help="the worker's admin socket (its log says 'admin on ADDR')")
    ap.add_argument("--json", action="store_true", help="print the status as JSON")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    args = ap.parse_args(argv)
    import msgspec

    from planwire.worker.admin import format_status, query

    try:
        st = query(args.addr, timeout=args.timeout)
    except ConnectionError as e:
        print(f"plan-worker status: {e}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(st).decode() if args.json else format_status(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
