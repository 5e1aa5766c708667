"""D-PSGD on 4 ranks: each rank trains its own copy of a small MLP on its own generated data and
mixes parameters with its graph neighbours after every step (commlayer.training.GossipAverager).

    python examples/gossip_train.py                         # spawns 4 local ranks
    python examples/gossip_train.py --graph exponential --codec int8   # CHOCO-SGD
    torchrun --nproc-per-node 4 examples/gossip_train.py    # or any launcher setting RANK/WORLD_SIZE/MASTER_*
"""

from __future__ import annotations

import argparse
import os

import torch


def make_data(rank: int, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(n, 8, generator=gen) + 0.3 * rank  # each rank sees a shifted slice (non-iid)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def train(args: argparse.Namespace) -> None:
    from commlayer.topologies import World
    from commlayer.training import GossipAverager

    world = World.from_env()
    gossip = world.gossip(args.graph, mode=args.mode)
    averager = GossipAverager(gossip, codec=args.codec or None)
    torch.manual_seed(0)  # same initial model on every rank
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    x, y = make_data(world.rank)
    for step in range(args.steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        averager.average_parameters(model.parameters())
        if step % 50 == 0 or step == args.steps - 1:
            print(f"rank {world.rank} step {step:4d} loss {loss.item():.4f}", flush=True)
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    spread = world.ring().allreduce(flat, "max") - world.ring().allreduce(flat, "min")
    if world.rank == 0:
        print(f"graph={args.graph} mode={args.mode} codec={args.codec or 'none'}: max parameter spread across ranks "
              f"{spread.max().item():.2e}, bytes sent by rank 0: {gossip.bytes_sent()}")
    world.barrier()
    world.close()


def _rank(rank: int, size: int, args: argparse.Namespace) -> None:
    train(args)  # commlayer.testing.run_world set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--graph", default="ring", help="ring, torus, exponential, one_peer_exponential, random_matching, complete")
    ap.add_argument("--mode", default="sync", choices=["sync", "async"])
    ap.add_argument("--codec", default="", help="codec spec for CHOCO-SGD, e.g. int8 or topk:ratio=0.1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole local run")
    args = ap.parse_args()
    if "RANK" in os.environ:
        train(args)
        return
    from commlayer.testing import run_world

    try:
        run_world(_rank, args.nproc, args, timeout=args.timeout)
    except (AssertionError, TimeoutError) as exc:
        raise SystemExit(f"{exc}") from None


if __name__ == "__main__":
    main()
