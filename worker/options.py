"""The plan-worker command line: its options, how each value is parsed, and the checks of a configuration
that need nothing bound yet. A mistake is one line (``ConfigError``, or argparse's) and exit status 2.
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata
from typing import NoReturn

import onnxruntime as ort

from planwire.transport.messages import PROTOCOL_VERSION

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
    return _positive(int, "whole number", text)


def positive_float(text: str) -> float:
    return _positive(float, "number", text)


def _positive(kind: type, what: str, text: str):  # noqa: ANN202  (int or float, as ``kind``)
    """``text`` as a positive finite ``kind``, or argparse's error naming what it must be."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive {what}, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive {what}, got {text if kind is float else value}")
    return value


def command(prog: str, description: str, *examples: str) -> argparse.ArgumentParser:
    """The parser of a ``plan-worker`` sub-command: one-line errors, defaults in its help, its examples."""
    return _Parser(
        prog=prog,
        description=description,
        formatter_class=_Formatter,
        epilog="example:\n" + "\n".join(f"  {e}" for e in examples),
    )


DEFAULT_MAX_PLANS_DIR_MB = 1024  # --plans-dir cap: plans are at most --max-plan-mb each


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
    ap.add_argument(
        "--no-nchwc",
        dest="nchwc",
        action="store_false",
        help="run plans' convolutions on onnxruntime's generic Conv (default: a plan's eligible Convs run as "
        "onnxruntime's NCHWc kernels on CPU, the worker rewriting its graph; for A/B)",
    )
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
        "--direct-max-mb",
        type=float,
        default=8.0,
        metavar="MB",
        help="a run of a plan of float arithmetic only (no integer tensors, no op that sizes its output from "
        "data, no loops, subgraphs or functions) whose values all fit in MB and whose FLOPs are at most 2e6 runs "
        "in the worker process itself, skipping the sandbox's hop (it can neither crash, loop nor allocate "
        "more); 0: every run goes to the sandbox; default 8",
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
