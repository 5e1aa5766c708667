"""A fleet device running a small, deterministic task (emulated fleets: tests, ``commlayer launch --fleet``, benchmarks).

The task: regress a fixed random teacher MLP with a student MLP; every device draws its own
samples from a private generator seeded by its name, or, with ``--slot k`` (a position in the
fleet; a joiner that replaces a leaver gets the leaver's slot through its go signal), by
``(data seed, slot, the round its local phase started from, the step in the phase)``: a churning
fleet then sees the samples a fixed fleet sees, and comparing the two measures churn, not the luck
of the draw (with name-seeded data two fixed fleets differ by up to 12 % in final loss at 200
rounds: docs/fleet.md). One JSON line per event goes to stdout. SIGTERM makes the
device leave cleanly at its next step; SIGKILL is the unclean leave.

    python -m commlayer.fleet.worker --store 127.0.0.1:29400 --name dev3 --rounds 200
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import zlib
from typing import Any

import torch

from commlayer.fleet.config import FleetConfig
from commlayer.fleet.ledger import Keys, connect_store, put_blob, wait_key
from commlayer.fleet.peer import FleetPeer
from commlayer.fleet.state import tensor_bytes


def make_model(dim: int, hidden: int, seed: int) -> torch.nn.Module:
    """The student (same initial weights on every device of a fleet: ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def teacher(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 7919)
    w1 = torch.randn(x.shape[1], 16, generator=g) / x.shape[1] ** 0.5
    w2 = torch.randn(16, 1, generator=g)
    return torch.tanh(x @ w1) @ w2


def eval_loss(model: torch.nn.Module, dim: int, seed: int, n: int = 2048) -> float:
    """MSE on the fleet's fixed evaluation set."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 104729))
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), teacher(x, seed)))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m commlayer.fleet.worker", description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True, help="host:port of the fleet's TCPStore")
    p.add_argument("--job", default="fleet")
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slot", type=int, default=-1, help="draw samples by (slot, round, step), not by name (-1)")
    p.add_argument("--data-seed", type=int, default=-1, help="seed of the samples (-1: --seed)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--period", type=int, default=5)
    p.add_argument("--outer-lr", type=float, default=1.0)
    p.add_argument("--outer-momentum", type=float, default=0.0)
    p.add_argument("--close", default="deadline", choices=["deadline", "all"])
    p.add_argument("--rounds", type=int, default=50, help="leave once the fleet committed this many rounds")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds added to every local step (device speed)")
    p.add_argument("--min-members", type=int, default=1, help="no round closes with fewer active members")
    p.add_argument("--audit", action="store_true", help="keep payloads and per-round digests in the store")
    p.add_argument("--host", default="127.0.0.1", help='state server address ("" = none, NAT)')
    p.add_argument("--relay", default=None, help="host:port of a relay's control port")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--wait-go", action="store_true", help="boot, then wait for the harness's go key before joining")
    return p.parse_args(argv)


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(1)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    model = make_model(a.dim, a.hidden, a.seed)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    cfg = FleetConfig(period=a.period, outer_lr=a.outer_lr, outer_momentum=a.outer_momentum, close=a.close,
                      keep_payloads=a.audit, timeout=a.timeout, min_members=a.min_members)
    if a.wait_go:  # a booted standby device (imports done): joins the moment the harness says so
        emit(event="standby", name=a.name)
        go, raw = Keys(f"commlayer/fleet/{a.job}").k("go", a.name), connect_store(a.store, a.timeout)
        wait_key(raw, go, a.timeout * 10, f"the go signal of standby device {a.name}", poll=0.02)
        a.slot = int(json.loads(raw.get(go)).get("slot", a.slot))  # the slot of the device this one replaces
    peer = FleetPeer(model.parameters(), cfg, store=a.store, job=a.job, name=a.name, host=a.host, relay=a.relay)
    peer.start()
    assert peer.state is not None
    emit(event="joined", id=peer.id, name=a.name, round=peer.state.round, how=peer.stats["joined_by"],
         join_s=peer.stats["join_s"], fetched_from=peer.stats["fetched_from"])
    data_seed = a.seed if a.data_seed < 0 else a.data_seed
    g = torch.Generator().manual_seed(data_seed * 1000003 + zlib.crc32(a.name.encode()))
    try:
        while peer.state.round < a.rounds and not stop["now"]:
            if a.slot >= 0:  # the same samples for the same (slot, phase base round, step), whoever fills the slot
                g.manual_seed(zlib.crc32(f"{data_seed}/{a.slot}/{peer.state.round}/{peer.local_steps % a.period}".encode()))
            x = torch.randn(a.batch, a.dim, generator=g)
            loss = torch.nn.functional.mse_loss(model(x), teacher(x, a.seed))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if a.step_sleep:
                time.sleep(a.step_sleep)
            if peer.step(samples=a.batch):
                emit(event="round", id=peer.id, round=peer.state.round, digest=peer.state.digest())
        final = make_model(a.dim, a.hidden, a.seed)
        torch.nn.utils.vector_to_parameters(peer.state.params.clone(), final.parameters())
        if a.audit:
            store = peer.store  # sealed in this peer's name
            put_blob(store, Keys(f"commlayer/fleet/{a.job}").k("final", peer.id), tensor_bytes(peer.state.params))
            store.set(Keys(f"commlayer/fleet/{a.job}").k("final_round", peer.id), str(peer.state.round))
        emit(event="done", id=peer.id, round=peer.state.round, digest=peer.state.digest(), left=bool(stop["now"]),
             loss=eval_loss(final, a.dim, a.seed), closed=peer.rounds.closed_by_me, reasons=peer.rounds.reasons,
             contributions=peer.stats["contributions"])
    finally:
        peer.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
