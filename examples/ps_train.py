"""Parameter-server training on 4 ranks: two co-located servers hold the sharded parameters and run
the optimizer; workers push gradients and pull parameters (commlayer.training.ParameterServerTrainer).

    python examples/ps_train.py                                   # synchronous, exact averaging
    python examples/ps_train.py --mode async --staleness 2        # stale-synchronous parallel
    python examples/ps_train.py --uplink sign:scale=none --lr 0.01   # signSGD with majority vote
    python examples/ps_train.py --uplink int8 --downlink fp16      # compressed both ways
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from _local import add_fault_args, maybe_die, spawn


def make_data(rank: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 8, generator=gen)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def train(args: argparse.Namespace) -> None:
    from commlayer.topologies import World

    with World.from_env() as world:  # sockets and files go on every exit path
        _train(world, args)


def _train(world: "Any", args: argparse.Namespace) -> None:
    from commlayer.training import ParameterServerTrainer
    from commlayer.transport.errors import CommError

    ps = world.parameter_server(servers=args.servers, mode=args.mode, staleness=args.staleness, lr=args.lr,
                                uplink=args.uplink or None, downlink=args.downlink or None)
    torch.manual_seed(world.rank)  # different local inits: the first worker's weights win at init
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    trainer = ParameterServerTrainer(ps, model)
    x, y = make_data(world.rank)
    t0 = time.perf_counter()
    for step in range(args.steps):
        maybe_die(world.rank, step, args)
        loss = torch.nn.functional.mse_loss(model(x), y)
        model.zero_grad()
        loss.backward()
        trainer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"rank {world.rank} step {step:4d} loss {loss.item():.4f}", flush=True)
    trainer.close()
    if ps.is_server:
        for s, st in ps.server_stats().items():
            print(f"server rank {world.rank} shard {s}: {st['updates']} updates, max staleness granted {st['max_staleness']}, "
                  f"duplicates {st['duplicates']}")
    if world.rank == 0:
        print(f"mode={args.mode} uplink={args.uplink or 'none'}: {args.steps} steps in {time.perf_counter() - t0:.2f} s, "
              f"bytes sent by rank 0: {ps.bytes_sent()}")
    print(f"rank {world.rank}: training finished ({args.steps} steps)", flush=True)
    try:  # needs every rank; training itself already finished on this one
        world.barrier()
    except CommError as exc:
        print(f"rank {world.rank}: final barrier skipped ({exc})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--mode", default="sync", choices=["sync", "async"])
    ap.add_argument("--staleness", type=int, default=0)
    ap.add_argument("--uplink", default="")
    ap.add_argument("--downlink", default="")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.1)
    add_fault_args(ap)
    args = ap.parse_args()
    if "RANK" in os.environ:
        train(args)
        return
    raise SystemExit(spawn(train, args.nproc, args))


if __name__ == "__main__":
    main()
