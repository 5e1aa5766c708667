"""A fleet member: joins at any round, trains locally, contributes, and leaves, without restarting the fleet.

Usage (every device runs the same loop; devices come and go)::

    peer = FleetPeer(model.parameters(), FleetConfig(period=50, outer_lr=0.7, outer_momentum=0.9),
                     store="rendezvous.example.org:29400")
    peer.start()                       # founds the fleet, or fetches the state from a live peer
    for x, y in data:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        peer.step(samples=len(x))      # every `period` steps: contribute, apply the closed rounds
    peer.leave()

Joining: the peer registers (:mod:`commlayer.fleet.membership`), fetches the newest snapshot of
the model and outer-optimizer state from a live member (:mod:`commlayer.fleet.statesync`; through
the member's relay when its direct endpoint does not answer), applies the rounds committed since
then from the store, and contributes from the next round on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any, Iterable

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from commlayer import settings
from commlayer.fleet.config import FleetConfig
from commlayer.fleet.ledger import Keys, commit, connect_store
from commlayer.fleet.membership import Heartbeat, Roster
from commlayer.fleet.rounds import Rounds
from commlayer.fleet.seal import sealed
from commlayer.fleet.relay import open_relay
from commlayer.fleet.state import OuterState
from commlayer.fleet.statesync import FetchFailed, Partial, StateServer, fetch_from

logger = logging.getLogger(__name__)


class FleetError(RuntimeError):
    """A fleet operation that cannot go on (names the peer and what to do)."""


class FleetPeer:
    """One device of an elastic DiLoCo-style fleet.

    Args:
        params: the model's parameters (updated in place at every round).
        cfg: the fleet's knobs (the same on every peer).
        store: ``host:port`` of the fleet's TCPStore (default ``COMMLAYER_FLEET_STORE``).
        job: the fleet's name (a key prefix: one store can hold several fleets).
        name: this device's label (records and messages).
        host: address the state server binds ("" = none: behind NAT, reachable through ``relay`` only).
        relay: ``host:port`` of a relay's backend this peer dials out to (default ``COMMLAYER_FLEET_RELAY``).
        resume_dir: directory keeping a partial state download, to resume it after a restart.
    """

    def __init__(self, params: Iterable[torch.Tensor], cfg: FleetConfig | None = None, store: str = "", job: str = "fleet",
                 name: str = "", host: str = "127.0.0.1", relay: str | None = None, resume_dir: str = "") -> None:
        self.params = [p for p in params]
        self.cfg = cfg or FleetConfig()
        self.addr = store or settings.get("COMMLAYER_FLEET_STORE")
        if not self.addr:
            raise FleetError("FleetPeer: expected the fleet store's host:port (store= or COMMLAYER_FLEET_STORE), got none")
        self.keys = Keys(f"commlayer/fleet/{job}")
        self.name = name or f"pid{os.getpid()}"
        self.host = host
        self.relay = settings.get("COMMLAYER_FLEET_RELAY") if relay is None else relay
        self.resume_dir = resume_dir
        self.id = -1
        self.state: OuterState | None = None
        self.store: Any = None
        self.server: StateServer | None = None
        self.heartbeat: Heartbeat | None = None
        self.local_steps = 0
        self.samples = 0
        self.stats: dict[str, Any] = {"joined_by": "", "join_s": 0.0, "rounds_applied": 0, "contributions": 0,
                                      "fetched_from": {}}
        self._opened = 0.0
        self._phase_t0 = 0.0
        self._step_t = 0.0
        self._tau: float | None = None
        self._relay_ctl: socket.socket | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Registers, founds the fleet or catches up from a live peer, and becomes a contributing member."""
        t0 = time.monotonic()
        self.store, job_key = sealed(connect_store(self.addr, self.cfg.timeout), self.keys.prefix,
                                     self.addr.rpartition(":")[0])
        self.roster = Roster(self.store, self.keys, self.cfg.dead_after)
        try:
            self.id = self.roster.reserve()
            backend, front = "", ""
            if self.relay:
                self._relay_ctl, backend, front = open_relay(self.relay, self.id)
            self.server = StateServer(self.id, job_key, self.host, (backend,) if backend else ())
            pub = self.server.public
            self.roster.publish(self.id, {"name": self.name, "pid": os.getpid(), "state": self.server.endpoint, "public": pub,
                      "relay_front": front})
            self.heartbeat = Heartbeat(self.addr, self.keys, self.id, self.cfg.heartbeat, self.cfg.timeout)
            self.rounds = Rounds(self.store, self.keys, self.roster, self.cfg, self.id)
            self.state = self._found_or_fetch(job_key)
        except BaseException:
            self.close()
            raise
        self._load_params()
        self.server.publish(self.state)
        self._opened = time.monotonic()
        self.rounds.push_info(active=True, start=self.state.round, tau=None)
        self._phase_t0 = time.monotonic()
        self.stats["join_s"] = time.monotonic() - t0
        logger.info("fleet peer %d (%s) active from round %d (%s, %.2f s)", self.id, self.name, self.state.round,
                    self.stats["joined_by"], self.stats["join_s"])

    def _found_or_fetch(self, job_key: bytes) -> OuterState:
        mine = OuterState.initial(parameters_to_vector(self.params))
        founding = commit(self.store, self.keys.k("round", 0), {"digest": mine.digest(), "founder": self.id, "numel": mine.numel})
        if founding["numel"] != mine.numel:
            raise FleetError(f"fleet peer {self.id}: expected a model of {founding['numel']} parameters (the fleet's), "
                             f"got {mine.numel}; every device must train the same architecture")
        if founding["founder"] == self.id or (founding["digest"] == mine.digest() and self.rounds.latest(0) == 0):
            self.stats["joined_by"] = "founder" if founding["founder"] == self.id else "same-initial-model"
            return mine
        state = self._fetch(job_key)
        while True:  # catch up with the rounds committed since the snapshot
            try:
                for _ in range(self.rounds.latest(state.round) - state.round):
                    self.rounds.apply_next(state)
                return state
            except LookupError:  # fell out of the aggregate window while fetching: fetch a newer snapshot
                state = self._fetch(job_key)

    def _fetch(self, job_key: bytes) -> OuterState:
        """The newest snapshot from some live active peer (direct endpoint first, then its relay)."""
        deadline = time.monotonic() + self.cfg.timeout
        partial = Partial(path=self.resume_dir)
        tried: list[str] = []
        while time.monotonic() < deadline:
            self.roster.refresh()
            infos = self.roster.infos()
            live = self.roster.live(infos)
            ready = [i for i in infos if i != self.id and live[i] and infos[i]["active"] and self.roster.confirmed(i)]
            for pid in sorted(ready, reverse=True):  # newest first: the most likely to stay
                rec = self.roster.records[pid]
                for how, ep in (("direct", rec.get("state", "")), ("relay", rec.get("relay_front", ""))):
                    if not ep:
                        continue
                    stall = 2.0 if how == "direct" and rec.get("relay_front") else max(2.0, 4 * self.cfg.dead_after)
                    try:  # a direct dial that gets no answer in 2 s falls back to the peer's relay
                        state = fetch_from(ep, pid, rec["public"], job_key, partial, stall=stall)
                    except FetchFailed as exc:
                        tried.append(f"peer {pid} {how} {ep}: {exc}")
                        logger.info("fleet peer %d: state fetch from peer %d (%s) failed: %s", self.id, pid, how, exc)
                        continue
                    self.stats["joined_by"] = f"fetched round {state.round} from peer {pid} ({how})"
                    self.stats["fetched_from"] = dict(partial.fetched_from)
                    return state
            time.sleep(0.2)
        raise FleetError(f"fleet peer {self.id}: no live peer delivered the fleet state within {self.cfg.timeout:.0f} s; "
                         f"tried: {tried[-6:]}. Check that members' state endpoints (or a relay) are reachable")

    # ---- training ----------------------------------------------------------------------------
    def step(self, samples: int = 1) -> bool:
        """Counts one local step of ``samples`` samples; every ``period`` steps contributes. Returns True then."""
        if self.state is None:
            raise FleetError("FleetPeer.step: expected start() first")
        now = time.monotonic()
        self.local_steps += 1
        self.samples += samples
        if self.local_steps % self.cfg.period == 1 or self.cfg.period == 1:
            self._step_t = now - self._phase_t0
            if self._tau is None:  # first measurement: tell the closers this peer's pace at once
                self._tau = self._step_t * self.cfg.period
                self.rounds.push_info(tau=self._tau)
        if self.local_steps % self.cfg.period:
            return False
        self._tau = now - self._phase_t0
        self.contribute()
        return True

    @torch.no_grad()
    def contribute(self) -> None:
        """Announces this phase's pseudo-gradient, applies closed rounds, and restarts from the newest model."""
        assert self.state is not None
        base = self.state.round
        delta = self.state.params - parameters_to_vector(self.params).detach().float()
        seq = self.rounds.announce(base, self.samples, delta)
        self.stats["contributions"] += 1
        self.samples = 0
        self._opened, applied = self.rounds.advance(self.state, self._opened, seq)
        self.stats["rounds_applied"] += len(applied)
        assert self.server is not None
        if self.server.wanted():
            self.server.publish(self.state)
        self._load_params()
        self.rounds.push_info(start=self.state.round, tau=self._tau)
        self._phase_t0 = time.monotonic()

    def _load_params(self) -> None:
        assert self.state is not None
        with torch.no_grad():
            vector_to_parameters(self.state.params.clone(), self.params)

    # ---- leaving ------------------------------------------------------------------------------
    def leave(self) -> None:
        """Leaves cleanly: out of the live set at once (announced contributions still count)."""
        if self.store is not None and self.id >= 0:
            try:
                self.rounds.push_info(left=True)
            except Exception as exc:
                logger.warning("fleet peer %d: could not record its leave (%s); it drops out by heartbeat", self.id, exc)
        self.close()

    def close(self) -> None:
        """Stops the heartbeat and the state server (idempotent)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._relay_ctl is not None:
            self._relay_ctl.close()
            self._relay_ctl = None
        self.store = None
