"""Per-rank worker of ``benchmarks/delayed_sync.py`` (run by :func:`commlayer.demo.runner.run_world`).

Configurations (``BACKEND:METHOD[:ARGS]``):

* ``gloo:dense``: DDP, gradients all-reduced every step (fp32).
* ``gloo:postlocal:H``: torch's post-local SGD, ``PostLocalSGDOptimizer`` around the same SGD with a
  ``PeriodicModelAverager(period=H)`` over gloo (parameters averaged every ``H`` steps, blocking).
* ``zmq:stream:H:P:SPEC`` / ``gloo:stream:H:P:SPEC``: :class:`commlayer.sync.StreamingDiLoCo` with
  period ``H`` (or ``auto``), ``P`` fragments and outer codec ``SPEC`` (``exact`` = none).

Same task, seed and data as the demo (:mod:`commlayer.demo.task`). Rank 0 prints ``@@`` protocol
lines (:func:`commlayer.demo.worker.emit`). Before the configurations, every rank trains
``--calib-steps`` steps with no communication at all, at the same time as the others (same
contention): the median is the compute-only step time behind the utilization figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlayer.demo.task import Shard, TaskConfig, evaluate, make_data, make_model
from commlayer.demo.worker import emit

_TIMEOUT = timedelta(seconds=900)


def parse(cfg: str) -> dict[str, Any]:
    """``BACKEND:METHOD[:ARGS]`` -> fields; raises ValueError naming the valid forms."""
    parts = cfg.split(":", 4)
    if len(parts) < 2 or parts[0] not in ("gloo", "zmq") or parts[1] not in ("dense", "postlocal", "stream"):
        raise ValueError(f"config {cfg!r}: expected gloo:dense, gloo:postlocal:H or (zmq|gloo):stream:H:P:SPEC")
    out: dict[str, Any] = {"name": cfg, "backend": parts[0], "method": parts[1]}
    if parts[1] == "postlocal":
        out["period"] = int(parts[2])
    if parts[1] == "stream":
        if len(parts) != 5:
            raise ValueError(f"config {cfg!r}: expected BACKEND:stream:H:P:SPEC, e.g. zmq:stream:auto:4:int8+ef")
        out["period"] = parts[2] if parts[2] == "auto" else int(parts[2])
        out["fragments"], out["codec"] = int(parts[3]), "" if parts[4] == "exact" else parts[4]
    return out


def label(c: dict[str, Any]) -> str:
    if c["method"] == "dense":
        return f"{c['backend']} dense DDP"
    if c["method"] == "postlocal":
        return f"{c['backend']} torch post-local SGD H={c['period']}"
    return f"{c['backend']} streaming DiLoCo H={c['period']} P={c['fragments']} {c['codec'] or 'exact'}"


def calibrate(task: TaskConfig, data: tuple, steps: int) -> float:
    """Median seconds of one local training step (no communication), all ranks at once."""
    model = make_model(task)
    opt = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=0.9)
    shard = Shard(data[0], data[1], dist.get_rank(), dist.get_world_size(), task.batch, task.seed + 99)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = shard.next()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:] if len(times) > 4 else times)


def _build(c: dict[str, Any], task: TaskConfig, groups: dict[str, Any]) -> tuple[nn.Module, nn.Module, Any, Any]:
    """(model to step, model to evaluate, optimizer, streaming sync or None)."""
    model = make_model(task)
    inner = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=0.9)
    if c["method"] == "dense":
        ddp = DDP(model, process_group=groups[c["backend"]], bucket_cap_mb=64)
        return ddp, model, torch.optim.SGD(ddp.parameters(), lr=task.lr, momentum=0.9), None
    if c["method"] == "postlocal":
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        from torch.distributed.optim import PostLocalSGDOptimizer

        avg = PeriodicModelAverager(period=c["period"], warmup_steps=0, process_group=groups[c["backend"]])
        return model, model, PostLocalSGDOptimizer(optim=inner, averager=avg), None
    from commlayer.sync import StreamingConfig, StreamingDiLoCo

    key = f"stream-{c['backend']}"
    if key not in groups:  # every rank builds configurations in the same order, so new_group lines up
        groups[key] = dist.new_group(backend=c["backend"], timeout=_TIMEOUT)
    cfg = StreamingConfig(period=c["period"], fragments=c["fragments"], codec=c["codec"], seed=task.seed)
    return model, model, inner, StreamingDiLoCo(model.parameters(), cfg, group=groups[key])


def train_one(c: dict[str, Any], task: TaskConfig, groups: dict[str, Any], data: tuple, args: argparse.Namespace,
              compute_s: float) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    ctl = groups["ctl"]
    xt, yt, xe, ye = data
    step_model, eval_model, opt, sync = _build(c, task, groups)
    shard = Shard(xt, yt, rank, world, task.batch, task.seed)
    dist.barrier(group=ctl)
    time.sleep(0.5)
    if rank == 0:
        emit("start", {"config": c["name"]})
    curve = [{"step": 0, "time_s": 0.0, "loss": evaluate(eval_model, xe, ye)[0]}]
    clock, reached, step, flag = 0.0, None, 0, torch.zeros(1)
    while step < args.max_steps:
        t0 = time.perf_counter()
        x, y = shard.next()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(step_model(x), y).backward()
        opt.step()
        if sync is not None:
            sync.step()
            if step + 1 == args.max_steps:
                sync.flush()
        clock += time.perf_counter() - t0
        step += 1
        if step % args.eval_every and step < args.max_steps:
            continue
        if rank == 0:
            loss, acc = evaluate(eval_model, xe, ye)
            curve.append({"step": step, "time_s": clock, "loss": loss, "acc": acc})
            if reached is None and loss <= args.target_loss:
                reached = {"step": step, "time_s": clock}
            flag.fill_(1.0 if args.stop_at_target and reached else 0.0)
        dist.broadcast(flag, 0, group=ctl)
        if flag.item():
            if sync is not None:
                sync.flush()
            break
    state = torch.tensor([float(sync.memory()["codec_state_bytes"]) if sync else 0.0, float(sync.bytes_sent) if sync else 0.0])
    per_rank = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(per_rank, state, group=ctl)
    dist.barrier(group=ctl)
    if rank != 0:
        return {}
    emit("end", {"config": c["name"], "steps": step, "time_s": clock})
    time.sleep(0.5)
    out = {"config": c["name"], "label": label(c), "steps": step, "time_s": clock, "s_per_step": clock / max(step, 1),
           "final_loss": curve[-1]["loss"], "final_acc": curve[-1].get("acc", 0.0), "target_loss": args.target_loss,
           "reached": reached, "curve": curve, "compute_s_per_step": compute_s, "samples": step * task.batch * world,
           "codec_state_bytes_per_rank": [int(t[0]) for t in per_rank], "payload_bytes_per_rank": [int(t[1]) for t in per_rank]}
    if sync is not None:
        mem = sync.memory()
        out.update({"sync_utilization": sync.utilization(), "period_final": sync.period, "decisions": sync.decisions[-5:],
                    "grad_bytes": mem["grad_bytes"], "residual_dtype": mem["codec"]["residual_dtype"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="delayed-sync benchmark worker (one rank)")
    ap.add_argument("--configs", required=True)
    ap.add_argument("--task", default="{}")
    ap.add_argument("--max-steps", type=int, default=96)
    ap.add_argument("--target-loss", type=float, default=0.5)
    ap.add_argument("--stop-at-target", action="store_true")
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--calib-steps", type=int, default=24)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    configs = [parse(c) for c in args.configs.split(";") if c.strip()]
    task = TaskConfig(**json.loads(args.task))
    dist.init_process_group("zmq", timeout=_TIMEOUT)
    groups = {"zmq": dist.group.WORLD, "gloo": dist.new_group(backend="gloo", timeout=_TIMEOUT),
              "ctl": dist.new_group(backend="gloo", timeout=_TIMEOUT)}
    data = make_data(task)
    try:
        dist.barrier(group=groups["ctl"])
        compute_s = calibrate(task, data, args.calib_steps)
        for rep in range(args.repeats):
            for c in configs:
                res = train_one(c, task, groups, data, args, compute_s)
                if res:
                    res["repeat"] = rep
                    emit("result", res)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
