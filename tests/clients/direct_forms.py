"""Every call form of gloo's ProcessGroup methods, on the zmq and the gloo group object side by side.

The forms are those the pybind overloads of ``dist.ProcessGroup`` accept (``help(dist.ProcessGroup.allreduce)``):
torchft and other wrappers call them on the group object directly.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from torch._C._distributed_c10d import _create_work_from_future

from clients import plain

T = timedelta(seconds=60)


def _forms(pg: dist.ProcessGroup, rank: int, p: int) -> dict[str, Any]:
    """Runs every form on ``pg``; returns the tensors each produced."""
    out: dict[str, Any] = {}

    def v(k: float = 1.0) -> torch.Tensor:
        return torch.arange(4, dtype=torch.float32) * k + rank

    def run(name: str, fn: Callable[[], Any], result: Any, keep: bool = True) -> None:
        work = fn()
        assert work.wait(), name
        if keep:  # off the root of a reduce the tensor's content is unspecified (gloo leaves partial sums)
            out[name] = [t.clone() for t in result] if isinstance(result, list) else result.clone()

    t = v(); run("allreduce(t)", lambda: pg.allreduce(t), t)
    t = v(); run("allreduce([t], SUM)", lambda: pg.allreduce([t], ReduceOp.SUM), t)
    t = v(); run("allreduce(t, MAX)", lambda: pg.allreduce(t, ReduceOp.MAX), t)
    t = v(); run("allreduce(t, op=MIN)", lambda: pg.allreduce(t, op=ReduceOp.MIN), t)
    t = v(); o = dist.AllreduceOptions(); o.reduceOp = ReduceOp.PRODUCT
    run("allreduce([t], opts)", lambda: pg.allreduce([t], o), t)
    t = v(); run("allreduce(t, SUM, timeout)", lambda: pg.allreduce(t, ReduceOp.SUM, T), t)
    a, b = v(), v(2)
    run("allreduce_coalesced", lambda: pg.allreduce_coalesced([a, b], dist.AllreduceCoalescedOptions()), [a, b])
    t = v(); run("broadcast(t, 1)", lambda: pg.broadcast(t, 1), t)
    t = v(); o = dist.BroadcastOptions(); o.rootRank = 0
    run("broadcast([t], opts)", lambda: pg.broadcast([t], o), t)
    t = v(); run("reduce(t, 0)", lambda: pg.reduce(t, 0), t, rank == 0)
    t = v(); run("reduce(t, 1, MAX)", lambda: pg.reduce(t, 1, ReduceOp.MAX), t, rank == 1)
    outs = [torch.zeros(4) for _ in range(p)]
    run("allgather(outs, t)", lambda: pg.allgather(outs, v()), outs)
    outs = [torch.zeros(4) for _ in range(p)]
    run("allgather([outs], [t])", lambda: pg.allgather([outs], [v()]), outs)
    big = torch.zeros(4 * p)
    run("_allgather_base", lambda: pg._allgather_base(big, v()), big)
    gl = [torch.zeros(4) for _ in range(p)] if rank == 0 else []
    run("gather(outs, t, 0)", lambda: pg.gather(gl, v(), 0), gl if rank == 0 else torch.zeros(0))
    gl = [torch.zeros(4) for _ in range(p)] if rank == 1 else []
    o = dist.GatherOptions(); o.rootRank = 1
    run("gather([outs], [t], opts)", lambda: pg.gather([gl] if rank == 1 else [], [v()], o), gl if rank == 1 else torch.zeros(0))
    t = torch.zeros(4)
    run("scatter(t, ins, 0)", lambda: pg.scatter(t, [v(k) for k in range(p)] if rank == 0 else [], 0), t)
    t = torch.zeros(4)
    run("reduce_scatter(t, ins)", lambda: pg.reduce_scatter(t, [v(k) for k in range(p)]), t)
    t = torch.zeros(4)
    run("reduce_scatter(t, ins, MAX)", lambda: pg.reduce_scatter(t, [v(k) for k in range(p)], ReduceOp.MAX), t)
    t = torch.zeros(4)
    run("_reduce_scatter_base", lambda: pg._reduce_scatter_base(t, torch.cat([v(k) for k in range(p)]), dist.ReduceScatterOptions()), t)
    o1, o2 = torch.zeros(4 * p), torch.zeros(2 * p)
    run("allgather_into_tensor_coalesced", lambda: pg.allgather_into_tensor_coalesced([o1, o2], [v(), v()[:2]]), [o1, o2])
    r1, r2 = torch.zeros(4), torch.zeros(2)
    run("reduce_scatter_tensor_coalesced", lambda: pg.reduce_scatter_tensor_coalesced(
        [r1, r2], [torch.cat([v(k) for k in range(p)]), torch.cat([v(k)[:2] for k in range(p)])], dist.ReduceScatterOptions()), [r1, r2])
    outs = [torch.zeros(4) for _ in range(p)]
    run("alltoall", lambda: pg.alltoall(outs, [v(k) for k in range(p)], dist.AllToAllOptions()), outs)
    t = torch.zeros(4 * p)
    run("alltoall_base(..., [], [])", lambda: pg.alltoall_base(t, torch.cat([v(k) for k in range(p)]), [], []), t)
    t = torch.zeros(4 * p)
    run("alltoall_base(..., timeout)", lambda: pg.alltoall_base(t, torch.cat([v(k) for k in range(p)]), [], [], T), t)
    assert pg.barrier().wait()
    assert pg.barrier(T).wait()
    t = v() if rank == 0 else torch.zeros(4)
    w = pg.send([t], 1, 7) if rank == 0 else pg.recv([t], 0, 7)
    w.wait()
    out["send/recv"] = t.clone()
    return out


def run_forms(rank: int, world: int) -> dict[str, Any]:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=T)
    try:
        gloo = dist.new_group(backend="gloo", timeout=T)
        mine = _forms(dist.group.WORLD, rank, world)
        ref = _forms(gloo, rank, world)
        return {"zmq": plain(mine), "gloo": plain(ref)}
    finally:
        dist.destroy_process_group()


class SwallowingWrapper:
    """A torchft-style wrapper by composition: it forwards to the wrapped group and, like torchft's
    error-swallowing wrapper, turns an error into a log entry and a completed Work."""

    def __init__(self, pg: dist.ProcessGroup) -> None:
        self._pg = pg
        self.errors: list[str] = []

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        try:
            return self._pg.allreduce(tensors, opts)
        except Exception as exc:  # what torchft does: report, carry on
            self.errors.append(str(exc))
            return _create_work_from_future(_done([tensors] if isinstance(tensors, torch.Tensor) else tensors))


def _done(tensors: list[torch.Tensor]) -> torch.futures.Future:
    f: torch.futures.Future = torch.futures.Future()
    f.set_result(tensors)
    return f


def run_wrapper(rank: int, world: int) -> dict[str, Any]:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=T)
    try:
        w = SwallowingWrapper(dist.group.WORLD)
        t = torch.full((3,), float(rank + 1))
        w.allreduce([t], ReduceOp.SUM).wait()           # the short op form through the wrapper
        u = torch.full((3,), float(rank + 1))
        w.allreduce(u, ReduceOp.AVG).wait()
        return {"sum": t.tolist(), "avg": u.tolist(), "errors": w.errors}
    finally:
        dist.destroy_process_group()


class Reconfigurable:
    """torchft's reconfigurable ``ProcessGroupWrapper`` pattern, by composition: ``configure`` builds a
    fresh inner group over a new store prefix (``_create_pg``); collectives go to ``self.parent``."""

    def __init__(self, store: dist.Store) -> None:
        self._store = store
        self._pg: Any = None

    def configure(self, prefix: str, rank: int, world: int) -> None:
        from commlayer.backend.process_group import group_over_store

        if self._pg is not None:
            self._pg.abort()
        self._pg = group_over_store(dist.PrefixStore(prefix, self._store), rank, world, timeout=60.0)

    @property
    def parent(self) -> dist.ProcessGroup:
        return self._pg

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        return self.parent.allreduce(tensors, opts)

    def shutdown(self) -> None:
        if self._pg is not None:
            self._pg.shutdown()


def run_reconfigure(rank: int, world: int) -> dict[str, Any]:
    import os

    store = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), world, rank == 0, timeout=T)
    pg = Reconfigurable(store)
    out = {}
    try:
        for quorum in range(2):  # torchft reconfigures on every quorum change, each time under a new prefix
            pg.configure(f"quorum/{quorum}", rank, world)
            t = torch.full((4,), float(rank + 1 + quorum))
            pg.allreduce([t], ReduceOp.SUM).wait()
            out[f"quorum{quorum}"] = t.tolist()
            out["devices"] = [d.type for d in pg.parent._device_types]
    finally:
        pg.shutdown()
    return out
