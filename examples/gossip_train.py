"""D-PSGD on 4 ranks: each rank trains its own copy of a small MLP on its own generated data and
mixes parameters with its graph neighbours after every step (commlayer.training.GossipAverager).

    python examples/gossip_train.py                         # spawns 4 local ranks
    python examples/gossip_train.py --graph exponential --codec int8   # CHOCO-SGD
    torchrun --nproc-per-node 4 examples/gossip_train.py    # or any launcher setting RANK/WORLD_SIZE/MASTER_*
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from _local import add_fault_args, maybe_die, spawn


def make_data(rank: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 8, generator=gen) + 0.3 * rank  # each rank sees a shifted slice (non-iid)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def train(args: argparse.Namespace) -> None:
    from commlayer.topologies import World

    with World.from_env() as world:  # sockets and files go on every exit path
        _train(world, args)


def _train(world: "Any", args: argparse.Namespace) -> None:
    from commlayer.training import GossipAverager
    from commlayer.transport.errors import CommError

    gossip = world.gossip(args.graph, mode=args.mode)
    averager = GossipAverager(gossip, codec=args.codec or None)
    torch.manual_seed(0)  # same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    x, y = make_data(world.rank)
    for step in range(args.steps):
        maybe_die(world.rank, step, args)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        averager.average_parameters(model.parameters())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"rank {world.rank} step {step:4d} loss {loss.item():.4f}", flush=True)
    print(f"rank {world.rank}: training finished ({args.steps} steps)", flush=True)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    try:  # the summary needs every rank; training itself already finished on this one
        spread = world.ring().allreduce(flat, "max") - world.ring().allreduce(flat, "min")
        if world.rank == 0:
            print(f"graph={args.graph} mode={args.mode} codec={args.codec or 'none'}: max parameter spread across ranks "
                  f"{spread.max().item():.2e}, bytes sent by rank 0: {gossip.bytes_sent()}")
        world.barrier()
    except CommError as exc:
        print(f"rank {world.rank}: no cross-rank summary ({exc})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--graph", default="ring", help="ring, torus, exponential, one_peer_exponential, random_matching, complete")
    ap.add_argument("--mode", default="sync", choices=["sync", "async"])
    ap.add_argument("--codec", default="", help="codec spec for CHOCO-SGD, e.g. int8 or topk:ratio=0.1")
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
