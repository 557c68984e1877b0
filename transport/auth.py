"""CURVE encryption and client authentication with zmq.auth (``zmq.auth.create_certificates`` keys)."""

from __future__ import annotations

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def load_secret(path: str) -> bytes:
    """The secret key of a zmq.auth ``.key_secret`` file."""
    _public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path}: no secret key in this certificate file")
    return secret


def client_keys(client_secret_file: str, server_public_file: str) -> tuple[bytes, bytes, bytes]:
    """(client public, client secret, server public) for ``connect(..., curve=...)``."""
    public, secret = zmq.auth.load_certificate(client_secret_file)
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    if secret is None:
        raise ValueError(f"{client_secret_file}: no secret key in this certificate file")
    return public, secret, server_public


def start_authenticator(allowed_clients_dir: str | None, context: zmq.Context | None = None) -> ThreadAuthenticator:
    """ZAP handler: only clients whose public keys are in the directory may connect (any, if None)."""
    auth = ThreadAuthenticator(context or zmq.Context.instance())
    auth.start()
    auth.configure_curve(domain="*", location=allowed_clients_dir or zmq.auth.CURVE_ALLOW_ANY)
    return auth
