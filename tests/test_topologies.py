"""Conformance suite of the topologies: one World per size 1..8 (real processes, real sockets).

Every topology runs every case inside one spawn per world size; exact topologies are compared
with numpy, codecs with the codec's reference aggregation, gossip with its documented bound.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from commlayer.testing.reference import reduce_arrays
from multiproc import free_port, run_world

SIZES = list(range(1, 9))
EXACT_CASES = [("float32", "sum", 7), ("float64", "avg", 3001), ("int64", "max", 5), ("int32", "sum", 1), ("float32", "min", 64)]
CODECS = ["fp16", "int8", "topk:ratio=0.25", "sign:scale=none"]
GOSSIP_ROUNDS = 4
SPECTRAL_GRAPHS = ["ring", "torus", "exponential", "one_peer_exponential", "random_matching"]
SPECTRAL_ROUNDS = 24


def _input(rank: int, n: int, dtype: str, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng([rank, n, salt])
    if dtype.startswith("int"):
        return rng.integers(-50, 50, n).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def _reference(size: int, n: int, dtype: str, op: str) -> np.ndarray:
    return reduce_arrays([_input(r, n, dtype) for r in range(size)], op)


def _codec_reference(spec: str, size: int, n: int, shards: int = 1) -> torch.Tensor:
    """The codec's reference aggregation, per server shard for the parameter server."""
    from commlayer.codecs import CodecContext, aggregation_mode, average_payloads, from_spec
    from commlayer.topologies.ring import even_bounds

    codec = from_spec(spec)
    mode = aggregation_mode(codec)
    scale = size if mode == "allreduce" else 1  # linear codecs encode x / p, like the ring and the server
    xs = [torch.from_numpy(_input(r, n, "float32", 1)) / scale for r in range(size)]
    outs = []
    for a, b in even_bounds(n, shards):
        ctx = CodecContext((b - a,), torch.float32)
        out = average_payloads(codec, [codec.encode(x[a:b].clone(), ctx) for x in xs], ctx)
        outs.append(out * size if mode == "allreduce" else out)
    return torch.cat(outs)


def _conformance(rank: int, size: int, port: int) -> dict:
    from commlayer.topologies import World

    world = World(rank, size, "127.0.0.1", port, timeout=60, seed=3)
    topos = {"ring": world.ring(), "tree": world.tree(), "ps": world.parameter_server(servers=min(2, size)),
             "auto": world.auto()}
    out: dict = {"exact": [], "codec": [], "guarantee": {}}
    for name, topo in topos.items():
        out["guarantee"][name] = topo.guarantee().exact
        for dtype, op, n in EXACT_CASES:
            x = _input(rank, n, dtype)
            y = topo.allreduce(torch.from_numpy(x.copy()) if n % 2 else x.copy(), op)
            y = y.numpy() if isinstance(y, torch.Tensor) else y
            ref = _reference(size, n, dtype, op)
            if dtype.startswith("int"):
                ok = np.array_equal(y.astype(np.float64), np.trunc(ref) if op == "avg" else ref)
            else:
                ok = np.allclose(y, ref, rtol=1e-5, atol=1e-5)
            out["exact"].append((name, dtype, op, n, bool(ok), y.dtype.name == dtype))
        for spec in CODECS:
            n = 257
            x = torch.from_numpy(_input(rank, n, "float32", 1))
            y = topo.average(x, codec=spec)
            ref = _codec_reference(spec, size, n, min(2, size) if name == "ps" else 1)
            tol = 2e-3 if spec == "fp16" else 1e-5
            out["codec"].append((name, spec, bool(torch.allclose(y, ref, rtol=tol, atol=tol)), float((y - ref).abs().max())))
    # Sign majority vote through the server with a 1-bit downlink too (ties become +1).
    ps1 = world.parameter_server(servers=1, downlink="sign:scale=none")
    x = torch.from_numpy(_input(rank, 100, "float32", 1))
    vote = ps1.allreduce(x, "sum", codec="sign:scale=none")
    ref = _codec_reference("sign:scale=none", size, 100)
    out["vote_downlink"] = bool(torch.equal(vote, torch.where(ref == 0, torch.ones_like(ref), ref)))
    # Gossip: exact average of the documented bound, without and with a codec (CHOCO).
    g = world.gossip("ring", rounds=GOSSIP_ROUNDS)
    out["gossip_guarantee"] = g.guarantee().bound
    out["gossip_bound"] = g.contraction_bound(GOSSIP_ROUNDS, start=0)
    x = _input(rank, 50, "float64", 2)
    out["gossip"] = g.average(x)
    out["gossip_sum"] = g.allreduce(x, "sum", rounds=GOSSIP_ROUNDS)
    out["choco"] = g.average(x, codec="int8", rounds=8)
    if size == 8:
        out["spectral"] = {}
        for graph in SPECTRAL_GRAPHS:
            gg = world.gossip(graph)
            z = torch.from_numpy(_input(rank, 32, "float64", 3))
            traj = [z.clone()]
            for _ in range(SPECTRAL_ROUNDS):
                traj.append(gg.mix_(z, "spectral").clone())
            out["spectral"][graph] = (torch.stack(traj).numpy(), [gg.mixing_matrix(t) for t in range(SPECTRAL_ROUNDS)])
    for t in (*topos.values(), ps1, g):
        t.close()
    world.barrier()
    world.close()
    return out


