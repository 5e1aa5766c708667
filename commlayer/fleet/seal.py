"""Sealed store records: every value a fleet writes to the c10d store is authenticated, and encrypted off loopback.

The TCPStore protocol is plaintext and unauthenticated, so the fleet protects its records itself,
with keys derived from the fleet's job key (the one its CurveZMQ state transfers use):

* **authenticated, always**: a record is ``magic | flags | sender | nonce | body | tag``; the tag is
  keyed BLAKE2b-256 (RFC 7693's MAC mode) over the store key's name and everything before the tag,
  so a record forged without the job key, altered in one bit, or moved to another key is rejected
  before anything reads it (:class:`SealError` names the claimed sender, the key and the fix);
  keys that name an owner (``info/<id>``, ``c/<id>/...``, ``agg/<r>/<closer>``...) must be
  sealed by that owner;
* **encrypted** where the transport would encrypt (``COMMLAYER_SECRET`` set, or ``COMMLAYER_ENCRYPT``
  on, or auto with a store off loopback): the body is XORed with a SHAKE-256 keystream of the
  encryption key and a random 128-bit nonce (encrypt-then-MAC; the standard library's primitives,
  no extra dependency).

The job key is ``sha256(COMMLAYER_SECRET)`` when a secret is set. Without one it is a random key
kept in the store, which protects only against what cannot read the store: fine on loopback (what
the transport trusts too), useless on a network path (the key crosses it in plaintext), so a fleet
whose store is not on loopback refuses to start without a secret unless ``COMMLAYER_ENCRYPT=off``
says so explicitly. Counters (``nextid``, heartbeats) are store ``add`` values and stay plain: a
forged heartbeat can keep a dead peer in a round's membership (it costs that round its deadline),
not change any update.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from commlayer import settings
from commlayer.transport.security import encryption_wanted, is_loopback, job_secret

logger = logging.getLogger(__name__)

MAGIC = b"CLR1"
_HEAD = struct.Struct("<4sBi16s")  # magic, flags (1: encrypted), sender id, nonce
TAG = 32
_ENCRYPTED = 1
PLAIN_KEYS = ("nextid", "jobkey")  # relative key names that hold store counters or the job key itself
PLAIN_PREFIXES = ("hb/", "go/")  # heartbeat counters; the emulation harness's go signals (existence only)
_OWNED_AT = {"info": 1, "peer": 1, "c": 1, "cm": 1, "final": 1, "final_round": 1, "agg": 2, "gd": 2}
_FIX = "set the same COMMLAYER_SECRET on every device of the fleet (and run the same commlayer version)"


class SealError(ValueError):
    """A store record that is not sealed by a member of this fleet (forged, tampered with, moved or foreign)."""


def _xor(data: bytes, stream: bytes) -> bytes:
    return np.bitwise_xor(np.frombuffer(data, np.uint8), np.frombuffer(stream, np.uint8)).tobytes()


@dataclass(frozen=True)
class Sealer:
    """Seals and opens records under one job key.

    Attributes:
        encrypt: seal with encryption (opening accepts both: only a key holder can produce either).
    """

    mac_key: bytes
    enc_key: bytes
    encrypt: bool

    @classmethod
    def from_job_key(cls, job_key: bytes, encrypt: bool) -> "Sealer":
        mac = hmac.new(job_key, b"commlayer-fleet-record-mac-v1", hashlib.sha256).digest()
        enc = hmac.new(job_key, b"commlayer-fleet-record-enc-v1", hashlib.sha256).digest()
        return cls(mac, enc, encrypt)

    def _tag(self, key: str, head: bytes, body: bytes) -> bytes:
        h = hashlib.blake2b(key=self.mac_key, digest_size=TAG)
        name = key.encode()
        h.update(struct.pack("<I", len(name)))
        h.update(name)
        h.update(head)
        h.update(body)
        return h.digest()

    def _stream(self, nonce: bytes, n: int) -> bytes:
        return hashlib.shake_256(self.enc_key + nonce).digest(n) if n else b""

    def seal(self, key: str, sender: int, data: bytes) -> bytes:
        """The record holding ``data`` under ``key``, written by peer ``sender``."""
        nonce = secrets.token_bytes(16)
        head = _HEAD.pack(MAGIC, _ENCRYPTED if self.encrypt else 0, sender, nonce)
        body = _xor(data, self._stream(nonce, len(data))) if self.encrypt else data
        return head + body + self._tag(key, head, body)

    def open(self, key: str, record: bytes) -> tuple[int, bytes]:
        """(sender, data) of a record read from ``key``.

        Raises:
            SealError: the record is not sealed under this fleet's job key for ``key`` (names its claimed sender).
        """
        if len(record) < _HEAD.size + TAG or record[:4] != MAGIC:
            raise SealError(f"fleet store record {key!r}: expected a sealed record ({MAGIC!r}...), got {len(record)} "
                            f"unsealed bytes starting {record[:12]!r}: written by something without the fleet's job "
                            f"key (a stranger, or a commlayer version before sealed records); {_FIX}")
        _m, flags, sender, nonce = _HEAD.unpack_from(record)
        head, body, tag = record[:_HEAD.size], record[_HEAD.size:-TAG], record[-TAG:]
        if not hmac.compare_digest(tag, self._tag(key, head, body)):
            raise SealError(f"fleet store record {key!r} (claims to be written by peer {sender}): expected a tag made "
                            "with this fleet's job key for this key, got a mismatch: the record was forged, altered or "
                            f"moved from another key, or its writer has another job key; nothing of it was used. {_FIX}")
        return sender, _xor(body, self._stream(nonce, len(body))) if flags & _ENCRYPTED else body


def _owner(rel: str) -> int | None:
    """The peer a relative key belongs to (``info/3`` -> 3), or None."""
    parts = rel.split("/")
    at = _OWNED_AT.get(parts[0])
    return int(parts[at]) if at is not None and at < len(parts) and parts[at].isdigit() else None


class SealedStore:
    """A TCPStore whose values (but the counters of ``PLAIN_KEYS``/``PLAIN_PREFIXES``) are sealed records.

    Args:
        store: the c10d store client.
        sealer: the fleet's keys.
        prefix: the fleet's key prefix (``commlayer/fleet/<job>``).
        me: the id written as sender (-1: not a peer, e.g. the emulation harness; set by :meth:`as_peer`).
    """

    def __init__(self, store: Any, sealer: Sealer, prefix: str, me: int = -1) -> None:
        self.raw, self.sealer, self.prefix, self.me = store, sealer, prefix + "/", me

    def as_peer(self, pid: int) -> None:
        self.me = pid

    def _rel(self, key: str) -> str:
        return key[len(self.prefix):] if key.startswith(self.prefix) else key

    def _plain(self, key: str) -> bool:
        rel = self._rel(key)
        return rel in PLAIN_KEYS or rel.startswith(PLAIN_PREFIXES)

    def _seal(self, key: str, value: str | bytes) -> bytes:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return data if self._plain(key) else self.sealer.seal(key, self.me, data)

    def _open(self, key: str, value: bytes) -> bytes:
        if self._plain(key):
            return value
        sender, data = self.sealer.open(key, bytes(value))
        owner = _owner(self._rel(key))
        if owner is not None and owner != sender:
            raise SealError(f"fleet store record {key!r}: expected it sealed by its owner peer {owner}, got peer {sender}: "
                            "a member wrote into another member's record (nothing of it was used)")
        return data

    def set(self, key: str, value: str | bytes) -> None:
        self.raw.set(key, self._seal(key, value))

    def get(self, key: str) -> bytes:
        return self._open(key, self.raw.get(key))

    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        return [self._open(k, v) for k, v in zip(keys, self.raw.multi_get(list(keys)))]

    def compare_set(self, key: str, expected: str, desired: str | bytes) -> bytes:
        """Sets ``desired`` if ``key`` holds ``expected`` ("" = absent only, for sealed keys); returns what it holds."""
        if expected and not self._plain(key):
            raise ValueError(f"SealedStore.compare_set({key!r}): expected '' (create-if-absent), got a value to compare")
        mine = self._seal(key, desired)
        held = bytes(self.raw.compare_set(key, expected, mine))
        if held == mine:
            return desired.encode() if isinstance(desired, str) else bytes(desired)
        return self._open(key, held)

    def add(self, key: str, n: int) -> int:
        return int(self.raw.add(key, n))

    def check(self, keys: Sequence[str]) -> bool:
        return bool(self.raw.check(list(keys)))

    def delete_key(self, key: str) -> bool:
        return bool(self.raw.delete_key(key))


def store_job_key(store: Any, prefix: str, host: str) -> tuple[bytes, bool]:
    """The fleet's job key and whether records are encrypted, for a store at ``host``.

    Raises:
        ValueError: the store is off loopback and no ``COMMLAYER_SECRET`` is set (and encryption is not
            explicitly off), or the secret is shorter than 16 characters.
    """
    secret = job_secret()
    if secret:
        return hashlib.sha256(b"commlayer-fleet/" + secret.encode()).digest(), True
    mode = str(settings.get("COMMLAYER_ENCRYPT")).strip().lower()
    if not is_loopback(host) and mode == "auto":
        raise ValueError(f"fleet store {host}: expected COMMLAYER_SECRET (>= 16 characters, the same on every device) "
                         "for a store off loopback, got none: without it the job key would cross the network in the "
                         "store's plaintext and protect nothing. Set COMMLAYER_SECRET, or COMMLAYER_ENCRYPT=off to run "
                         "unencrypted and unauthenticated against anyone who reaches the store")
    encrypt = encryption_wanted(host)
    if not encrypt and not is_loopback(host):
        logger.warning("fleet store %s: COMMLAYER_ENCRYPT=off: round records are sealed with a key kept in the store "
                       "(integrity against accidents, not against anyone who reaches the store)", host)
    held = store.compare_set(f"{prefix}/jobkey", "", secrets.token_hex(32))
    return bytes.fromhex(held.decode() if isinstance(held, bytes) else str(held)), encrypt


def sealed(store: Any, prefix: str, host: str, me: int = -1) -> tuple[SealedStore, bytes]:
    """``store`` wrapped so that its records are sealed, and the job key (see :func:`store_job_key`)."""
    job_key, encrypt = store_job_key(store, prefix, host)
    return SealedStore(store, Sealer.from_job_key(job_key, encrypt), prefix, me), job_key
