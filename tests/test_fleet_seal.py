"""Sealed fleet store records over a real TCPStore: forged, tampered, moved and foreign records are refused.

Each test writes records the way peers do (:class:`commlayer.fleet.seal.SealedStore` around a real
c10d TCPStore on loopback), then changes what sits in the store behind the wrapper's back, as
anyone who reaches the store could, and checks the reader refuses it before using any of it.
"""

from __future__ import annotations

import json

import pytest
import torch

from commlayer.fleet.config import FleetConfig
from commlayer.fleet.ledger import Keys, connect_store, get_blob, get_json, put_blob, put_json
from commlayer.fleet.membership import Roster
from commlayer.fleet.rounds import Rounds
from commlayer.fleet.seal import SealedStore, Sealer, SealError, sealed, store_job_key
from commlayer.fleet.state import OuterState, tensor_bytes
from commlayer.testing.ports import free_port

KEYS = Keys("commlayer/fleet/sealtest")
MARKER = b"PLAINTEXT-MARKER-0123456789"


@pytest.fixture
def raw():
    store = connect_store(f"127.0.0.1:{free_port()}", 30.0, master=True)
    yield store
    del store


def _peer(raw, pid: int, encrypt: bool = True, job_key: bytes = b"j" * 32) -> SealedStore:
    return SealedStore(raw, Sealer.from_job_key(job_key, encrypt), KEYS.prefix, pid)


def test_encrypted_records_round_trip_and_hide_their_plaintext(raw) -> None:
    a, b = _peer(raw, 0), _peer(raw, 1)
    data = MARKER * 20000  # > one part: several sealed parts
    d = put_blob(a, KEYS.k("c", 0, 0), data)
    assert get_blob(b, KEYS.k("c", 0, 0), d, "contribution") == data
    put_json(a, KEYS.k("info", 0), {"cseq": 0, "marker": MARKER.decode()})
    assert get_json(b, KEYS.k("info", 0))["cseq"] == 0
    for key in (KEYS.k("c", 0, 0, "p0"), KEYS.k("info", 0)):
        assert MARKER not in bytes(raw.get(key))  # what crosses the wire and sits in the store is ciphertext
    plain = _peer(raw, 0, encrypt=False)  # loopback default: authenticated, not encrypted
    plain.set(KEYS.k("info", 0), MARKER)
    assert MARKER in bytes(raw.get(KEYS.k("info", 0))) and b.get(KEYS.k("info", 0)) == MARKER


def test_a_tampered_payload_is_refused_naming_its_sender_and_the_fix(raw) -> None:
    a, b = _peer(raw, 3), _peer(raw, 1)
    d = put_blob(a, KEYS.k("c", 3, 0), tensor_bytes(torch.ones(1000)))
    part = bytearray(raw.get(KEYS.k("c", 3, 0, "p0")))
    part[40] ^= 1
    raw.set(KEYS.k("c", 3, 0, "p0"), bytes(part))
    with pytest.raises(SealError, match=r"c/3/0/p0.*peer 3.*forged, altered.*COMMLAYER_SECRET"):
        get_blob(b, KEYS.k("c", 3, 0), d, "contribution 0 of peer 3")


def test_records_of_another_job_key_moved_or_in_another_members_name_are_refused(raw) -> None:
    a, b = _peer(raw, 0), _peer(raw, 1)
    stranger = _peer(raw, 0, job_key=b"s" * 32)  # another secret: a stranger, or a device misconfigured
    stranger.set(KEYS.k("info", 0), b'{"left": true}')
    with pytest.raises(SealError, match="peer 0.*another job key"):
        b.get(KEYS.k("info", 0))
    a.set(KEYS.k("cm", 0, 0), b'{"base": 0, "samples": 32, "digest": "00"}')
    raw.set(KEYS.k("cm", 0, 1), raw.get(KEYS.k("cm", 0, 0)))  # a valid record replayed under another key
    with pytest.raises(SealError, match="cm/0/1.*moved from another key"):
        b.get(KEYS.k("cm", 0, 1))
    b.set(KEYS.k("info", 0), b'{"left": true}')  # a member writing another member's record
    with pytest.raises(SealError, match="sealed by its owner peer 0, got peer 1"):
        a.get(KEYS.k("info", 0))


def test_a_forged_round_record_is_refused_and_nothing_is_applied(raw) -> None:
    cfg = FleetConfig(timeout=10.0)
    peer = _peer(raw, 0)
    roster = Roster(peer, KEYS, cfg.dead_after)
    assert roster.reserve() == 0
    rounds = Rounds(peer, KEYS, roster, cfg, 0)
    state = OuterState.initial(torch.zeros(8))
    before = state.digest()
    forged_agg = torch.full((8,), -5.0)  # what a stranger wants every replica to apply
    d = put_blob(raw, KEYS.k("agg", 1, 0), tensor_bytes(forged_agg))  # plain, as anyone reaching the store can
    raw.set(KEYS.k("round", 1), json.dumps({"round": 1, "agg": KEYS.k("agg", 1, 0), "digest": d, "include": [],
                                            "dropped": []}))
    with pytest.raises(SealError, match="round/1.*unsealed.*COMMLAYER_SECRET"):
        rounds.apply_next(state)
    assert state.round == 0 and state.digest() == before  # nothing applied
    raw.delete_key(KEYS.k("round", 1))
    agg = KEYS.k("agg", 1, 0)
    put_blob(peer, agg, tensor_bytes(forged_agg))  # now a sealed aggregate whose parts are swapped afterwards
    put_json(peer, KEYS.k("round", 1), {"round": 1, "agg": agg, "digest": d, "include": [], "dropped": []})
    raw.set(agg + "/p0", tensor_bytes(forged_agg))
    with pytest.raises(SealError, match="agg/1/0/p0"):
        rounds.apply_next(state)
    assert state.round == 0 and state.digest() == before


def test_a_store_off_loopback_needs_the_secret_unless_encryption_is_explicitly_off(raw, monkeypatch) -> None:
    monkeypatch.delenv("COMMLAYER_SECRET", raising=False)
    monkeypatch.delenv("COMMLAYER_SECRET_FILE", raising=False)
    monkeypatch.delenv("COMMLAYER_ENCRYPT", raising=False)
    with pytest.raises(ValueError, match="expected COMMLAYER_SECRET .* off loopback, got none"):
        store_job_key(raw, KEYS.prefix, "10.9.8.7")
    key, encrypt = store_job_key(raw, KEYS.prefix, "127.0.0.1")
    assert not encrypt and len(key) == 32 and store_job_key(raw, KEYS.prefix, "127.0.0.1")[0] == key  # one key per fleet
    monkeypatch.setenv("COMMLAYER_ENCRYPT", "off")
    assert store_job_key(raw, KEYS.prefix, "10.9.8.7") == (key, False)
    monkeypatch.setenv("COMMLAYER_ENCRYPT", "auto")
    monkeypatch.setenv("COMMLAYER_SECRET", "a fleet secret of 32 characters")
    s, key2 = sealed(raw, KEYS.prefix, "10.9.8.7")
    assert s.sealer.encrypt and key2 != key  # the secret's key, not the one in the store