def _all_sizes(rank: int, nproc: int, ports: list[int]) -> dict[int, dict]:
    # One spawn of 8 processes; world k uses ranks 0..k-1 (its own TCPStore port and transport).
    return {size: _conformance(rank, size, port) for size, port in zip(SIZES, ports) if rank < size}


@pytest.fixture(scope="module")
def worlds() -> dict[int, list[dict]]:
    ports = [free_port() for _ in SIZES]
    res = run_world(_all_sizes, max(SIZES), ports, timeout=240)
    return {size: [res[r][size] for r in range(size)] for size in SIZES}


@pytest.mark.parametrize("size", SIZES)
def test_exact_topologies_match_numpy(worlds: dict, size: int) -> None:
    for rank, res in enumerate(worlds[size]):
        bad = [c for c in res["exact"] if not (c[4] and c[5])]
        assert not bad, f"rank {rank}: {bad}"
        assert all(res["guarantee"].values())


@pytest.mark.parametrize("size", SIZES)
def test_codecs_match_reference_aggregation(worlds: dict, size: int) -> None:
    for rank, res in enumerate(worlds[size]):
        bad = [c for c in res["codec"] if not c[2]]
        assert not bad, f"rank {rank}: {bad}"
        assert res["vote_downlink"]


@pytest.mark.parametrize("size", SIZES)
def test_gossip_within_documented_bound(worlds: dict, size: int) -> None:
    x0 = np.stack([_input(r, 50, "float64", 2) for r in range(size)])
    mean = x0.mean(0)
    for key in ("gossip", "gossip_sum", "choco"):
        xk = np.stack([res[key] for res in worlds[size]]) / (size if key == "gossip_sum" else 1)
        assert np.allclose(xk.mean(0), mean, atol=1e-9), key  # the mean is preserved
        e0, ek = np.linalg.norm(x0 - mean), np.linalg.norm(xk - mean)
        if key == "choco":
            assert size == 1 or ek < 0.5 * e0, (ek, e0)
        else:
            assert ek <= worlds[size][0]["gossip_bound"] * e0 + 1e-9, (ek, e0)


def test_gossip_consensus_error_decays_with_the_spectral_gap(worlds: dict) -> None:
    from commlayer.topologies.graphs import contraction, slem

    res = worlds[8]
    for graph in SPECTRAL_GRAPHS:
        traj = np.stack([r["spectral"][graph][0] for r in res], axis=1)  # rounds+1 x ranks x dim
        ws = res[0]["spectral"][graph][1]
        mean = traj[0].mean(0)
        err = np.array([np.linalg.norm(x - mean) for x in traj])
        assert np.allclose(traj[-1].mean(0), mean, atol=1e-9), graph
        for k in range(1, SPECTRAL_ROUNDS + 1):
            assert err[k] <= contraction(ws[:k]) * err[0] * (1 + 1e-9) + 1e-12, (graph, k)
        if graph in ("ring", "torus"):  # static symmetric: the measured rate is the second-largest eigenvalue modulus
            lam = slem(ws[0])
            rate = (err[SPECTRAL_ROUNDS] / err[SPECTRAL_ROUNDS - 10]) ** 0.1
            assert abs(rate - lam) < 0.02 * lam, (graph, rate, lam)
        if graph == "one_peer_exponential":  # exact average after log2(8) = 3 rounds (Ying et al. 2021)
            assert err[3] < 1e-12 * err[0]
