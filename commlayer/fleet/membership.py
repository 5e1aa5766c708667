"""Who is in the fleet: peer registration, heartbeat keys in the c10d store, and the live set.

A peer registers by taking the next id from a store counter (ids are never reused: a restarted
device is a new member) and writing its record. A thread with its own store client (the TCPStore
client is single-flight) increments ``hb/<id>`` every ``heartbeat`` seconds. Every observer judges
liveness by its own clock: a peer whose counter has not moved for ``dead_after`` seconds of the
observer's monotonic time is out of the live set (no clock agreement between hosts is needed);
a peer that left cleanly says so in its record and is out at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from commlayer.fleet.ledger import Keys, connect_store, get_json, put_json

logger = logging.getLogger(__name__)


@dataclass
class _Seen:
    count: int
    since: float  # observer's monotonic time of the count's last change
    moved: bool = False  # the count changed while this observer watched (proof of life, not just a record)


class Heartbeat:
    """Increments this peer's heartbeat key until :meth:`stop` (its own store client, a daemon thread)."""

    def __init__(self, addr: str, keys: Keys, peer: int, interval: float, timeout: float) -> None:
        self._store = connect_store(addr, timeout)
        self._key = keys.k("hb", peer)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fleet-heartbeat-{peer}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._store.add(self._key, 1)
            except Exception as exc:  # the store host went away: the peer's main loop reports it
                logger.warning("fleet heartbeat %s: store unreachable (%s); stopping heartbeats", self._key, exc)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self._interval + 5)
        self._store = None


class Roster:
    """This peer's view of the registered peers, their records and their liveness."""

    def __init__(self, store: Any, keys: Keys, dead_after: float) -> None:
        self.store = store
        self.keys = keys
        self.dead_after = dead_after
        self.ids: list[int] = []
        self.records: dict[int, dict[str, Any]] = {}
        self._seen: dict[int, _Seen] = {}
        self._probe = 0  # next id not yet known to be registered
        self._missing_since = 0.0

    def reserve(self) -> int:
        """Takes this peer's id and writes its keys (before its record: readers never block on a missing key)."""
        pid = int(self.store.add(self.keys.k("nextid"), 1)) - 1
        self.store.as_peer(pid)  # a SealedStore: this peer's records are sealed in its name from now on
        self.store.add(self.keys.k("hb", pid), 1)
        put_json(self.store, self.keys.k("info", pid), {"start": -1, "tau": None, "cseq": -1, "active": False,
                                                         "left": False})
        return pid

    def publish(self, pid: int, record: dict[str, Any]) -> None:
        """Writes this peer's record (name, state endpoints, public key): from now on others see it."""
        put_json(self.store, self.keys.k("peer", pid), record)

    def refresh(self) -> None:
        """Learns newly registered peers."""
        top = int(self.store.add(self.keys.k("nextid"), 0))
        while self._probe < top:
            key = self.keys.k("peer", self._probe)
            if not self.store.check([key]):
                now = time.monotonic()
                self._missing_since = self._missing_since or now
                if now - self._missing_since < 4 * self.dead_after:
                    break
                logger.info("fleet: peer %d took an id but never registered (died while joining); skipping it", self._probe)
            self._missing_since = 0.0
            if not self.store.check([key]):
                self._probe += 1
                continue
            self.records[self._probe] = get_json(self.store, key)
            self.ids.append(self._probe)
            self._probe += 1

    def infos(self) -> dict[int, dict[str, Any]]:
        """Every known peer's info record (start round, pace, announced sequence, left)."""
        if not self.ids:
            return {}
        vals = self.store.multi_get([self.keys.k("info", i) for i in self.ids])
        return {i: json.loads(v) for i, v in zip(self.ids, vals)}

    def live(self, infos: dict[int, dict[str, Any]]) -> dict[int, bool]:
        """Liveness of every known peer, from its heartbeat counter and its record."""
        if not self.ids:
            return {}
        now = time.monotonic()
        counts = self.store.multi_get([self.keys.k("hb", i) for i in self.ids])
        out = {}
        for i, c in zip(self.ids, counts):
            n = int(c)
            seen = self._seen.get(i)
            if seen is None or seen.count != n:
                self._seen[i] = seen = _Seen(n, now, seen is not None)
            out[i] = not infos.get(i, {}).get("left") and now - seen.since < self.dead_after
        return out

    def confirmed(self, pid: int) -> bool:
        """``pid``'s heartbeat moved while this observer watched (a peer dead before it looked never is)."""
        seen = self._seen.get(pid)
        return seen is not None and seen.moved
