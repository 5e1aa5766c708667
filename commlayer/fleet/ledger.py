"""The fleet's keys in the c10d store: peer records, contributions, round commits and aggregates.

The store is the one source of truth of a fleet: a round is committed by one ``compare_set`` on
its key (the first closer wins, every other peer reads the same record), and a contribution is
announced only after its payload is in the store, so an announced update is never lost and the
cursor in :class:`commlayer.fleet.state.OuterState` makes sure it is applied once. Values above
the store's frame limit (8 MiB in torch's libuv server) are split into parts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from commlayer.fleet.state import digest

PART = 4 << 20  # bytes per store value (the libuv TCPStore refuses frames above 8 MiB)


def connect_store(addr: str, timeout: float, master: bool = False) -> Any:
    """A TCPStore client (or the server, with ``master``) at ``host:port``.

    Raises:
        ValueError: ``addr`` is not ``host:port``.
    """
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"fleet store: expected host:port, got {addr!r} (COMMLAYER_FLEET_STORE)")
    return dist.TCPStore(host, int(port), is_master=master, timeout=timedelta(seconds=timeout), wait_for_workers=False,
                         use_libuv=True)


@dataclass(frozen=True)
class Keys:
    """Key names under one fleet's prefix."""

    prefix: str

    def k(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])


def put_json(store: Any, key: str, value: Any) -> None:
    store.set(key, json.dumps(value, separators=(",", ":")))


def get_json(store: Any, key: str) -> Any:
    return json.loads(store.get(key))


def put_blob(store: Any, key: str, data: bytes) -> str:
    """Stores ``data`` under ``key`` in parts (the meta record last); returns its digest."""
    d = digest(data)
    n = max(1, -(-len(data) // PART))
    for i in range(n):
        store.set(f"{key}/p{i}", data[i * PART:(i + 1) * PART])
    put_json(store, key, {"parts": n, "bytes": len(data), "digest": d})
    return d


def get_blob(store: Any, key: str, expect: str, what: str) -> bytes:
    """The blob under ``key``, checked against the digest ``expect``.

    Raises:
        ValueError: the blob's bytes do not match ``expect`` (names ``what``).
    """
    meta = get_json(store, key)
    parts = store.multi_get([f"{key}/p{i}" for i in range(int(meta["parts"]))])
    data = b"".join(parts)
    got = digest(data)
    if got != expect or len(data) != meta["bytes"]:
        raise ValueError(f"{what}: expected digest {expect} ({meta['bytes']} bytes), got {got} ({len(data)} bytes); "
                         "the store was written by another fleet or a different commlayer version")
    return data


def delete_blob(store: Any, key: str) -> None:
    if not store.check([key]):
        return
    n = int(get_json(store, key)["parts"])
    store.delete_key(key)
    for i in range(n):
        store.delete_key(f"{key}/p{i}")


def wait_key(store: Any, key: str, timeout: float, what: str, poll: float = 0.01) -> None:
    """Waits until ``key`` exists (polling ``check``, so the wait is bounded and interruptible).

    Raises:
        TimeoutError: ``key`` did not appear within ``timeout`` s (names ``what``).
    """
    deadline = time.monotonic() + timeout
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fleet: {what} did not appear in the store within {timeout:.0f} s (key {key!r})")
        time.sleep(poll)


def commit(store: Any, key: str, record: dict[str, Any]) -> dict[str, Any]:
    """Writes ``record`` under ``key`` unless another peer committed first; returns the record that holds."""
    mine = json.dumps(record, separators=(",", ":"))
    held = store.compare_set(key, "", mine)
    return json.loads(held)
