"""Elastic fleets over real processes and the real c10d store: joins, clean leaves, SIGKILL, stragglers.

Each device is a ``python -m commlayer.fleet.worker`` process; the test hosts the TCPStore. The
ledger is recounted independently (:mod:`commlayer.fleet.audit`) and the whole run is replayed in
float64 numpy from the kept payloads and sample counts: the surviving peers' final models must
equal the replay, so every round applied exactly the sample-weighted mean of its contributions.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from commlayer.fleet.audit import audit
from commlayer.fleet.emulate import LocalFleet
from commlayer.fleet.ledger import get_blob, get_json
from commlayer.fleet.worker import make_model

pytestmark = pytest.mark.integration


def _replay(fleet: LocalFleet, records: list[dict], upto: int, lr: float) -> np.ndarray:
    """The global model after round ``upto``, recomputed in float64 from the kept payloads."""
    g = torch.nn.utils.parameters_to_vector(make_model(32, 32, 0).parameters()).detach().double().numpy()
    for rec in records[:upto]:
        total = sum(n for _o, _s, _b, n in rec["include"])
        agg = np.zeros_like(g)
        for o, s, _b, n in rec["include"]:
            key = fleet.keys.k("c", o, s)
            meta = get_json(fleet.store, fleet.keys.k("cm", o, s))
            agg += np.frombuffer(get_blob(fleet.store, key, meta["digest"], key), dtype=np.float32) * (n / total)
        g = g - lr * agg
    return g


def _ids(fleet: LocalFleet) -> dict[str, int]:
    return {n: e["id"] for n, d in fleet.devices.items() for e in d.events() if e["event"] == "joined"}


def test_peers_join_leave_and_die_without_losing_or_repeating_an_update(tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path, ["--rounds", "36", "--step-sleep", "0.01", "--audit", "--min-members", "3"])
    try:
        for i in range(3):
            fleet.spawn(f"d{i}", ["--batch", "64"] if i == 2 else [])  # unequal sample counts: weighting matters
        fleet.spawn("j1", standby=True)
        fleet.spawn("j2", standby=True)
        fleet.wait_round(8, 90)
        fleet.kill("d0")
        fleet.go("j1")
        fleet.wait_round(18, 90)
        fleet.leave("d1")
        fleet.go("j2")
        fleet.wait_all(120)
        for name in ("d1", "d2", "j1", "j2"):
            assert fleet.devices[name].proc.returncode == 0, fleet.describe()
        a = audit(fleet.store)
        ids = _ids(fleet)
        assert a.duplicated == 0 and a.lost == 0 and a.dropped == 0, a
        assert a.announced == a.applied + a.pending and a.applied > 36 * 2
        assert a.digest_mismatch == 0 and a.digests_checked > 36 * 2  # replicas bit-identical after every round
        for j in ("j1", "j2"):  # the joiners caught up from a live peer and then contributed
            joined = next(e for e in fleet.devices[j].events() if e["event"] == "joined")
            assert joined["how"].startswith("fetched round"), joined
            first = min((b for rec in a.records for o, s, b, _n in rec["include"] if o == ids[j]), default=-1)
            assert first >= joined["round"], (j, first, joined)
        dead = ids["d0"]
        contributed = {rec["round"] for rec in a.records for o, *_ in rec["include"] if o == dead}
        assert contributed, "the device killed at round 8 never contributed"
        # A live device may miss a round's deadline on a loaded machine (CI saw d0 late in round 1); what
        # is checked is the death: once d0's last update landed it stays a member for at most one round.
        stale_member = [rec["round"] for rec in a.records
                        if dead in rec["members"] and rec["round"] > max(contributed)]
        assert len(stale_member) <= 1, stale_member  # out of the membership within one round
        assert all(rec["reason"] == "deadline" for rec in a.records if rec["round"] in stale_member)
        left = ids["d1"]
        last = max(rec["round"] for rec in a.records if any(o == left for o, *_ in rec["include"]))
        after = [rec for rec in a.records if rec["round"] > last]
        assert after and all(left not in rec["waited_on"] for rec in after)
        for name in ("d2", "j2"):
            pid = ids[name]
            final_round = int(fleet.store.get(fleet.keys.k("final_round", pid)))
            key = fleet.keys.k("final", pid)
            final = np.frombuffer(get_blob(fleet.store, key, get_json(fleet.store, key)["digest"], key), dtype=np.float32)
            np.testing.assert_allclose(final, _replay(fleet, a.records, final_round, 1.0), atol=2e-5)
    finally:
        fleet.close()


def _straggler_fleet(tmp_path: Path, close: str) -> LocalFleet:
    fleet = LocalFleet(tmp_path / close, ["--rounds", "16", "--audit", "--min-members", "4", "--close", close], job=close)
    for i in range(3):
        fleet.spawn(f"fast{i}", ["--step-sleep", "0.02"])
    fleet.spawn("slow", ["--step-sleep", "0.1"])  # 5x slower steps
    return fleet


def test_a_5x_slower_peer_is_folded_in_late_instead_of_pacing_the_fleet(tmp_path: Path) -> None:
    elastic = _straggler_fleet(tmp_path, "deadline")  # both fleets side by side: the same load on both
    fixed: LocalFleet | None = None
    try:
        fixed = _straggler_fleet(tmp_path, "all")
        elastic.wait_all(150)
        fixed.wait_all(150)
        slow, slow_f = _ids(elastic)["slow"], _ids(fixed)["slow"]
        a, b = audit(elastic.store, "deadline"), audit(fixed.store, "all")
        for x in (a, b):
            assert x.lost == 0 and x.duplicated == 0 and x.dropped == 0 and x.digest_mismatch == 0, x
        late = [(rec["round"], base) for rec in a.records for o, _s, base, _n in rec["include"]
                if o == slow and base < rec["round"] - 1]
        assert len(late) >= 2, late  # its contributions arrive rounds later and are folded in
        assert all(slow not in rec["waited_on"] for rec in a.records[2:])  # nobody waits for it once its pace is known
        assert sum(rec["reason"] == "deadline" for rec in a.records) <= 2
        # the fixed world waits for the straggler in every round: its contribution is fresh in each
        assert all(any(o == slow_f and base == rec["round"] - 1 for o, _s, base, _n in rec["include"]) for rec in b.records)

        def per_round(x: object) -> float:
            ts = [rec["t"] for rec in x.records[2:]]  # type: ignore[attr-defined]
            return statistics.median(t1 - t0 for t0, t1 in zip(ts, ts[1:]))

        ratio = per_round(a) / per_round(b)
        assert ratio < 0.7, f"elastic round {per_round(a):.3f} s vs fixed world {per_round(b):.3f} s"
    finally:
        elastic.close()
        if fixed is not None:
            fixed.close()
