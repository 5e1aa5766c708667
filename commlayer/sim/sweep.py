"""A sweep: every (nodes, topology, codec) point simulated, with step time, bytes, energy and time to target."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from commlayer.adapt.cost import EXACT, CodecProfile
from commlayer.sim.churn import Churn, speeds_for
from commlayer.sim.engine import Engine, EngineConfig
from commlayer.sim.links import sim_links
from commlayer.sim.scenario import Scenario, simulate_rounds
from commlayer.sim.train import TrainConfig, rounds_to_target
from commlayer.topologies.cost import CostParams


@dataclass(frozen=True)
class SweepConfig:
    """What every point shares.

    Attributes:
        links: profile, link file or ``mix:CLASS=FRAC,...``.
        nbytes: gradient bytes. rounds: rounds per point. compute_s: compute per round at speed 1.
        period: local SGD / DiLoCo sync period. churn: (leave, rejoin) per round, or None.
        contention: "link" (emulator) or "device" (shared access links).
        chunk_bytes, ps_servers, staleness: algorithm knobs.
        train: the numpy model for time to target (None: skip).
        params: CPU constants (the adapt cost model's).
    """

    links: str = "wan-20mbit-50ms"
    nbytes: int = 1 << 20
    rounds: int = 10
    compute_s: float = 0.0
    period: int = 1
    churn: tuple[float, float] | None = None
    contention: str = "link"
    chunk_bytes: int = 1 << 20
    ps_servers: int = 1
    staleness: int = 2
    jitter: bool = True
    seed: int = 0
    train: TrainConfig | None = field(default_factory=TrainConfig)
    train_rounds: int = 400
    params: CostParams = field(default_factory=CostParams)


def run_point(nodes: int, topology: str, codec: CodecProfile, cfg: SweepConfig) -> dict[str, Any]:
    """Simulates one point; returns a row of the sweep table."""
    t0 = time.process_time()
    links = sim_links(cfg.links, nodes, cfg.seed)
    eng = Engine(links, EngineConfig(cfg.params, cfg.contention, cfg.jitter, True, cfg.seed))
    churn = Churn(nodes, cfg.churn[0], cfg.churn[1], cfg.seed, keep=tuple(range(cfg.ps_servers))) if cfg.churn else None
    sc = Scenario(topology, cfg.nbytes, codec, cfg.rounds, cfg.compute_s, cfg.period, cfg.chunk_bytes, cfg.ps_servers,
                  cfg.staleness)
    res = simulate_rounds(eng, sc, speeds_for(links.devices), churn)
    step = float(res.end[-1] / cfg.rounds)
    row: dict[str, Any] = {
        "nodes": nodes, "topology": topology, "codec": codec.spec or "exact", "links": cfg.links, "rounds": cfg.rounds,
        "step_time_s": step, "bytes_per_device": float(np.mean(res.sent_per_node)),
        "bytes_per_device_max": float(np.max(res.sent_per_node)),
        "energy_per_device_J": float(np.mean(res.energy_per_node)), "alive_frac": res.alive_frac,
        "staleness_mean": res.staleness_mean, "staleness_max": res.staleness_max, "messages": eng.messages,
        "round_end_s": res.end.tolist(),
    }
    if cfg.train is not None:
        hit, _ = rounds_to_target(topology if not topology.startswith("ps-async") else "ps", min(nodes, 256),
                                  cfg.train_rounds, cfg.period, codec.rel_error, cfg.train)
        row["rounds_to_target"] = hit
        row["time_to_target_s"] = None if hit is None else step * (hit + 1)
    row["sim_cpu_s"] = time.process_time() - t0
    return row


def run_sweep(nodes: list[int], topologies: list[str], codecs: list[CodecProfile], cfg: SweepConfig,
              progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every point of nodes x topologies x codecs, in order."""
    rows = []
    for n in nodes:
        for topo in topologies:
            for c in codecs or [EXACT]:
                rows.append(run_point(n, topo, c, cfg))
                if progress is not None:
                    progress(f"{n} {topo} {c.spec or 'exact'}")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The sweep table: one line per point."""
    head = (f"{'nodes':>6} {'topology':<24} {'codec':<14} {'step time':>11} {'MB/device':>10} {'J/device':>9} "
            f"{'to target':>11} {'stale':>6} {'sim cpu':>8}")
    out = [head]
    for r in rows:
        tt = r.get("time_to_target_s")
        out.append(f"{r['nodes']:>6} {r['topology'][:24]:<24} {r['codec'][:14]:<14} {r['step_time_s']:>10.3f}s "
                   f"{r['bytes_per_device'] / 1e6:>10.2f} {r['energy_per_device_J']:>9.3f} "
                   f"{(f'{tt:.1f}s' if tt is not None else 'n/a'):>11} {r['staleness_mean']:>6.1f} {r['sim_cpu_s']:>7.1f}s")
    return "\n".join(out)
