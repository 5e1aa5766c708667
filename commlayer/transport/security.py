"""Authentication of every peer (always, with zero configuration) and CurveZMQ encryption.

With nothing configured, the ranks share a random job key through the rendezvous store (the
trust root torchrun already gives every rank; :func:`job_credentials`): only processes that can
read the store can handshake. Each rank's listening socket then requires either

* CURVE (encrypted, keys derived from the job key) when it listens on a non-loopback address
  (``COMMLAYER_ENCRYPT=auto``, the default; ``on`` forces it, ``off`` turns it off explicitly), or
* ZMTP PLAIN with a per-rank password derived from the job key (loopback and ipc only, where
  nobody but root can read the traffic): authenticated, not encrypted.

Either way a stranger never completes the ZeroMQ handshake, so it never gets a routing identity
(no squatting on ``r1``) and none of its frames reaches commlayer. Two ways to configure keys
yourself (encryption is then always on), for users who do not trust the store:

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
import ipaddress
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
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


@dataclass(frozen=True)
class Credentials:
    """What a rank proves and requires.

    Attributes:
        curve: key pair and allow-list (job key, secret or key files); None when unknown.
        passwords: PLAIN password of every rank (job-key mode), else None.
        encrypt: this rank's listening socket requires CURVE (else PLAIN when ``passwords``, else nothing).
    """

    curve: CurveKeys | None = None
    passwords: tuple[str, ...] | None = None
    encrypt: bool = False

    @property
    def authenticated(self) -> bool:
        return self.encrypt or self.passwords is not None

    def accepts(self, src: int, uid: str) -> bool:
        """Whether a message claiming ``src`` may come over a connection authenticated as ``uid``."""
        if not self.authenticated:
            return True
        if self.encrypt and self.curve is not None:
            if self.curve.by_rank is None:
                return True  # key files: the ZAP allow-list is the check
            if uid.encode() == self.curve.by_rank[src]:
                return True
        return self.passwords is not None and uid == f"r{src}"


def derive_keypair(job_secret: bytes, rank: int, label: str = "commlayer-curve-v1") -> tuple[bytes, bytes]:
    """The (public, secret) z85 key pair of ``rank`` under ``job_secret``."""
    raw = hmac.new(job_secret, f"{label}/rank/{rank}".encode(), hashlib.sha256).digest()
    secret = z85.encode(raw)
    return zmq.curve_public(secret), secret


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def encryption_wanted(host: str) -> bool:
    """``COMMLAYER_ENCRYPT``: auto (on unless ``host`` is a loopback address), on, or off."""
    mode = str(settings.get("COMMLAYER_ENCRYPT")).strip().lower()
    if mode in ("on", "1", "true", "yes"):
        return True
    if mode in ("off", "0", "false", "no"):
        return False
    if mode != "auto":
        raise ValueError(f"COMMLAYER_ENCRYPT: expected auto, on or off, got {mode!r}")
    return not is_loopback(host)


def exchange_job_key(store: Any, rank: int, prefix: str, timeout: float) -> bytes:
    """A random key shared by the ranks of this job through the store (rank 0 creates it)."""
    name = f"{prefix}/jobkey"
    if rank == 0:
        store.set(name, secrets.token_hex(32))
    try:
        store.wait([name], timedelta(seconds=timeout))
    except Exception as exc:
        raise RuntimeError(f"rank {rank}: rank 0 did not publish the job key {name!r} within {timeout:.0f} s ({exc}); "
                           "did it call init_process_group with backend 'zmq'?") from None
    raw = store.get(name)
    key = bytes.fromhex(raw.decode() if isinstance(raw, bytes) else str(raw))
    if len(key) != 32:
        raise RuntimeError(f"rank {rank}: the job key in the store has {len(key)} bytes, expected 32")
    return key


def job_credentials(rank: int, world_size: int, job_key: bytes, encrypt: bool) -> Credentials:
    """Credentials derived from the job key (used when neither a secret nor key files are configured)."""
    pairs = [derive_keypair(job_key, r, "commlayer-job-curve-v1") for r in range(world_size)]
    curve = CurveKeys(pairs[rank][0], pairs[rank][1], frozenset(p for p, _ in pairs), tuple(p for p, _ in pairs))
    pw = tuple(hmac.new(job_key, f"commlayer-job-plain-v1/rank/{r}".encode(), hashlib.sha256).hexdigest() for r in range(world_size))
    return Credentials(curve, pw, encrypt)


def credentials(store: Any, rank: int, world_size: int, host: str, prefix: str, timeout: float) -> Credentials:
    """This rank's credentials: from ``COMMLAYER_SECRET`` / key files if set, else from a job key in ``store``."""
    keys = keys_from_env(rank, world_size)
    if world_size == 1:
        return Credentials(keys, None, keys is not None)
    if keys is not None:
        if rank == 0:  # ranks without the secret still find a job key, then a clear "different secret" error
            store.set(f"{prefix}/jobkey", secrets.token_hex(32))
        return Credentials(keys, None, True)
    return job_credentials(rank, world_size, exchange_job_key(store, rank, prefix, timeout), encryption_wanted(host))


