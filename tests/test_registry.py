"""The all-reduce algorithm registry: every registered algorithm runs, exactly and with codecs, at 1-4
ranks (real processes) against numpy; option validation lists the known names; every algorithm has
a cost the model can evaluate; a plug-in algorithm is one register() call away; and the zmq backend
carries a codec over every algorithm (COMMLAYER_ALGO=ps with a codec used to be silently dropped)."""

from __future__ import annotations

import math
import zlib
from datetime import timedelta

import numpy as np
import pytest
import torch

from commlayer.adapt.cost import CodecProfile, CostParams, allreduce_time
from commlayer.adapt.estimator import LinkMatrixSnapshot
from commlayer.topologies import registry
from multiproc import free_port, run_world

MB = 1e6
P = CostParams()
BUILTIN = ("ring", "tree", "chain", "ps")
EXACT = [("float32", "sum", 1001), ("float64", "avg", 37), ("int64", "max", 5), ("float32", "min", 3)]
CODECS = ["fp16", "topk:ratio=0.25", "sign:scale=none"]


def test_builtin_algorithms_are_registered() -> None:
    assert registry.names() == BUILTIN
    assert registry.names(auto=True) == ("auto", *BUILTIN)
    assert [a.name for a in registry.candidates()] == ["ring", "tree"]  # what the planner priced before
    assert all(a.gather in registry.GATHERS for a in map(registry.get, BUILTIN))


def test_unknown_algorithm_errors_list_the_known_names() -> None:
    from commlayer.backend.options import ZmqOptions

    for name in registry.names(auto=True):
        assert ZmqOptions(algo=name).algo == name
    with pytest.raises(ValueError, match=r"COMMLAYER_ALGO / algo: expected one of \('auto', 'ring', 'tree', 'chain', 'ps'\), got 'rings'"):
        ZmqOptions(algo="rings")
    with pytest.raises(ValueError, match=r"Expected algo in \('auto', 'ring', 'tree', 'chain', 'ps'\), got 'bogus'"):
        registry.get("bogus")
    with pytest.raises(ValueError, match="Expected a new algorithm name"):
        registry.register(registry.get("ring"))


def _hetero(p: int) -> LinkMatrixSnapshot:
    rng = np.random.default_rng(p)
    alpha = [[0.0 if i == j else float(rng.uniform(1e-4, 0.05)) for j in range(p)] for i in range(p)]
    beta = [[math.inf if i == j else float(rng.uniform(1, 100)) * MB for j in range(p)] for i in range(p)]
    return LinkMatrixSnapshot.from_lists(alpha, beta)


@pytest.mark.parametrize("p", range(1, 7))
def test_cost_is_defined_for_every_algorithm_and_codec_kind(p: int) -> None:
    codecs = [CodecProfile(""), CodecProfile("fp16", 0.5, 1e9, 1e9, 1e-3, True), CodecProfile("int8", 0.26, 1e9, 1e9, 5e-3, False)]
    for s in (LinkMatrixSnapshot.uniform(p, 0.01, 10 * MB), _hetero(p)):
        for name in registry.names():
            order = list(range(p))[::-1]
            for codec in codecs:
                small = allreduce_time(s, 4096, name, order, 1 << 20, P, codec)
                big = allreduce_time(s, 8 << 20, name, order, 1 << 20, P, codec)
                assert math.isfinite(small) and math.isfinite(big) and 0 <= small <= big, (name, codec.spec, small, big)
                if p > 1:
                    assert big > 0


def test_chain_cost_is_the_pipelined_path_closed_form() -> None:
    p, n, chunk, alpha, beta = 4, 8 << 20, 1 << 20, 0.02, 40 * MB
    s = LinkMatrixSnapshot.uniform(p, alpha, beta)
    k = n // chunk
    # each phase: the first chunk crosses p-1 hops, the other k-1 follow one serialization apart
    phase = (p - 1) * (alpha + chunk / beta) + (k - 1) * chunk / beta
    assert registry.get("chain").cost(s, n, None, chunk, P) == pytest.approx(2 * phase, rel=0.05)
    # it follows the given path: routing around one slow link makes it faster
    slow = [[math.inf if i == j else (beta / 10 if {i, j} == {1, 2} else beta) for j in range(p)] for i in range(p)]
    sl = LinkMatrixSnapshot.from_lists([[0.0 if i == j else alpha for j in range(p)] for i in range(p)], slow)
    chain = registry.get("chain").cost
    assert chain(sl, n, [1, 0, 3, 2], chunk, P) < 0.5 * chain(sl, n, [0, 1, 2, 3], chunk, P)


# ---- every algorithm over real processes ----------------------------------------------------------
def _input(rank: int, n: int, dtype: str, salt: int = 0) -> np.ndarray:
    rng = np.random.default_rng([rank, n, salt])
    if dtype.startswith("int"):
        return rng.integers(-50, 50, n).astype(dtype)
    return rng.standard_normal(n).astype(dtype)


def _reversed_ring(comm, flat, op, order, chunk_bytes):  # type: ignore[no-untyped-def]
    from commlayer.topologies.ring import ring_allreduce

    ring_allreduce(comm, flat, op, order=list(range(comm.size))[::-1], chunk_bytes=chunk_bytes)


