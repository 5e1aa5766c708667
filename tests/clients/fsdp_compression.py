"""FSDP2 training with commlayer's compressed reduce-scatter (or none: exact), on one rank."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def train_all(rank: int, world: int, backend: str, codecs: list[str]) -> dict[str, Any]:
    """Trains once per codec ("" = exact FSDP2) in one world of ``backend``."""
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        return {codec: _train(rank, codec) for codec in codecs}
    finally:
        dist.destroy_process_group()


def _train(rank: int, codec: str, steps: int = 12) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    from commlayer.training.fsdp_reduce_scatter import install

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    teacher = torch.nn.Linear(32, 4)
    fully_shard(model)
    comms = install(model, codec, min_numel=64) if codec else {}
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(32, 32, generator=g)
        with torch.no_grad():
            y = teacher(x)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
        losses.append(float(t))
    stats = [(c.stats.calls, c.stats.exact_calls, c.stats.wire_bytes, c.stats.dense_bytes) for c in comms.values()]
    params = [p.full_tensor().detach().reshape(-1).tolist() for p in model.parameters()]
    return {"losses": losses, "stats": stats, "params": params}
