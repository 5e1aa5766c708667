"""CurveZMQ encryption and authentication of every peer.

Two ways to configure keys (encryption is on whenever either is set):

* a job secret (``COMMLAYER_SECRET`` or ``COMMLAYER_SECRET_FILE``): every rank derives every rank's
  Curve25519 key pair from it (HMAC-SHA256 of the secret and the rank), so the allow-list is the
  job's own ranks and no key files are needed;
* key files (``COMMLAYER_CURVE_SECRET_FILE``: this rank's certificate as written by
  ``zmq.auth.create_certificates``; ``COMMLAYER_CURVE_PUBLIC_DIR``: the allowed public certificates).

Servers check each connecting client against the allow-list through a ZAP handler; clients check
each server's published key against it too; every received message is tied to the rank whose key
authenticated the connection, so an authenticated peer cannot speak for another rank.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from commlayer import settings

logger = logging.getLogger(__name__)

ZAP_DOMAIN = "commlayer"


@dataclass(frozen=True)
class CurveKeys:
    """This rank's key pair and whom it trusts (all keys z85-encoded).

    Attributes:
        public: this rank's public key.
        secret: this rank's secret key.
        allowed: public keys allowed to connect.
        by_rank: the expected public key of each rank (job-secret mode), else None.
    """

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]
    by_rank: tuple[bytes, ...] | None = None

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check (called by the authenticator thread)."""
        ok = key in self.allowed
        if not ok:
            logger.warning("rejected a connection with an unknown CURVE key %s", key.decode(errors="replace"))
        return ok

    def check_peer(self, peer: int, published: str) -> bytes:
        """Validates the key a peer published in the store before connecting to it."""
        if not published:
            raise ConnectionRefusedError(f"rank {peer} runs without encryption while this rank requires it; "
                                         "set the same COMMLAYER_SECRET (or key files) on every rank")
        key = published.encode()
        if self.by_rank is not None and self.by_rank[peer] != key:
            raise ConnectionRefusedError(f"rank {peer} published a CURVE key that does not match the job secret; "
                                         "every rank must use the same COMMLAYER_SECRET")
        if key not in self.allowed:
            raise ConnectionRefusedError(f"rank {peer} published a CURVE key that is not in COMMLAYER_CURVE_PUBLIC_DIR")
        return key


def derive_keypair(job_secret: bytes, rank: int) -> tuple[bytes, bytes]:
    """The (public, secret) z85 key pair of ``rank`` under ``job_secret``."""
    raw = hmac.new(job_secret, f"commlayer-curve-v1/rank/{rank}".encode(), hashlib.sha256).digest()
    secret = z85.encode(raw)
    return zmq.curve_public(secret), secret


def keys_from_env(rank: int, world_size: int) -> CurveKeys | None:
    """Reads the key configuration from the environment; None when encryption is not configured."""
    secret = settings.get("COMMLAYER_SECRET")
    secret_file = settings.get("COMMLAYER_SECRET_FILE")
    if secret_file:
        with open(secret_file, "rb") as f:
            secret = f.read().strip().decode()
    if secret:
        if len(secret) < 16:
            raise ValueError(f"COMMLAYER_SECRET: expected at least 16 characters, got {len(secret)}")
        pairs = [derive_keypair(secret.encode(), r) for r in range(world_size)]
        return CurveKeys(pairs[rank][0], pairs[rank][1], frozenset(p for p, _ in pairs), tuple(p for p, _ in pairs))
    cert = settings.get("COMMLAYER_CURVE_SECRET_FILE")
    if cert:
        pub_dir = settings.get("COMMLAYER_CURVE_PUBLIC_DIR")
        if not pub_dir or not os.path.isdir(pub_dir):
            raise ValueError(f"COMMLAYER_CURVE_PUBLIC_DIR: expected a directory of allowed public certificates, got {pub_dir!r}")
        public, sec = zmq.auth.load_certificate(cert)
        if sec is None:
            raise ValueError(f"COMMLAYER_CURVE_SECRET_FILE: {cert} holds no secret key")
        allowed = frozenset(zmq.auth.load_certificates(pub_dir).keys())
        return CurveKeys(public, sec, allowed)
    return None


def start_authenticator(ctx: zmq.Context, keys: CurveKeys) -> ThreadAuthenticator:
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=keys)
    return auth


def secure_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def secure_client(sock: zmq.Socket, keys: CurveKeys, server_key: bytes) -> None:
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_key


def user_id(frame: Any) -> str:
    """The authenticated client key (z85) a received frame came with, or "" without CURVE."""
    try:
        return str(frame.get("User-Id"))
    except (zmq.ZMQError, AttributeError):
        return ""
