"""Mode A: user-space TCP relays, one per directed link, on loopback (no root needed).

Contract with the transport: rank j listens on ``127.0.0.1:$COMMLAYER_PORT``; rank i connects
to rank j at ``COMMLAYER_CONNECT_OVERRIDES[str(j)]`` (a ``tcp://127.0.0.1:PORT`` relay endpoint)
instead of j's real endpoint. The relay shapes i->j bytes by link i->j and the reply bytes on
the same connection by link j->i.

Example::

    with start_relays(links, listen_ports=[6000, 6001]) as relays:
        env = relays.env(0)   # {"COMMLAYER_PORT": "6000", "COMMLAYER_CONNECT_OVERRIDES": ...}
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing as mp
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Sequence

from commlayer.wan.matrix import LinkMatrix
from commlayer.wan._proc import ControlledChild
from commlayer.wan.relay_core import RelayCore, new_event_loop

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
_CALL_TIMEOUT_S = 10.0


def _serve(links: LinkMatrix, targets: list[tuple[str, int]], t0: float, seed: int, host: str,
           conn: Connection) -> None:
    """Runs the relay loop until told to stop (target of the relay process or thread)."""
    loop = new_event_loop()
    try:
        loop.run_until_complete(_main(links, targets, t0, seed, host, conn))
    finally:
        loop.close()


async def _main(links: LinkMatrix, targets: list[tuple[str, int]], t0: float, seed: int, host: str,
                conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    core = RelayCore(links, targets, t0, seed, host)
    try:
        ports = await core.start()
    except OSError as exc:
        conn.send(("error", repr(exc)))
        return
    conn.send(("ready", ports))
    stop = asyncio.Event()

    def on_command() -> None:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            cmd = "stop"  # the parent went away
        if cmd == "stats":
            conn.send(("stats", core.stats()))
        else:
            stop.set()

    loop.add_reader(conn.fileno(), on_command)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await core.stop()
        try:
            conn.send(("stopped", None))
        except OSError:
            pass


class RelayWorld:
    """Running relays for one world; use :func:`start_relays` to create it.

    Attributes:
        links: the link matrix.
        listen_ports: the real port of each rank on ``host``.
        relay_ports: ``{(i, j): port}`` of the relay rank i uses to reach rank j.
        host: loopback address of every endpoint.
        t0: ``time.monotonic()`` at which the link schedules started.
    """

    def __init__(self, links: LinkMatrix, listen_ports: Sequence[int], host: str = "127.0.0.1",
                 seed: int = 0, t0: float | None = None, in_thread: bool = False) -> None:
        if len(listen_ports) != links.world_size:
            raise ValueError(f"expected {links.world_size} listen ports, got {len(listen_ports)}")
        self.links = links
        self.listen_ports = list(listen_ports)
        self.host = host
        self.t0 = time.monotonic() if t0 is None else t0
        targets = [(host, p) for p in self.listen_ports]
        payload = (links, targets, self.t0, seed, host)
        self._thread: threading.Thread | None = None
        self._proc: ControlledChild | None = None
        if in_thread:
            self._conn, self._child = mp.Pipe()
            self._thread = threading.Thread(target=_serve, args=payload + (self._child,), name="wan-relay", daemon=True)
            self._thread.start()
            if not self._conn.poll(_START_TIMEOUT_S):
                self.close()
                raise RuntimeError(f"relays did not start within {_START_TIMEOUT_S} s")
            kind, ports = self._conn.recv()
            if kind != "ready":
                self.close()
                raise RuntimeError(f"relays failed to start: {ports}")
        else:
            self._proc = ControlledChild("relay", payload, _START_TIMEOUT_S)
            ports = self._proc.ready_value
        self.relay_ports: dict[tuple[int, int], int] = ports
        self._closed = False
        logger.info("started %d relays for %s", len(self.relay_ports), links.name)

    def endpoint(self, src: int, dst: int) -> str:
        """The endpoint rank ``src`` connects to in order to reach rank ``dst``."""
        return f"tcp://{self.host}:{self.relay_ports[(src, dst)]}"

    def env(self, rank: int) -> dict[str, str]:
        """``COMMLAYER_HOST``, ``COMMLAYER_PORT`` and ``COMMLAYER_CONNECT_OVERRIDES`` for a rank."""
        overrides = {str(j): self.endpoint(rank, j) for j in range(self.links.world_size) if j != rank}
        return {"COMMLAYER_HOST": self.host, "COMMLAYER_PORT": str(self.listen_ports[rank]),
                "COMMLAYER_CONNECT_OVERRIDES": json.dumps(overrides, sort_keys=True)}

    def stats(self) -> dict[tuple[int, int], dict[str, float]]:
        """Per directed link counters (bytes, units, stalls, queued) from the relay loop."""
        if self._proc is not None:
            return self._proc.call("stats", _CALL_TIMEOUT_S)
        self._conn.send("stats")
        if not self._conn.poll(_CALL_TIMEOUT_S):
            raise RuntimeError("relay stats timed out")
        return self._conn.recv()[1]

    def bytes_sent(self) -> list[int]:
        """Bytes each rank has pushed into its outgoing links so far."""
        out = [0] * self.links.world_size
        for (i, _j), s in self.stats().items():
            out[i] += int(s["bytes"])
        return out

    def close(self) -> None:
        """Stops the relays and closes every socket; idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        if self._proc is not None:
            self._proc.close()
            return
        try:
            self._conn.send("stop")
            if self._conn.poll(5.0):
                self._conn.recv()
        except (OSError, EOFError):
            pass
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._conn.close()
        self._child.close()

    def __enter__(self) -> "RelayWorld":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_relays(links: LinkMatrix, listen_ports: Sequence[int], host: str = "127.0.0.1", seed: int = 0,
                 t0: float | None = None, in_thread: bool = False) -> RelayWorld:
    """Starts one relay per directed link, in a separate process (default) or a thread.

    Args:
        links: link matrix (see :func:`commlayer.wan.resolve_links`).
        listen_ports: the fixed port each rank listens on (its ``COMMLAYER_PORT``).
        host: loopback address.
        seed: seed for jitter/loss generators.
        t0: ``time.monotonic()`` origin of the schedules (default: now).
        in_thread: run the event loop in a thread of this process instead of a child process.

    Returns:
        A :class:`RelayWorld`; close it (or use ``with``) to stop the relays.
    """
    return RelayWorld(links, listen_ports, host, seed, t0, in_thread)

