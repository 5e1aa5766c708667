"""Checks a fleet's ledger: every announced update applied exactly once, and replicas bit-identical.

Reads the round records, the owners' announced sequence numbers and (with ``keep_payloads``) the
per-round state digests each peer wrote after applying a round. Independent of the peers' own
bookkeeping: it recounts from the store.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from commlayer.fleet.ledger import Keys, get_json


@dataclass
class Audit:
    """What the ledger shows.

    Attributes:
        rounds: committed rounds (1..rounds).
        announced: contributions announced in the store.
        applied: contributions in some round's include list.
        dropped: contributions in some round's dropped list (too stale).
        duplicated: contributions in more than one round (target 0).
        lost: announced contributions below an owner's newest applied one that no round holds (target 0).
        pending: announced after the last round that could hold them (the fleet stopped first).
        digest_mismatch: rounds where two peers' states differ after applying them (target 0).
        records: the round records.
    """

    rounds: int = 0
    announced: int = 0
    applied: int = 0
    dropped: int = 0
    duplicated: int = 0
    lost: int = 0
    pending: int = 0
    digest_mismatch: int = 0
    digests_checked: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)


def audit(store: Any, job: str = "fleet", check_digests: bool = True) -> Audit:
    keys = Keys(f"commlayer/fleet/{job}")
    a = Audit()
    r = 1
    while store.check([keys.k("round", r)]):
        a.records.append(get_json(store, keys.k("round", r)))
        r += 1
    a.rounds = r - 1
    seen: Counter[tuple[int, int]] = Counter()
    for rec in a.records:
        for o, s, _b, _n in rec["include"]:
            seen[(o, s)] += 1
        for o, s, _b, _n in rec["dropped"]:
            seen[(o, s)] += 1
        a.applied += len(rec["include"])
        a.dropped += len(rec["dropped"])
    a.duplicated = sum(c - 1 for c in seen.values() if c > 1)
    n_ids = int(store.add(keys.k("nextid"), 0))
    for o in range(n_ids):
        info = json.loads(store.get(keys.k("info", o)))
        cseq = int(info["cseq"])
        a.announced += cseq + 1
        top = max((s for (oo, s) in seen if oo == o), default=-1)
        a.lost += sum(1 for s in range(top + 1) if (o, s) not in seen)
        a.pending += cseq - top
    if check_digests:
        for r in range(1, a.rounds + 1):
            ds = [store.get(keys.k("gd", r, o)) for o in range(n_ids) if store.check([keys.k("gd", r, o)])]
            a.digests_checked += len(ds)
            if len(set(ds)) > 1:
                a.digest_mismatch += 1
    return a
