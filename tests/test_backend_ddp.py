"""DDP on the zmq backend ends with the same parameters as DDP on gloo (same model, data, seed)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from multiproc import run_world


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 10))


def _train(rank: int, group: dist.ProcessGroup, steps: int, **ddp_kwargs: object) -> list[torch.Tensor]:
    model = DDP(_model(), process_group=group, **ddp_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        x = torch.randn(16, 32, generator=g)
        y = torch.randint(0, 10, (16,), generator=g)
        if ddp_kwargs.get("gradient_as_bucket_view") and step % 2:
            with model.no_sync():  # exercise local accumulation too
                torch.nn.functional.cross_entropy(model(x), y).backward()
            continue
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, world: int) -> list[float]:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    gloo = dist.new_group(backend="gloo")
    diffs = []
    for kwargs in ({}, {"bucket_cap_mb": 0.05}, {"gradient_as_bucket_view": True}, {"static_graph": True}):
        a = _train(rank, dist.group.WORLD, 8, **kwargs)
        b = _train(rank, gloo, 8, **kwargs)
        diffs.append(max((x - y).abs().max().item() for x, y in zip(a, b)))
        # every rank must hold identical parameters
        flat = torch.cat([p.reshape(-1) for p in a])
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diffs.append((flat - ref).abs().max().item())
    dist.destroy_process_group()
    return diffs


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_matches_gloo(world: int) -> None:
    for rank, diffs in enumerate(run_world(_worker, world, timeout=240)):
        # Same float32 sums in a different order: parameters agree to float32 rounding.
        assert max(diffs) < 1e-5, f"rank {rank}: max parameter difference {diffs}"