def _world(rank: int, size: int, port: int) -> dict:
    from commlayer.backend.options import ZmqOptions
    from commlayer.codecs import CodecContext, aggregation_mode, average_payloads, from_spec
    from commlayer.topologies import World
    from commlayer.topologies.base import Collective

    ZmqOptions(algo="ring_reversed")  # the plug-in registered in _all_sizes is a valid option too
    world = World(rank, size, "127.0.0.1", port, timeout=60, seed=3)
    out: dict = {"exact": [], "codec": []}
    topos = {name: Collective(world, world.group(name), name) for name in registry.names()}
    topos["chain/reversed"] = Collective(world, world.group("chainrev"), "chain", order=list(range(size))[::-1], chunk_bytes=1024)
    for name, topo in topos.items():
        for dtype, op, n in EXACT:
            x = _input(rank, n, dtype)
            y = topo.allreduce(x.copy(), op)
            xs = np.stack([_input(r, n, dtype).astype(np.float64) for r in range(size)])
            ref = {"sum": xs.sum(0), "avg": xs.mean(0), "max": xs.max(0), "min": xs.min(0)}[op]
            ok = np.array_equal(y, ref) if dtype.startswith("int") else np.allclose(y, ref, rtol=1e-5, atol=1e-5)
            out["exact"].append((name, dtype, op, n, bool(ok), y.tobytes()))
        for spec in CODECS:
            n = 257
            y = topo.average(torch.from_numpy(_input(rank, n, "float32", 1)), codec=spec)
            codec = from_spec(spec)
            scale = size if aggregation_mode(codec) == "allreduce" else 1  # linear codecs encode x / p
            ctx = CodecContext((n,), torch.float32)
            pays = [from_spec(spec).encode(torch.from_numpy(_input(r, n, "float32", 1)) / scale, ctx) for r in range(size)]
            ref = average_payloads(codec, pays, ctx) * scale
            tol = 2e-3 if spec == "fp16" else 1e-5
            out["codec"].append((name, spec, bool(torch.allclose(y, ref, rtol=tol, atol=tol)), y.numpy().tobytes()))
    world.barrier()
    world.close()
    return out


def _all_sizes(rank: int, nproc: int, ports: list[int]) -> dict[int, dict]:
    from commlayer.topologies.ring import ring_allreduce_time

    # A plug-in algorithm: its function + one registry entry, nothing else.
    registry.register(registry.Algorithm("ring_reversed", _reversed_ring, ring_allreduce_time, gather="ring"))
    return {size: _world(rank, size, port) for size, port in zip(range(1, 5), ports) if rank < size}


@pytest.fixture(scope="module")
def worlds() -> dict[int, list[dict]]:
    ports = [free_port() for _ in range(4)]
    res = run_world(_all_sizes, 4, ports, timeout=240)
    return {size: [res[r][size] for r in range(size)] for size in range(1, 5)}


@pytest.mark.parametrize("size", range(1, 5))
def test_every_algorithm_matches_numpy_and_agrees_across_ranks(worlds: dict, size: int) -> None:
    ranks = worlds[size]
    names = {row[0] for row in ranks[0]["exact"]}
    assert names == {*BUILTIN, "ring_reversed", "chain/reversed"}
    for kind in ("exact", "codec"):
        for i, row in enumerate(ranks[0][kind]):
            assert all(r[kind][i][-2] for r in ranks), (size, kind, row[:-1])  # matches the reference on every rank
            assert all(r[kind][i][-1] == row[-1] for r in ranks), (size, kind, row[:-2])  # bitwise equal across ranks


# ---- the zmq backend carries a codec over every registered algorithm -------------------------------
def _data(rank: int, n: int, key: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{key}{rank}".encode()))
    return torch.randn(n, generator=g)


def _backend(rank: int, world: int) -> dict:
    import torch.distributed as dist

    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    gloo = dist.new_group(backend="gloo")
    out: dict = {}
    for name in registry.names():
        exact = dist.new_group(pg_options={"algo": name})
        topk = dist.new_group(pg_options={"algo": name, "codec": "topk:ratio=0.01"})
        fp16 = dist.new_group(pg_options={"algo": name, "codec": "fp16"})
        x = _data(rank, 30_000, "x")
        ref = x.clone()
        dist.all_reduce(ref, group=gloo)
        y = x.clone()
        dist.all_reduce(y, group=exact)
        t = _data(rank, 40_000, "topk")
        dist.all_reduce(t, group=topk)
        expect = torch.zeros(40_000)
        for r in range(world):  # the sum of every rank's exact top-1 % (by magnitude)
            d = _data(r, 40_000, "topk")
            idx = d.abs().topk(400).indices
            expect[idx] += d[idx]
        h = x.clone()
        dist.all_reduce(h, group=fp16)
        out[name] = {"exact": float((y - ref).abs().max()), "topk": float((t - expect).abs().max()),
                     "fp16": float((h - ref).norm() / ref.norm()), "wire": fp16.compression.stats.wire_bytes,
                     "input": fp16.compression.stats.input_bytes}
    dist.destroy_process_group()
    return out


def test_backend_runs_codecs_over_every_algorithm() -> None:
    res = run_world(_backend, 3, timeout=240)
    for name in registry.names():
        for r in res:
            row = r[name]
            assert row["exact"] < 1e-4 and row["topk"] < 1e-5 and row["fp16"] < 1e-3, (name, row)
            assert row["wire"] * 2 == row["input"], (name, row)  # fp16 really ran (half the bytes)
