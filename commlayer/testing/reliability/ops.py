"""Random collectives, identical on every rank from a seed, each checked against a one-process reference."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from commlayer.testing.reference import reduce_tensors

OPS = ("all_reduce_small", "all_reduce_large", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
       "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "barrier",
       "send_recv")
_REDUCING = {"all_reduce_small", "all_reduce_large", "reduce", "reduce_scatter", "reduce_scatter_tensor"}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64)
_INTS = (torch.int32, torch.int64, torch.int8, torch.uint8)
_RED = dist.ReduceOp


@dataclass
class OpSpec:
    """One randomly chosen operation, identical on every rank."""

    step: int
    name: str
    dtype: torch.dtype = torch.float32
    numel: int = 0
    root: int = 0
    op: Any = None
    peer: int = 1  # send/recv: receiver (root is the sender)
    splits: list[list[int]] = field(default_factory=list)  # all_to_all: splits[src][dst]
    async_op: bool = False

    def describe(self) -> str:
        op = getattr(self.op, "name", str(self.op)) if self.op is not None else ""
        return f"#{self.step} {self.name} {str(self.dtype).removeprefix('torch.')} x{self.numel} root={self.root} {op}".strip()


def _numel(rng: random.Random, large: bool, max_elems: int) -> int:
    if large:
        return rng.randint(max(1, max_elems // 4), max_elems)
    u = rng.random()
    if u < 0.05:
        return 0
    if u < 0.7:
        return rng.randint(1, 64)
    return rng.randint(65, max(65, min(20_000, max_elems)))


def random_op(seed: int, step: int, world: int, max_elems: int, ops: Sequence[str] = OPS) -> OpSpec:
    """The ``step``-th operation of a seeded sequence (same on every rank)."""
    rng = random.Random(seed * 1_000_003 + step)
    name = rng.choice(list(ops))
    spec = OpSpec(step, name, root=rng.randrange(world), async_op=rng.random() < 0.15)
    spec.numel = _numel(rng, name == "all_reduce_large" or rng.random() < 0.03, max_elems)
    if name in _REDUCING:
        if rng.random() < 0.6:
            spec.dtype = rng.choice(_FLOATS)
            # torch itself refuses PRODUCT, MIN and MAX on complex tensors
            choices = [_RED.SUM, _RED.AVG] + ([_RED.PRODUCT, _RED.MIN, _RED.MAX] if not spec.dtype.is_complex else [])
        else:
            spec.dtype = rng.choice(_INTS)
            choices = [_RED.SUM, _RED.PRODUCT, _RED.MIN, _RED.MAX, _RED.BAND, _RED.BOR, _RED.BXOR]
            if spec.dtype != torch.uint8:
                choices.append(_RED.AVG)
        spec.op = rng.choice(choices)
    else:
        spec.dtype = rng.choice(_FLOATS + _INTS + (torch.bool,))
    if name == "send_recv":
        spec.peer = rng.choice([r for r in range(world) if r != spec.root]) if world > 1 else spec.root
    if name in ("all_to_all", "all_to_all_single"):
        spec.numel = min(spec.numel, 4096)
        spec.splits = [[rng.randint(0, max(1, spec.numel // world)) for _ in range(world)] for _ in range(world)]
    return spec


def make_input(seed: int, spec: OpSpec, rank: int, numel: int | None = None) -> torch.Tensor:
    """Rank ``rank``'s input of ``spec``: small integers, so every reduction order gives the same bits."""
    n = spec.numel if numel is None else numel
    g = torch.Generator().manual_seed((seed * 7_919 + spec.step * 104_729 + rank * 15_485_863) % (2**62))
    dt = spec.dtype
    if dt == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if spec.op == _RED.PRODUCT:
        vals = torch.tensor([1, 2] if dt == torch.uint8 else [-2, -1, 1, 2], dtype=torch.int64)
        x = vals[torch.randint(0, len(vals), (n,), generator=g)]
    elif spec.op in (_RED.BAND, _RED.BOR, _RED.BXOR) or dt == torch.uint8:
        x = torch.randint(0, 16, (n,), generator=g)
    else:
        x = torch.randint(-8, 9, (n,), generator=g)
    if dt.is_complex:
        y = torch.randint(-8, 9, (n,), generator=g)
        return torch.complex(x.float(), y.float()).to(dt)
    return x.to(dt)


Check = Callable[[], str | None]


