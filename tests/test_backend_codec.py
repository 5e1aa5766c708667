"""COMMLAYER_CODEC inside the zmq backend: lossy only where documented, exact everywhere else."""

from __future__ import annotations

import zlib
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from multiproc import run_world


def _data(rank: int, n: int, key: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{key}{rank}".encode()))
    return torch.randn(n, generator=g)


def _codec_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    gloo = dist.new_group(backend="gloo")
    out: dict = {}
    big = _data(rank, 50_000, "big")
    ref = big.clone()
    dist.all_reduce(big)
    dist.all_reduce(ref, group=gloo)
    out["fp16_rel_err"] = ((big - ref).norm() / ref.norm()).item()
    small = _data(rank, 100, "small")
    sref = small.clone()
    dist.all_reduce(small)
    dist.all_reduce(sref, group=gloo)
    out["small_max_diff"] = (small - sref).abs().max().item()
    ints = torch.arange(50_000, dtype=torch.int64) * (rank + 1)
    iref = ints.clone()
    dist.all_reduce(ints)
    dist.all_reduce(iref, group=gloo)
    out["ints_equal"] = torch.equal(ints, iref)
    mx = _data(rank, 50_000, "max")
    mref = mx.clone()
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(mref, op=dist.ReduceOp.MAX, group=gloo)
    out["max_equal"] = torch.equal(mx, mref)
    b = _data(rank, 50_000, "bc")
    dist.broadcast(b, src=1)
    out["bcast_equal"] = torch.equal(b, _data(1, 50_000, "bc"))
    stats = dist.group.WORLD.compression.stats
    out["compressed_calls"] = stats.calls
    out["wire_ratio"] = stats.wire_bytes / stats.input_bytes
    # A non-linear codec in a subgroup's options: top-k goes through an all-gather of payloads.
    sub = dist.new_group(pg_options={"codec": "topk:ratio=0.01"})
    t = _data(rank, 40_000, "topk")
    dist.all_reduce(t, group=sub)
    expect = torch.zeros(40_000)
    for r in range(world):  # reference: the sum of every rank's exact top-1% (by magnitude)
        x = _data(r, 40_000, "topk")
        idx = x.abs().topk(400).indices
        expect[idx] += x[idx]
    out["topk_max_diff"] = (t - expect).abs().max().item()
    dist.destroy_process_group()
    return out


def test_codec_compresses_only_float_sum_above_threshold() -> None:
    for r in run_world(_codec_worker, 3, timeout=120, env={"COMMLAYER_CODEC": "fp16"}):
        assert r["fp16_rel_err"] < 2e-3, r  # fp16 rounding of the inputs and the partial sums
        assert r["fp16_rel_err"] > 0, r  # it really went through the codec
        assert r["small_max_diff"] < 1e-5 and r["ints_equal"] and r["max_equal"] and r["bcast_equal"], r
        assert r["compressed_calls"] == 1 and r["wire_ratio"] == pytest.approx(0.5), r
        assert r["topk_max_diff"] < 1e-5, r


def _ddp_worker(rank: int, world: int, spec: str) -> float:
    import os

    if spec:
        os.environ["COMMLAYER_CODEC"] = spec
        os.environ["COMMLAYER_CODEC_MIN_BYTES"] = "4096"
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(20, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1 + rank)
    w = torch.randn(20, generator=torch.Generator().manual_seed(7))
    loss = torch.tensor(0.0)
    for _ in range(60):
        x = torch.randn(64, 20, generator=g)
        y = (x @ w > 0).long()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    dist.all_reduce(loss.detach_(), op=dist.ReduceOp.AVG)
    dist.destroy_process_group()
    return loss.item()


def test_ddp_with_backend_codec_converges_like_dense() -> None:
    dense = run_world(_ddp_worker, 2, "", timeout=120)[0]
    for spec in ("topk:ratio=0.05+ef", "int8"):
        lossy = run_world(_ddp_worker, 2, spec, timeout=120)[0]
        assert lossy < dense * 1.25 + 0.03, f"{spec}: final loss {lossy:.4f} vs dense {dense:.4f}"
