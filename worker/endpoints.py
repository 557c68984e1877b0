"""Where plan-worker listens: each endpoint checked before anything is bound (a live process on an ipc path
is refused, a stale socket taken over; a network endpoint needs CURVE or --insecure), a failed bind said
in one line, and the open-file limit that client connections need.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import socket
import stat

import zmq

from planwire.worker.options import ConfigError

log = logging.getLogger("planwire.worker")


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
