"""Serving and fetching the fleet state: chunked, verified by digests, resumable, over CurveZMQ.

Every active peer runs a :class:`StateServer` (a ROUTER in a thread). A joiner asks for the
manifest of a snapshot (round, size, chunk digests, whole digest), then pulls chunks with a window
of requests in flight, checks each chunk's digest and the whole state's digest. Replicas are
bit-identical, so a transfer interrupted by the server's death resumes from another live peer
holding the same round: the chunks already received (kept in a :class:`Partial`, optionally on
disk to survive a restart of the joiner) are not fetched again.

Encryption and authentication: the server's CURVE key pair is derived from the fleet's job key
and the peer id, the client's from the job key; the server's ZAP handler admits only the fleet's
client key. A relay forwarding the bytes (:mod:`commlayer.fleet.relay`) sees ciphertext only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import zmq

from commlayer.fleet.state import OuterState, digest
from commlayer.transport.security import Credentials, CurveKeys, derive_keypair, secure_client, secure_server, \
    start_authenticator

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
WINDOW = 8


def server_keys(job_key: bytes, peer: int) -> tuple[bytes, bytes]:
    return derive_keypair(job_key, peer, "commlayer-fleet-server-v1")


def client_keys(job_key: bytes) -> tuple[bytes, bytes]:
    return derive_keypair(job_key, 0, "commlayer-fleet-client-v1")


@dataclass
class _Snap:
    data: bytes
    manifest: dict


class StateServer:
    """Serves this peer's snapshots of the fleet state (see the module docstring).

    Args:
        peer: this peer's id.
        job_key: the fleet's job key.
        host: address to bind ("127.0.0.1", or this host's address).
        connect: endpoints to *dial* as the server (a relay's backend for a peer behind NAT).
    """

    def __init__(self, peer: int, job_key: bytes, host: str = "127.0.0.1", connect: tuple[str, ...] = ()) -> None:
        self.peer = peer
        self._ctx = zmq.Context()
        pub, sec = server_keys(job_key, peer)
        cpub, _ = client_keys(job_key)
        creds = Credentials(CurveKeys(pub, sec, frozenset({cpub})), None, True)
        self._auth = start_authenticator(self._ctx, creds)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        secure_server(self._sock, creds)
        self.endpoint = ""
        if host:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
            self.endpoint = f"tcp://{host}:{port}"
        if connect:  # a relay holds the dialled connection idle until a client arrives: no handshake timeout
            self._sock.setsockopt(zmq.HANDSHAKE_IVL, 0)
        for ep in connect:
            self._sock.connect(ep)
        self.public = pub.decode()
        self.served_chunks = 0
        self.demand = 0.0  # monotonic time of the last request for a snapshot
        self._snaps: dict[int, _Snap] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fleet-state-{peer}", daemon=True)
        self._thread.start()

    def wanted(self) -> bool:
        """Somebody asked for a snapshot in the last minute (the peer then publishes after each round)."""
        return time.monotonic() - self.demand < 60.0

    def publish(self, state: OuterState) -> None:
        """Makes ``state`` (a committed round) available; keeps the two newest snapshots."""
        data = state.to_bytes()
        digests = [digest(memoryview(data)[i:i + CHUNK]) for i in range(0, len(data), CHUNK)]
        man = {"round": state.round, "bytes": len(data), "chunk": CHUNK, "digests": digests, "digest": digest(data),
               "peer": self.peer}
        with self._lock:
            self._snaps[state.round] = _Snap(data, man)
            for r in sorted(self._snaps)[:-2]:
                del self._snaps[r]

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                continue
            if len(frames) < 3:
                continue
            ident, kind, body = frames[0], frames[1], frames[2]
            try:
                req = json.loads(body)
            except ValueError:
                self._sock.send_multipart([ident, b"error", b'{"why": "unreadable request"}'])
                continue
            self._sock.send_multipart([ident, *self._answer(kind, req)])

    def _answer(self, kind: bytes, req: dict) -> list[bytes]:
        with self._lock:
            if kind == b"manifest":
                self.demand = time.monotonic()
                snap = self._snaps.get(req.get("round", -1)) or (self._snaps[max(self._snaps)] if self._snaps else None)
                if snap is None:
                    return [b"wait", b"{}"]
                return [b"manifest", json.dumps(snap.manifest).encode()]
            if kind == b"chunk":
                snap = self._snaps.get(int(req.get("round", -1)))
                if snap is None or snap.manifest["digest"] != req.get("digest"):
                    return [b"gone", b"{}"]
                i = int(req["i"])
                self.served_chunks += 1
                return [b"chunk", json.dumps({"i": i}).encode(), snap.data[i * CHUNK:(i + 1) * CHUNK]]
        return [b"error", json.dumps({"why": f"unknown request {kind!r}"}).encode()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()


@dataclass
class Partial:
    """Chunks of one snapshot received so far (``path``: also kept on disk, to resume after a restart)."""

    manifest: dict | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    path: str = ""
    fetched_from: dict[int, int] = field(default_factory=dict)  # server peer id -> chunks it delivered

    def reset(self, manifest: dict) -> None:
        if self.manifest is not None and self.manifest["digest"] == manifest["digest"]:
            return  # same snapshot: resume
        self.manifest, self.chunks = manifest, {}
        if self.path:
            self._load()

    def _load(self) -> None:
        assert self.manifest is not None
        d = os.path.join(self.path, self.manifest["digest"])
        if not os.path.isdir(d):
            return
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                data = f.read()
            i = int(name)
            if i < len(self.manifest["digests"]) and digest(data) == self.manifest["digests"][i]:
                self.chunks[i] = data

    def add(self, i: int, data: bytes, server: int) -> None:
        assert self.manifest is not None
        self.chunks[i] = data
        self.fetched_from[server] = self.fetched_from.get(server, 0) + 1
        if self.path:
            d = os.path.join(self.path, self.manifest["digest"])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, str(i)), "wb") as f:
                f.write(data)

    def missing(self) -> list[int]:
        assert self.manifest is not None
        return [i for i in range(len(self.manifest["digests"])) if i not in self.chunks]


class FetchFailed(Exception):
    """One server could not deliver (dead, unreachable or no longer holding the snapshot)."""


def fetch_from(endpoint: str, server_peer: int, server_public: str, job_key: bytes, partial: Partial,
               stall: float, want_round: int = -1, on_chunk: Callable[[int], None] | None = None) -> OuterState:
    """Fetches (the rest of) a snapshot from one server.

    Raises:
        FetchFailed: no answer for ``stall`` s, or the server no longer holds the snapshot.
        ValueError: a chunk or the whole state does not match its digest.
    """
    ctx: zmq.Context = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    cpub, csec = client_keys(job_key)
    secure_client(sock, CurveKeys(cpub, csec, frozenset()), server_public.encode())
    sock.connect(endpoint)
    try:
        deadline = time.monotonic() + stall
        while True:
            sock.send_multipart([b"manifest", json.dumps({"round": want_round}).encode()])
            if not sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
                raise FetchFailed(f"peer {server_peer} at {endpoint}: no manifest within {stall:.1f} s")
            kind, body = sock.recv_multipart()[:2]
            if kind == b"manifest":
                break
            if time.monotonic() > deadline:
                raise FetchFailed(f"peer {server_peer} at {endpoint}: no snapshot ready within {stall:.1f} s")
            time.sleep(0.05)
        partial.reset(json.loads(body))
        man = partial.manifest
        assert man is not None
        todo = partial.missing()
        inflight: set[int] = set()
        while todo or inflight:
            while todo and len(inflight) < WINDOW:
                i = todo.pop(0)
                sock.send_multipart([b"chunk", json.dumps({"round": man["round"], "digest": man["digest"], "i": i}).encode()])
                inflight.add(i)
            if not sock.poll(int(stall * 1000)):
                raise FetchFailed(f"peer {server_peer} at {endpoint}: no chunk for {stall:.1f} s "
                                  f"({len(partial.chunks)}/{len(man['digests'])} received)")
            frames = sock.recv_multipart()
            if frames[0] == b"gone":
                raise FetchFailed(f"peer {server_peer} no longer holds round {man['round']}")
            if frames[0] != b"chunk" or len(frames) != 3:
                raise FetchFailed(f"peer {server_peer}: unexpected reply {frames[0]!r}")
            i = int(json.loads(frames[1])["i"])
            if i not in inflight:
                continue  # a reply to an earlier attempt
            inflight.discard(i)
            if digest(frames[2]) != man["digests"][i]:
                raise ValueError(f"state chunk {i} from peer {server_peer}: expected digest {man['digests'][i]}, "
                                 f"got {digest(frames[2])}")
            partial.add(i, frames[2], server_peer)
            if on_chunk is not None:
                on_chunk(i)
        data = b"".join(partial.chunks[i] for i in range(len(man["digests"])))
        if digest(data) != man["digest"]:
            raise ValueError(f"state from peer {server_peer}: expected digest {man['digest']}, got {digest(data)}")
        return OuterState.from_bytes(data, f"peer {server_peer}")
    finally:
        sock.close(linger=0)
