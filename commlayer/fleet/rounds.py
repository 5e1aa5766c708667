"""One peer's side of the round ledger: announce contributions, close rounds, apply committed rounds.

Store keys (under the fleet prefix): ``c/<owner>/<seq>`` the payload (float32 pseudo-gradient),
``cm/<owner>/<seq>`` its meta (base round, samples, digest), ``info/<owner>`` the owner's latest
announced ``cseq`` (written after the payload: an announced contribution is always readable),
``round/<r>`` the commit record (one ``compare_set``: the first closer wins), ``agg/<r>/<closer>``
the round's sample-weighted mean pseudo-gradient, ``latest`` a hint of the newest round.
Every peer applies the same records in order; the cursor of
:class:`commlayer.fleet.state.OuterState` (highest applied sequence per owner) makes each
contribution count exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from commlayer.fleet.config import FleetConfig
from commlayer.fleet.ledger import Keys, commit, delete_blob, get_blob, get_json, put_blob, put_json
from commlayer.fleet.membership import Roster
from commlayer.fleet.policy import Decision, Member, Pending, decide
from commlayer.fleet.state import OuterState, bytes_tensor, tensor_bytes

logger = logging.getLogger(__name__)


class Rounds:
    """Reads and writes the round ledger for peer ``me``."""

    def __init__(self, store: Any, keys: Keys, roster: Roster, cfg: FleetConfig, me: int) -> None:
        self.store, self.keys, self.roster, self.cfg, self.me = store, keys, roster, cfg, me
        self.info: dict[str, Any] = {"start": -1, "tau": None, "cseq": -1, "active": False, "left": False}
        self._meta: dict[tuple[int, int], Pending] = {}
        self.closed_by_me = 0
        self.reasons: dict[str, int] = {}

    def push_info(self, **changes: Any) -> None:
        self.info.update(changes)
        put_json(self.store, self.keys.k("info", self.me), self.info)

    # ---- contributions ------------------------------------------------------------------------
    def announce(self, base: int, samples: int, delta: torch.Tensor) -> int:
        """Puts this peer's next contribution in the store (payload first, then the announcement)."""
        seq = int(self.info["cseq"]) + 1
        d = put_blob(self.store, self.keys.k("c", self.me, seq), tensor_bytes(delta))
        put_json(self.store, self.keys.k("cm", self.me, seq), {"base": base, "samples": samples, "digest": d})
        self.push_info(cseq=seq)
        return seq

    def _pending(self, state: OuterState, infos: dict[int, dict[str, Any]]) -> list[Pending]:
        out = []
        for o, info in infos.items():
            for s in range(state.included.get(o, -1) + 1, int(info["cseq"]) + 1):
                p = self._meta.get((o, s))
                if p is None:
                    m = get_json(self.store, self.keys.k("cm", o, s))
                    p = self._meta[(o, s)] = Pending(o, s, int(m["base"]), int(m["samples"]), str(m["digest"]))
                out.append(p)
        return out

    # ---- rounds -------------------------------------------------------------------------------
    def latest(self, at_least: int) -> int:
        """The newest committed round (the hint, then a forward scan)."""
        r = at_least
        if self.store.check([self.keys.k("latest")]):
            r = max(r, int(self.store.get(self.keys.k("latest"))))
        while self.store.check([self.keys.k("round", r + 1)]):
            r += 1
        return r

    def committed(self, r: int) -> bool:
        return bool(self.store.check([self.keys.k("round", r)]))

    def apply_next(self, state: OuterState) -> dict[str, Any]:
        """Applies committed round ``state.round + 1`` to ``state`` (the record must exist); returns the record."""
        r = state.round + 1
        rec = get_json(self.store, self.keys.k("round", r))
        agg = None
        if rec["agg"]:
            if not self.store.check([rec["agg"]]):
                raise LookupError(f"round {r}: its aggregate fell out of the store's window of {self.cfg.keep_rounds} rounds")
            data = get_blob(self.store, rec["agg"], rec["digest"], f"aggregate of round {r}")
            agg = bytes_tensor(data, state.numel, f"aggregate of round {r}")
        cursor = {o: s for o, s, _b, _n in rec["include"] + rec["dropped"]}
        state.apply(r, agg, self.cfg.outer_lr, self.cfg.outer_momentum, cursor)
        if self.cfg.keep_payloads:
            self.store.set(self.keys.k("gd", r, self.me), state.digest())
        return rec

    def try_close(self, state: OuterState, opened: float) -> Decision | None:
        """Closes round ``state.round + 1`` if :func:`commlayer.fleet.policy.decide` says so (first closer wins)."""
        r = state.round + 1
        self.roster.refresh()
        infos = self.roster.infos()
        live = self.roster.live(infos)
        members = [Member(i, live[i], bool(infos[i]["active"]), int(infos[i]["start"]), infos[i]["tau"]) for i in infos]
        dec = decide(r, members, self._pending(state, infos), opened, time.monotonic(), self.cfg)
        if dec is None or self.committed(r):
            return None
        agg_key, dig, total = "", "", sum(p.samples for p in dec.include)
        if dec.include:
            acc = torch.zeros(state.numel, dtype=torch.float64)
            for p in sorted(dec.include, key=lambda p: (p.owner, p.seq)):
                data = get_blob(self.store, self.keys.k("c", p.owner, p.seq), p.digest, f"contribution {p.seq} of peer {p.owner}")
                acc.add_(bytes_tensor(data, state.numel, f"contribution {p.seq} of peer {p.owner}").double(),
                         alpha=p.samples / total)
            agg_key = self.keys.k("agg", r, self.me)
            dig = put_blob(self.store, agg_key, tensor_bytes(acc.float()))
        rec = {"round": r, "members": list(dec.members), "live": list(dec.live), "t": time.time(), "reason": dec.reason, "closer": self.me, "agg": agg_key,
               "digest": dig, "samples": total, "waited_on": list(dec.waited_on),
               "include": [[p.owner, p.seq, p.base, p.samples] for p in dec.include],
               "dropped": [[p.owner, p.seq, p.base, p.samples] for p in dec.dropped]}
        held = commit(self.store, self.keys.k("round", r), rec)
        if held.get("closer") != self.me:
            if agg_key:
                delete_blob(self.store, agg_key)
            return None
        self.closed_by_me += 1
        self.reasons[dec.reason] = self.reasons.get(dec.reason, 0) + 1
        self.store.set(self.keys.k("latest"), str(r))
        if dec.dropped:
            logger.warning("fleet round %d dropped %d contributions older than max_staleness=%d rounds: %s", r,
                           len(dec.dropped), self.cfg.max_staleness, [(p.owner, p.seq, p.base) for p in dec.dropped])
        self._collect(r, dec)
        return dec

    def _collect(self, r: int, dec: Decision) -> None:
        """Deletes the payloads round ``r - 2`` consumed (a closer that lost the race for round ``r`` may still be
        reading this round's) and the aggregate that fell out of the catch-up window."""
        if not self.cfg.keep_payloads and r > 2:
            rec = get_json(self.store, self.keys.k("round", r - 2))
            for o, s, _b, _n in rec["include"] + rec["dropped"]:
                delete_blob(self.store, self.keys.k("c", o, s))
        old = r - self.cfg.keep_rounds
        if old > 0 and self.store.check([self.keys.k("round", old)]):
            rec = get_json(self.store, self.keys.k("round", old))
            if rec["agg"]:
                delete_blob(self.store, rec["agg"])

    def advance(self, state: OuterState, opened: float, seq: int) -> tuple[float, list[dict[str, Any]]]:
        """Applies committed rounds, closing the open one when due, until this peer's contribution ``seq`` is in one.

        Returns:
            (the monotonic time the last round was seen committed, the records applied).

        Raises:
            TimeoutError: no round committed within ``cfg.timeout`` s (names the peers waited on).
        """
        applied: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.cfg.timeout
        while state.included.get(self.me, -1) < seq:
            if self.committed(state.round + 1):
                applied.append(self.apply_next(state))
                opened = time.monotonic()
                deadline = opened + self.cfg.timeout
                continue
            if self.try_close(state, opened) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fleet peer {self.me}: round {state.round + 1} did not close within "
                                       f"{self.cfg.timeout:.0f} s (members: {json.dumps(self.roster.infos())})")
                time.sleep(self.cfg.poll)
        return opened, applied
