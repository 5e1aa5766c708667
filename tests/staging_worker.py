"""Rank bodies for tests/test_backend_staging.py (module level: spawn re-imports it)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from commlayer.backend import staging


def _all(_: torch.Tensor) -> bool:
    return True  # stage every tensor: the path CUDA tensors take, on CPU tensors


def run(rank: int, world: int) -> dict[str, Any]:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    pg = dist.group.WORLD
    out: dict[str, Any] = {}
    try:
        t = torch.full((5,), float(rank + 1))
        before = t.data_ptr()
        w = staging.staged(lambda ts: pg.allreduce(ts), ([t],), "staged allreduce", 60.0, pred=_all)
        fut = w.get_future()
        w.wait()
        out["allreduce"] = t.tolist()
        out["future_is_original"] = fut.value()[0] is t and t.data_ptr() == before
        outs = [torch.zeros(3) for _ in range(world)]
        staging.staged(lambda o, i: pg.allgather(o, i), (outs, torch.full((3,), float(rank))), "staged allgather", 60.0,
                       pred=_all).wait()
        out["allgather"] = [o.tolist() for o in outs]
        # A failing operation fails the staged Work and leaves the original tensor alone.
        if rank == 0:
            pg.send([torch.ones(4)], 1, 5).wait()
        else:
            r = torch.full((3,), -1.0)
            w = staging.staged(lambda ts: pg.recv(ts, 0, 5), ([r],), "staged recv", 60.0, pred=_all)
            try:
                w.wait()
                out["error"] = ""
            except Exception as exc:
                out["error"] = str(exc)
            out["untouched"] = r.tolist()
        pg.barrier().wait()
    finally:
        dist.destroy_process_group()
    return out