def _same(what: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"{what}: got {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
    if torch.equal(got, want):
        return None
    if got.is_complex() and " AVG" in what and torch.allclose(got, want, rtol=2e-7, atol=0):
        # The final division of a complex AVG is done per real part by all_reduce but as a complex
        # division by reduce/reduce_scatter (1 ulp apart); both are accepted, see docs/reliability.md.
        return None
    bad = (got != want).nonzero()
    i = int(bad[0, 0]) if bad.numel() else -1
    return f"{what}: {bad.shape[0]} elements differ, first at {i}: got {got.reshape(-1)[i].item()}, expected {want.reshape(-1)[i].item()}"


def issue_op(spec: OpSpec, rank: int, world: int, seed: int, check: bool) -> tuple[Any, Check | None]:
    """Issues ``spec`` on the default group. Returns its work (or None) and a result check run after completion."""
    name, n, dt, root, a = spec.name, spec.numel, spec.dtype, spec.root, spec.async_op
    mine = make_input(seed, spec, rank)
    def inp(r: int, k: int | None = None) -> torch.Tensor:
        return make_input(seed, spec, r, k)

    what = spec.describe()
    if name in ("all_reduce_small", "all_reduce_large"):
        w = dist.all_reduce(mine, op=spec.op, async_op=a)
        return w, (lambda: _same(what, mine, reduce_tensors([inp(r) for r in range(world)], spec.op, world))) if check else None
    if name == "broadcast":
        w = dist.broadcast(mine, src=root, async_op=a)
        return w, (lambda: _same(what, mine, inp(root))) if check else None
    if name == "reduce":
        w = dist.reduce(mine, dst=root, op=spec.op, async_op=a)
        want = (lambda: reduce_tensors([inp(r) for r in range(world)], spec.op, world)) if rank == root else (lambda: inp(rank))
        return w, (lambda: _same(what, mine, want())) if check else None
    if name == "all_gather":
        outs = [torch.empty(n, dtype=dt) for _ in range(world)]
        w = dist.all_gather(outs, mine, async_op=a)
        return w, (lambda: next((e for r in range(world) if (e := _same(f"{what} from {r}", outs[r], inp(r)))), None)) if check else None
    if name == "all_gather_into_tensor":
        out = torch.empty(n * world, dtype=dt)
        w = dist.all_gather_into_tensor(out, mine, async_op=a)
        return w, (lambda: _same(what, out, torch.cat([inp(r) for r in range(world)]))) if check else None
    if name == "gather":
        gathered = [torch.empty(n, dtype=dt) for _ in range(world)] if rank == root else None
        w = dist.gather(mine, gathered, dst=root, async_op=a)
        if gathered is None:
            return w, None
        return w, (lambda: next((e for r in range(world) if (e := _same(f"{what} from {r}", gathered[r], inp(r)))), None)) if check else None
    if name == "scatter":
        ins = [make_input(seed, spec, root * world + d) for d in range(world)] if rank == root else None
        out = torch.empty(n, dtype=dt)
        w = dist.scatter(out, ins, src=root, async_op=a)
        return w, (lambda: _same(what, out, make_input(seed, spec, root * world + rank))) if check else None
    if name == "reduce_scatter":
        ins = [make_input(seed, spec, rank * world + d) for d in range(world)]
        out = torch.empty(n, dtype=dt)
        w = dist.reduce_scatter(out, ins, op=spec.op, async_op=a)
        return w, (lambda: _same(what, out, reduce_tensors([make_input(seed, spec, s * world + rank) for s in range(world)],
                                                        spec.op, world))) if check else None
    if name == "reduce_scatter_tensor":
        big = inp(rank, n * world)
        out = torch.empty(n, dtype=dt)
        w = dist.reduce_scatter_tensor(out, big, op=spec.op, async_op=a)
        return w, (lambda: _same(what, out, reduce_tensors([inp(s, n * world)[rank * n:(rank + 1) * n] for s in range(world)],
                                                        spec.op, world))) if check else None
    if name in ("all_to_all", "all_to_all_single"):
        sp = spec.splits
        send = inp(rank, sum(sp[rank]))
        recv_sizes = [sp[s][rank] for s in range(world)]

        def expected() -> torch.Tensor:
            parts = []
            for s in range(world):
                off = sum(sp[s][:rank])
                parts.append(inp(s, sum(sp[s]))[off:off + sp[s][rank]])
            return torch.cat(parts)

        if name == "all_to_all":
            outs = [torch.empty(k, dtype=dt) for k in recv_sizes]
            w = dist.all_to_all(outs, list(send.split(sp[rank])), async_op=a)
            return w, (lambda: _same(what, torch.cat(outs), expected())) if check else None
        out = torch.empty(sum(recv_sizes), dtype=dt)
        w = dist.all_to_all_single(out, send, recv_sizes, sp[rank], async_op=a)
        return w, (lambda: _same(what, out, expected())) if check else None
    if name == "barrier":
        return dist.barrier(async_op=a), None
    if name == "send_recv":
        if world < 2 or rank not in (root, spec.peer):
            return None, None
        if rank == root:
            return (dist.isend(mine, dst=spec.peer, tag=spec.step) if a else dist.send(mine, dst=spec.peer, tag=spec.step)), None
        out = torch.empty(n, dtype=dt)
        w = dist.irecv(out, src=root, tag=spec.step) if a else dist.recv(out, src=root, tag=spec.step)
        return (w if a else None), (lambda: _same(what, out, inp(root))) if check else None
    raise ValueError(f"unknown op {name}")


def _finish(pending: list[tuple[Any, Check | None, OpSpec]], mismatches: list[str], timeout: float | None = None) -> None:
    for w, chk, spec in pending:
        if w is not None and not isinstance(w, int):
            w.wait(timeout=timedelta(seconds=timeout)) if timeout else w.wait()
        if chk is not None:
            err = chk()
            if err:
                mismatches.append(err)
    pending.clear()


def run_ops(rank: int, world: int, seed: int, start: int, count: int, max_elems: int, check: bool,
            mismatches: list[str], ops: Sequence[str] = OPS, stop: Callable[[int], bool] | None = None) -> int:
    """Runs ops ``start .. start+count-1``; async ones are waited for in batches. Returns how many were issued."""
    pending: list[tuple[Any, Check | None, OpSpec]] = []
    i = start
    for i in range(start, start + count):
        if stop is not None and stop(i):
            break
        spec = random_op(seed, i, world, max_elems, ops)
        w, chk = issue_op(spec, rank, world, seed, check)
        pending.append((w, chk, spec))
        if not spec.async_op or len(pending) >= 4:
            _finish(pending, mismatches)
    else:
        i += 1
    _finish(pending, mismatches)
    return i - start
