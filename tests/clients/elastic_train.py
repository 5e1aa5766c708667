"""A torchrun training script (DDP, a few steps) whose rank 1 raises once, on the first attempt.

Usage: torchrun --nproc-per-node=2 --max-restarts=1 elastic_train.py BACKEND OUT_FILE FAIL(0|1)
Rank 0 writes the final parameters (JSON) to OUT_FILE. With FAIL=1, rank 1 raises after two steps
of attempt 0 (``TORCHELASTIC_RESTART_COUNT``), so only a recovered restart can write them.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import commlayer._autoload  # noqa: F401 - registers "zmq" (the entry point does too, when installed)


def main() -> None:
    backend, out, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group(backend, timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        if fail and attempt == 0 and rank == 1 and step == 2:
            raise RuntimeError("injected failure on attempt 0")
        g = torch.Generator().manual_seed(100 * step + rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(4, 8, generator=g)), torch.randn(4, 4, generator=g)).backward()
        opt.step()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"attempt": attempt, "params": [p.detach().reshape(-1).tolist() for p in model.parameters()]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    commlayer._autoload.register_backend()
    main()
