"""``commlayer simulate --validate``: the same configurations run for real on emulated links, beside the prediction.

Each world is ``n`` real processes (:func:`commlayer.testing.run_world`) over the WAN emulator in
relay mode (:func:`commlayer.wan.emulated_world`). Per configuration every rank runs ``reps`` timed
operations after a barrier; a rep's time is the slowest rank's; the median is reported. The
prediction is the simulator's with ``contention="link"`` (the emulator's independent links) and the
codec costs the ranks measured inside the world, all at once on a warm codec (:func:`op_codec_profile`). Gossip also returns the consensus error after each round.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Iterable

import numpy as np

from commlayer.topologies.schedule import Step

CONSENSUS_NUMEL = 64


def consensus_start(rank: int) -> Any:
    """Rank ``rank``'s starting vector for the consensus measurement (the simulator rebuilds it)."""
    import torch

    return torch.randn(CONSENSUS_NUMEL, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float32)


def _worker(rank: int, world: int, envs: list[dict[str, str]], configs: list[tuple[str, str]], nbytes: int,
            reps: int, chunk_bytes: int) -> dict[str, Any]:
    os.environ.update(envs[rank])
    import torch

    from commlayer.adapt.execute import CodecCache, measure_codec, profile_vector, run_allreduce
    from commlayer.adapt.planner import Plan
    from commlayer.topologies import World
    from commlayer.topologies.reduce_ops import ReduceOp

    torch.set_num_threads(1)
    w = World.from_env(timeout=120)
    out: dict[str, Any] = {}
    codecs = CodecCache()
    try:
        specs = sorted({c for _, c in configs})
        w.barrier()  # every rank at once, as in the operation: n encodes (and n combines) share this host's cores
        out["__codecs__"] = {c: profile_vector(op_codec_profile(c, nbytes // 4, world)) for c in specs}
        w.barrier()
        for r in range(world):  # the profile a planner would use (one rank at a time, cold codec), for comparison
            w.barrier()
            if r == rank:
                out["__codecs_single__"] = {c: profile_vector(measure_codec(c, numel=nbytes // 4)) for c in specs}
        for topo, codec in configs:
            key = f"{topo}|{codec}"
            times = []
            if topo.startswith("gossip"):
                graph = topo.split(":", 1)[1] if ":" in topo else "ring"
                g, gc = w.gossip(graph, round_timeout=60), w.gossip(graph, round_timeout=60)
                x = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(rank))
                c = consensus_start(rank)
                traj = []
                for k in range(reps + 1):
                    w.barrier()
                    t0 = time.perf_counter()
                    g.mix_(x, key="t", codec=codec or None)
                    times.append(time.perf_counter() - t0)
                    gc.mix_(c, key="c")
                    traj.append(c.tolist())
                out[key + "|consensus"] = traj
                w.barrier()
                g.close()
                gc.close()
            else:
                group = w.group("val")
                plan = Plan(0, topo, chunk_bytes, None, codec, 1, 0.0)
                x = torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(rank))
                for k in range(reps + 1):
                    w.barrier()
                    t0 = time.perf_counter()
                    run_allreduce(group, x, ReduceOp.AVG if codec else ReduceOp.SUM, plan, codecs, key=key, step=k)
                    times.append(time.perf_counter() - t0)
            out[key] = times[1:]  # the first rep opens connections and codec state
        w.barrier()
    finally:
        w.close()
    return out


def op_codec_profile(spec: str, numel: int, world: int, reps: int = 5) -> Any:
    """The codec's costs as a compressed all-reduce pays them: a warm codec (error-feedback memory in
    place), the median of ``reps`` calls; decode is what :func:`commlayer.codecs.aggregate.combine`
    takes per payload of ``world`` (sparse payloads are added with ``index_add_``, not decoded)."""
    import torch

    from commlayer.adapt.cost import CodecProfile
    from commlayer.codecs import CodecContext, aggregation_mode, from_spec
    from commlayer.codecs.aggregate import combine

    if not spec:
        return CodecProfile("")
    codec = from_spec(spec)
    ctx = CodecContext((numel,), torch.float32, key="__validate__")
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    mode = aggregation_mode(codec)
    enc = codec.encode(x, ctx)  # warm-up: allocations, error-feedback residual
    t_enc, t_dec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        enc = codec.encode(x, ctx)
        t1 = time.perf_counter()
        if mode == "allreduce":
            codec.decode(enc, ctx)
            t_dec.append(time.perf_counter() - t1)
        else:
            combine(codec, mode, [enc] * world, ctx, True)
            t_dec.append((time.perf_counter() - t1) / world)
        t_enc.append(t1 - t0)
    raw = numel * 4
    return CodecProfile(spec, codec.wire_bytes(numel, torch.float32) / raw, raw / max(statistics.median(t_enc), 1e-9),
                        raw / max(statistics.median(t_dec), 1e-9), 0.0, mode == "allreduce")


def measure(n: int, links: str, configs: list[tuple[str, str]], nbytes: int, reps: int = 3, chunk_bytes: int = 1 << 20,
            timeout: float = 600.0) -> dict[str, Any]:
    """Runs ``configs`` ((topology, codec spec) pairs) on ``n`` real ranks over ``links``; per config the median step time.

    ``out["codecs"]``: each codec's profile as the ranks measured it inside the world, all ranks at
    once and warm (:func:`op_codec_profile`; the pessimistic merge over ranks), for the prediction;
    ``out["codecs_single"]``: the planner's profile (:func:`~commlayer.adapt.execute.measure_codec`,
    cold, one rank at a time), for comparison.
    """
    from commlayer.testing import run_world
    from commlayer.wan import emulated_world

    load0 = os.getloadavg()[0]
    with emulated_world(n, links, mode="relay") as world:
        res = run_world(_worker, n, [world.env(r) for r in range(n)], configs, nbytes, reps, chunk_bytes, timeout=timeout)
    from commlayer.adapt.execute import merge_profiles

    out: dict[str, Any] = {"codecs": {c: merge_profiles(c, [r["__codecs__"][c] for r in res]) for c in res[0]["__codecs__"]},
                           "codecs_single": {c: merge_profiles(c, [r["__codecs_single__"][c] for r in res])
                                             for c in res[0]["__codecs_single__"]},
                           "load1": [load0, os.getloadavg()[0]]}
    for topo, codec in configs:
        key = f"{topo}|{codec}"
        per_rep = np.max(np.array([r[key] for r in res]), axis=0)
        out[key] = {"median_s": float(statistics.median(per_rep)), "reps_s": per_rep.tolist()}
        if key + "|consensus" in res[0]:
            traj = np.array([r[key + "|consensus"] for r in res])  # (ranks, rounds, numel)
            x0 = np.array([consensus_start(r).numpy() for r in range(n)], dtype=np.float64)
            mean = x0.mean(axis=0)
            e0 = float(np.linalg.norm(x0 - mean))
            out[key]["consensus"] = [float(np.linalg.norm(traj[:, k] - mean)) / e0 for k in range(traj.shape[1])]
            out[key]["consensus_x0"] = x0.tolist()
    return out


def predict(n: int, links: str, topology: str, codec: Any, nbytes: int, chunk_bytes: int = 1 << 20, seeds: int = 5) -> float:
    """The simulator's prediction of what :func:`measure` reports: the slowest rank's time from its own
    exit of the dissemination barrier (simulated too: ranks leave it at different times) to the end
    of its operation; the median over ``seeds`` jitter/loss draws."""
    from commlayer.sim.engine import Engine, EngineConfig
    from commlayer.sim.links import sim_links
    from commlayer.sim.scenario import Scenario, collective_steps
    from commlayer.topologies.gossip import gossip_schedule
    from commlayer.topologies.graphs import make_graph
    from commlayer.topologies.linear import barrier_schedule

    lk = sim_links(links, n)
    sc = Scenario(topology, nbytes, codec, chunk_bytes=chunk_bytes).check()
    out = []
    for seed in range(seeds):
        eng = Engine(lk, EngineConfig(seed=seed))
        exits = eng.run(barrier_schedule(n), np.zeros(n))
        steps: Iterable[Step]
        if sc.base == "gossip":
            steps, scale, ndec = [gossip_schedule(make_graph(sc.graph, n), 0, nbytes)], 1.0, 1
        else:
            steps, scale = collective_steps(sc, n)
            ndec = 1 if codec.linear else n
        done = eng.run(steps, exits + nbytes / codec.encode_Bps, elem_scale=scale) + ndec * nbytes / codec.decode_Bps
        out.append(float((done - exits).max()))
    return float(statistics.median(out))


def memcpy_GBps(nbytes: int = 64 << 20) -> float:
    """This machine's memcpy bandwidth (best of 3), printed beside every measured figure."""
    a = np.ones(nbytes // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9