def job_secret() -> str:
    """The job secret (``COMMLAYER_SECRET``, or the content of ``COMMLAYER_SECRET_FILE``), "" when none is set.

    Raises:
        ValueError: the secret is shorter than 16 characters.
    """
    secret = settings.get("COMMLAYER_SECRET")
    secret_file = settings.get("COMMLAYER_SECRET_FILE")
    if secret_file:
        with open(secret_file, "rb") as f:
            secret = f.read().strip().decode()
    if secret and len(secret) < 16:
        raise ValueError(f"COMMLAYER_SECRET: expected at least 16 characters, got {len(secret)}")
    return str(secret or "")


def keys_from_env(rank: int, world_size: int) -> CurveKeys | None:
    """Reads the key configuration from the environment; None when encryption is not configured."""
    secret = job_secret()
    if secret:
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


def start_authenticator(ctx: zmq.Context, creds: Credentials) -> ThreadAuthenticator | None:
    """The ZAP handler checking connecting clients (None when this rank requires nothing)."""
    if not creds.authenticated:
        return None
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(__name__ + ".zap"))
    auth.start()
    if creds.encrypt and creds.curve is not None:
        auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=creds.curve)
    if creds.passwords is not None:
        auth.configure_plain(domain=ZAP_DOMAIN, passwords={f"r{r}": pw for r, pw in enumerate(creds.passwords)})
    return auth


def secure_server(sock: zmq.Socket, creds: Credentials) -> None:
    """Makes the listening socket require CURVE or PLAIN (per ``creds``) before any message."""
    if not creds.authenticated:
        return
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
    if creds.encrypt:
        if creds.curve is None:
            raise ValueError("Expected CURVE keys for an encrypting rank, got none")
        sock.curve_secretkey = creds.curve.secret
        sock.curve_publickey = creds.curve.public
        sock.curve_server = True
    else:
        sock.plain_server = True


def secure_dealer(sock: zmq.Socket, creds: Credentials, me: int, peer: int, published: str) -> None:
    """Gives the socket towards ``peer`` what its listening socket requires (CURVE when it published a key,
    else PLAIN in job-key mode, else nothing); closes the socket and raises if this rank cannot comply.

    Raises:
        ConnectionRefusedError: the peer's published key or mode does not fit this rank's credentials.
    """
    try:
        if published or (creds.encrypt and creds.passwords is None):
            if creds.curve is None:
                raise ConnectionRefusedError(f"rank {peer} requires encryption but this rank has no keys; set the same "
                                             "COMMLAYER_SECRET on every rank")
            secure_client(sock, creds.curve, creds.curve.check_peer(peer, published))
        elif creds.passwords is not None:
            sock.plain_username = f"r{me}".encode()
            sock.plain_password = creds.passwords[me].encode()
    except BaseException:
        sock.close(linger=0)
        raise


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
