"""Per-rank training worker of the demo and the time-to-accuracy benchmark.

Run by :mod:`commlayer.demo.runner` under ``commlayer.wan`` (one process per rank, torchrun's
environment). Trains every configuration in turn from the same seed and initial weights. Rank 0
prints protocol lines ``@@ EVENT JSON`` that the runner parses (start/end markers let it attribute
the emulator's byte counters to a configuration; ``eval`` lines report progress).

Timing: the clock runs during training steps only; evaluation (rank 0, on the averaged model) and
the stop-decision broadcast are excluded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlayer import settings
from commlayer.demo.configs import RunConfig, parse_config
from commlayer.demo.task import Shard, TaskConfig, evaluate, make_data, make_model

logger = logging.getLogger(__name__)
_PAUSE_S = 0.5  # quiet time around markers so byte counters separate configurations


def emit(event: str, payload: dict[str, Any]) -> None:
    """Prints one protocol line (rank 0 only)."""
    print(f"@@ {event} {json.dumps(payload)}", flush=True)


def _build(cfg: RunConfig, task: TaskConfig, groups: dict[str, Any]) -> tuple[nn.Module, nn.Module, Any, Any]:
    """(model to step, model to evaluate, averager or None, hook state or None)."""
    group = groups[cfg.backend]
    if cfg.codec:  # every rank builds configurations in the same order, so new_group lines up
        key = f"zmq@{cfg.codec}"
        if key not in groups:
            groups[key] = dist.new_group(pg_options={"codec": cfg.codec, "codec_min_bytes": 4096}, timeout=timedelta(seconds=600))
        group = groups[key]
    model = make_model(task)
    if cfg.method in ("local", "diloco"):
        from commlayer.sync import diloco, local_sgd
        avg = local_sgd(model.parameters(), cfg.period, group=group) if cfg.method == "local" else \
            diloco(model.parameters(), cfg.period, group=group)
        return model, model, avg, None
    ddp = DDP(model, process_group=group, bucket_cap_mb=64)
    state = None
    if cfg.method == "torch-powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
        state = psgd.PowerSGDState(process_group=group, matrix_approximation_rank=int(cfg.arg), start_powerSGD_iter=2,
                                   min_compression_rate=2, use_error_feedback=True, warm_start=True, random_seed=task.seed)
        ddp.register_comm_hook(state, psgd.powerSGD_hook)
    elif cfg.method == "hook":
        from commlayer.hooks import CodecHookState, codec_hook
        state = CodecHookState.from_spec(cfg.arg, process_group=group, seed=task.seed)  # type: ignore[assignment]
        ddp.register_comm_hook(state, codec_hook)
    return ddp, model, None, state


def train_one(cfg: RunConfig, task: TaskConfig, groups: dict[str, Any], data: tuple, args: argparse.Namespace) -> dict[str, Any]:
    """Trains one configuration; returns rank 0's curve and summary (other ranks: {})."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ctl = groups["gloo"]
    xt, yt, xe, ye = data
    step_model, eval_model, avg, _state = _build(cfg, task, groups)
    opt = torch.optim.SGD(step_model.parameters(), lr=task.lr, momentum=0.9)
    shard = Shard(xt, yt, rank, world, task.batch, task.seed)
    # Evaluate only where all replicas agree (after a synchronization).
    every = max(args.eval_every, cfg.period)
    every -= every % cfg.period
    dist.barrier(group=ctl)
    time.sleep(_PAUSE_S)
    if rank == 0:
        emit("start", {"config": cfg.name})
    curve: list[dict[str, float]] = []
    clock, reached, step = 0.0, None, 0
    flag = torch.zeros(1)
    loss0, acc0 = evaluate(eval_model, xe, ye)
    curve.append({"step": 0, "time_s": 0.0, "loss": loss0, "acc": acc0})
    while step < args.max_steps:
        t0 = time.perf_counter()
        x, y = shard.next()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(step_model(x), y).backward()
        opt.step()
        if avg is not None:
            avg.step()
        clock += time.perf_counter() - t0
        step += 1
        if step % every and step < args.max_steps:
            continue
        if rank == 0:
            loss, acc = evaluate(eval_model, xe, ye)
            curve.append({"step": step, "time_s": clock, "loss": loss, "acc": acc})
            if reached is None and loss <= args.target_loss:
                reached = {"step": step, "time_s": clock}
            emit("eval", {"config": cfg.name, "step": step, "time_s": round(clock, 3), "loss": loss, "acc": acc})
            stop = clock >= args.budget_s or (args.stop_at_target and reached is not None)
            flag.fill_(1.0 if stop else 0.0)
        dist.broadcast(flag, 0, group=ctl)
        if flag.item():
            break
    dist.barrier(group=ctl)
    if rank != 0:
        return {}
    summary = {"config": cfg.name, "label": cfg.label(), "steps": step, "time_s": clock, "s_per_step": clock / max(step, 1),
               "final_loss": curve[-1]["loss"], "final_acc": curve[-1]["acc"], "target_loss": args.target_loss,
               "reached": reached, "curve": curve}
    emit("end", {"config": cfg.name, "steps": step, "time_s": clock})
    time.sleep(_PAUSE_S)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="commlayer demo worker (one rank)")
    ap.add_argument("--configs", required=True, help="BACKEND:METHOD[:ARG] list separated by ';'")
    ap.add_argument("--task", default="{}", help="TaskConfig fields as JSON")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop a configuration after this much training time")
    ap.add_argument("--target-loss", type=float, default=0.5)
    ap.add_argument("--stop-at-target", action="store_true")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    configs = [parse_config(c) for c in args.configs.split(";") if c.strip()]
    task = TaskConfig(**json.loads(args.task))
    dist.init_process_group("zmq", timeout=timedelta(seconds=600))
    groups = {"zmq": dist.group.WORLD, "gloo": dist.new_group(backend="gloo", timeout=timedelta(seconds=600))}
    data = make_data(task)
    try:
        for rep in range(args.repeats):
            for cfg in configs:
                res = train_one(cfg, task, groups, data, args)
                if res:
                    res["repeat"] = rep
                    emit("result", res)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=settings.get("COMMLAYER_LOG"))
    sys.exit(main())
