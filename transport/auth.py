"""CURVE encryption and client authentication with zmq.auth (``zmq.auth.create_certificates`` keys)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

log = logging.getLogger("planwire.auth")


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a zmq.auth certificate file; ValueError says what is wrong and what to do."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {path!r}: is a directory, not a key file (NAME.key_secret from plan-worker keys)")
    if not p.is_file():
        raise ValueError(f"{what} {path!r}: no such file (make keys with: plan-worker keys DIR)")
    try:
        return zmq.auth.load_certificate(p)
    except OSError as e:
        raise ValueError(f"{what} {path!r}: cannot read it ({e.strerror or e})") from None
    except (ValueError, KeyError, UnicodeDecodeError) as e:  # not a zmq.auth certificate
        raise ValueError(
            f"{what} {path!r}: not a zmq.auth certificate ({e}); make keys with: plan-worker keys DIR"
        ) from None


def load_secret(path: str) -> bytes:
    """The secret key of a zmq.auth ``.key_secret`` file."""
    _public, secret = _load(path, "secret key file")
    if secret is None:
        raise ValueError(f"secret key file {path!r}: holds no secret key (a .key file is public: use the .key_secret)")
    return secret


def public_key(path: str) -> bytes:
    """The public key of a zmq.auth ``.key`` or ``.key_secret`` file."""
    return _load(path, "key file")[0]


def client_keys(client_secret_file: str, server_public_file: str) -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) for ``connect(..., curve=...)``."""
    public, secret = zmq.auth.load_certificate(client_secret_file)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    if secret is None:
        raise ValueError(f"{client_secret_file}: no secret key in this certificate file")
    return public, secret, server_public


def check_clients_dir(path: str) -> int:
    """How many client public keys (``*.key``) the directory holds; ValueError when none can be used."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--curve-clients {path!r}: not a directory of client public keys (*.key)")
    try:
        keys = zmq.auth.load_certificates(p)
    except OSError as e:
        raise ValueError(f"--curve-clients {path!r}: cannot read it ({e.strerror or e})") from None
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"--curve-clients {path!r}: a file in it is not a zmq.auth certificate ({e})") from None
    if not keys:
        raise ValueError(
            f"--curve-clients {path!r}: holds no public keys (*.key): no client could connect; "
            "copy each client's .key file there"
        )
    return len(keys)


def create_keys(directory: str, name: str) -> tuple[Path, Path]:
    """A new key pair ``NAME.key`` (public: give it to peers) and ``NAME.key_secret`` (0600: keep it)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (d / f"{name}{suffix}").exists():
            raise ValueError(f"{d / (name + suffix)} exists: keys are never overwritten (remove it or pick --name)")
    public, secret = zmq.auth.create_certificates(d, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


class _LoggingAuthenticator(ThreadAuthenticator):
    """zmq.auth's ZAP handler, logging every refused CURVE connection with the client's key and address."""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            key = z85.encode(client_key).decode("ascii") if len(client_key) == 32 else client_key.hex()
            log.warning(
                "refused CURVE client %s from %r: %s (not in --curve-clients)",
                key,
                getattr(self, "_address", "?"),
                reason.decode("ascii", "replace"),
            )
        return allowed, reason


def start_authenticator(allowed_clients_dir: str | None, context: zmq.Context | None = None) -> ThreadAuthenticator:
    """ZAP handler: only clients whose public keys are in the directory may connect (any, if None)."""
    auth = _LoggingAuthenticator(context or zmq.Context.instance())
    auth.start()
    auth.configure_curve(domain="*", location=allowed_clients_dir or zmq.auth.CURVE_ALLOW_ANY)
    return auth
