"""Every collective x dtype x op x world size 1-4 on zmq, element for element against gloo.

One spawn per world size: each rank creates the zmq default group and a gloo group over the same
ranks, runs every case on both with identical inputs, and reports mismatches.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

from conformance_cases import FLOATS, INTS, SIZES, compare, make
from multiproc import run_world

R = dist.ReduceOp


def _both(name: str, fn: Callable[[Any], Any], zmq: Any, gloo: Any, ref: Callable[[], Any] | None, exact: bool,
          world: int, errors: list[str]) -> None:
    try:
        got = fn(zmq)
    except Exception as exc:  # a zmq failure is a test failure, with its message
        errors.append(f"{name}: zmq raised {type(exc).__name__}: {exc}")
        return
    try:
        want = fn(gloo)
    except Exception:
        if ref is None:
            return  # gloo rejects it and no reference exists: nothing to compare
        want = ref()
    err = compare(name, got, want, exact, world)
    if err:
        errors.append(err)


def _allreduce_cases(rank: int, world: int, zmq: Any, gloo: Any, errors: list[str]) -> None:
    cases = [(op, dt) for dt in FLOATS for op in (R.SUM, R.PRODUCT, R.MIN, R.MAX)]
    cases += [(op, dt) for dt in INTS for op in (R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR)]
    cases += [(op, torch.bool) for op in (R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR)]
    for op, dt in cases:
        for n in SIZES if dt in (torch.float32, torch.int64) else SIZES[:4]:
            key = f"ar{op}{dt}{n}"

            def fn(g: Any, op: Any = op, dt: torch.dtype = dt, n: int = n, key: str = key) -> torch.Tensor:
                t = make(rank, key, n, dt)
                if op == R.PRODUCT and dt.is_floating_point:
                    t = 1 + 0.01 * t
                dist.all_reduce(t, op=op, group=g)
                return t

            exact = op not in (R.SUM, R.PRODUCT) or not dt.is_floating_point
            _both(f"all_reduce {op} {dt} n={n}", fn, zmq, gloo, None, exact, world, errors)
    # AVG and PREMUL_SUM: gloo rejects them, so compare with a float64 reference.
    for dt in (torch.float32, torch.float64, torch.int64):
        for n in (0, 5, 40_000):
            ins = [make(r, f"avg{dt}{n}", n, dt) for r in range(world)]
            def fn(g: Any, dt: torch.dtype = dt, n: int = n) -> torch.Tensor:
                t = make(rank, f"avg{dt}{n}", n, dt)
                dist.all_reduce(t, op=R.AVG, group=g)
                return t
            ref = (lambda ins=ins, dt=dt: (sum(i.double() for i in ins) / world).to(dt) if dt.is_floating_point
                   else torch.div(sum(ins), world, rounding_mode="trunc"))
            _both(f"all_reduce AVG {dt} n={n}", fn, zmq, gloo, ref, False, world, errors)
    factor = 0.5 + rank
    for dt in (torch.float32, torch.float64):
        ins = [make(r, f"pre{dt}", 333, dt) for r in range(world)]
        def fn(g: Any, dt: torch.dtype = dt) -> torch.Tensor:
            t = make(rank, f"pre{dt}", 333, dt)
            dist.all_reduce(t, op=dist._make_nccl_premul_sum(2.5), group=g)
            return t
        _both(f"all_reduce PREMUL_SUM {dt}", fn, zmq, gloo, lambda ins=ins: sum(2.5 * i for i in ins), False, world, errors)
    del factor
    # complex, non-contiguous, async
    def cplx(g: Any) -> torch.Tensor:
        t = make(rank, "cplx", 100, torch.complex64)
        dist.all_reduce(t, group=g)
        return t
    _both("all_reduce complex64", cplx, zmq, gloo, None, False, world, errors)
    def noncontig(g: Any) -> torch.Tensor:
        t = make(rank, "nc", 64 * 33, torch.float32, (64, 33)).t()
        assert not t.is_contiguous()
        dist.all_reduce(t, group=g)
        return t
    _both("all_reduce non-contiguous", noncontig, zmq, gloo, None, False, world, errors)
    def async_(g: Any) -> list[torch.Tensor]:
        t = make(rank, "async", 50_000, torch.float32)
        w = dist.all_reduce(t, async_op=True, group=g)
        fut = w.get_future()
        w.wait()
        val = fut.wait()
        return [t, val[0]]
    _both("all_reduce async_op + future", async_, zmq, gloo, None, False, world, errors)


def _rooted_cases(rank: int, world: int, zmq: Any, gloo: Any, errors: list[str]) -> None:
    for dt in FLOATS + INTS + [torch.bool, torch.complex64]:
        for n in (0, 3, 100_000):
            for root in range(world):
                def bc(g: Any, dt: torch.dtype = dt, n: int = n, root: int = root) -> torch.Tensor:
                    t = make(rank, f"bc{dt}{n}", n, dt)
                    dist.broadcast(t, src=root, group=g)
                    return t
                _both(f"broadcast {dt} n={n} root={root}", bc, zmq, gloo, None, True, world, errors)
    for op in (R.SUM, R.MAX):
        for dt in (torch.float32, torch.int32):
            for root in range(world):
                def red(g: Any, op: Any = op, dt: torch.dtype = dt, root: int = root) -> torch.Tensor:
                    t = make(rank, f"red{dt}", 1001, dt)
                    dist.reduce(t, dst=root, op=op, group=g)
                    return t if rank == root else torch.zeros(0)
                _both(f"reduce {op} {dt} root={root}", red, zmq, gloo, None, dt != torch.float32, world, errors)
    for root in range(world):
        def ga(g: Any, root: int = root) -> list[torch.Tensor]:
            t = make(rank, "ga", 77, torch.float64)
            outs = [torch.zeros(77, dtype=torch.float64) for _ in range(world)] if rank == root else None
            dist.gather(t, outs, dst=root, group=g)
            return outs or []
        _both(f"gather root={root}", ga, zmq, gloo, None, True, world, errors)
        def sc(g: Any, root: int = root) -> torch.Tensor:
            ins = [make(r, "sc", 55, torch.int64) for r in range(world)] if rank == root else None
            out = torch.zeros(55, dtype=torch.int64)
            dist.scatter(out, ins, src=root, group=g)
            return out
        _both(f"scatter root={root}", sc, zmq, gloo, None, True, world, errors)


def _gather_scatter_cases(rank: int, world: int, zmq: Any, gloo: Any, errors: list[str]) -> None:
    for dt in (torch.float32, torch.bfloat16, torch.int8, torch.bool, torch.complex128):
        for n in (0, 9, 30_000):
            def ag(g: Any, dt: torch.dtype = dt, n: int = n) -> list[torch.Tensor]:
                outs = [torch.zeros(n, dtype=dt) for _ in range(world)]
                dist.all_gather(outs, make(rank, f"ag{dt}", n, dt), group=g)
                return outs
            _both(f"all_gather {dt} n={n}", ag, zmq, gloo, None, True, world, errors)
            def agt(g: Any, dt: torch.dtype = dt, n: int = n) -> torch.Tensor:
                out = torch.zeros(world * n, dtype=dt)
                dist.all_gather_into_tensor(out, make(rank, f"agt{dt}", n, dt), group=g)
                return out
            _both(f"all_gather_into_tensor {dt} n={n}", agt, zmq, gloo, None, True, world, errors)
    def agc(g: Any) -> list[torch.Tensor]:
        ins = [make(rank, "agc1", 5, torch.float32), make(rank, "agc2", 12, torch.float32)]
        outs = [[torch.zeros(5), torch.zeros(12)] for _ in range(world)]
        dist.all_gather_coalesced(outs, ins, group=g)
        return [t for o in outs for t in o]
    _both("all_gather_coalesced", agc, zmq, gloo, None, True, world, errors)
    for op in (R.SUM, R.MIN):
        for dt in (torch.float32, torch.int64):
            for n in (0, 4, 20_000):
                ins_all = [[make(r, f"rs{dt}{j}", n, dt) for j in range(world)] for r in range(world)]
                def rs(g: Any, op: Any = op, dt: torch.dtype = dt, n: int = n) -> torch.Tensor:
                    out = torch.zeros(n, dtype=dt)
                    dist.reduce_scatter(out, [make(rank, f"rs{dt}{j}", n, dt) for j in range(world)], op=op, group=g)
                    return out
                def rs_ref(op: Any = op, ins_all: Any = ins_all) -> torch.Tensor:
                    col = torch.stack([ins_all[r][rank] for r in range(world)])
                    return col.sum(0).to(col.dtype) if op == R.SUM else col.min(0).values
                _both(f"reduce_scatter {op} {dt} n={n}", rs, zmq, gloo, rs_ref, op != R.SUM or dt == torch.int64, world, errors)
                def rst(g: Any, op: Any = op, dt: torch.dtype = dt, n: int = n) -> torch.Tensor:
                    out = torch.zeros(n, dtype=dt)
                    dist.reduce_scatter_tensor(out, torch.cat([make(rank, f"rs{dt}{j}", n, dt) for j in range(world)]), op=op, group=g)
                    return out
                _both(f"reduce_scatter_tensor {op} {dt} n={n}", rst, zmq, gloo, rs_ref, op != R.SUM or dt == torch.int64, world, errors)
    # all_to_all with uneven splits: rank r sends (r + j + 1) rows to rank j.
    def a2a(g: Any) -> list[torch.Tensor]:
        ins = [make(rank, f"a2a{j}", (rank + j + 1) * 3, torch.float32).reshape(-1, 3) for j in range(world)]
        outs = [torch.zeros(r + rank + 1, 3) for r in range(world)]
        dist.all_to_all(outs, ins, group=g)
        return outs
    def a2a_ref() -> list[torch.Tensor]:
        return [make(r, f"a2a{rank}", (r + rank + 1) * 3, torch.float32).reshape(-1, 3) for r in range(world)]
    _both("all_to_all uneven", a2a, zmq, gloo, a2a_ref, True, world, errors)
    def a2as(g: Any) -> torch.Tensor:
        isplit = [rank + j + 1 for j in range(world)]
        osplit = [r + rank + 1 for r in range(world)]
        inp = torch.cat([make(rank, f"a2a{j}", (rank + j + 1) * 3, torch.float32).reshape(-1, 3) for j in range(world)])
        out = torch.zeros(sum(osplit), 3)
        dist.all_to_all_single(out, inp, osplit, isplit, group=g)
        return out
    _both("all_to_all_single uneven", a2as, zmq, gloo, lambda: torch.cat(a2a_ref()), True, world, errors)
    def a2a_even(g: Any) -> torch.Tensor:
        inp = make(rank, "a2ae", world * 4, torch.int32)
        out = torch.zeros(world * 4, dtype=torch.int32)
        dist.all_to_all_single(out, inp, group=g)
        return out
    even_ref = lambda: torch.cat([make(r, "a2ae", world * 4, torch.int32)[rank * 4:(rank + 1) * 4] for r in range(world)])  # noqa: E731
    _both("all_to_all_single even", a2a_even, zmq, gloo, even_ref, True, world, errors)


def _p2p_object_cases(rank: int, world: int, zmq: Any, gloo: Any, errors: list[str]) -> None:
    if world > 1:
        def ring_p2p(g: Any) -> list[torch.Tensor]:
            nxt, prv = (rank + 1) % world, (rank - 1) % world
            a, b = make(rank, "p2p", 70_000, torch.float32), torch.zeros(70_000)
            s1 = dist.isend(a, group=g, dst=nxt, tag=7)
            r1 = dist.irecv(b, group=g, src=prv, tag=7)
            s1.wait(); r1.wait()
            c, d = make(rank, "p2pb", 3, torch.int64), torch.zeros(3, dtype=torch.int64)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, c, nxt, g, 9), dist.P2POp(dist.irecv, d, prv, g, 9)])
            for q in reqs:
                q.wait()
            return [b, d]
        _both("isend/irecv ring + batch_isend_irecv", ring_p2p, zmq, gloo, None, True, world, errors)
        def anysrc(g: Any) -> list[int]:
            if rank == 0:
                got = []
                for _ in range(world - 1):
                    t = torch.zeros(1, dtype=torch.int64)
                    src = dist.recv(t, group=g, tag=11)
                    got.append((src, int(t.item())))
                return sorted(got)
            dist.send(torch.tensor([rank * 10]), dst=0, group=g, tag=11)
            return []
        _both("recv from any source", anysrc, zmq, gloo, None, True, world, errors)
    def objs(g: Any) -> list[Any]:
        out: list[Any] = [None] * world
        dist.all_gather_object(out, {"rank": rank, "s": "x" * rank}, group=g)
        lst = [{"from": rank}, [1, 2, rank]] if rank == 0 else [None, None]
        dist.broadcast_object_list(lst, src=0, group=g)
        gathered: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(("g", rank), gathered, dst=0, group=g)
        sc_out: list[Any] = [None]
        dist.scatter_object_list(sc_out, [f"item{r}" for r in range(world)] if rank == 0 else None, src=0, group=g)
        return [out, lst, gathered, sc_out]
    _both("object collectives", objs, zmq, gloo, None, True, world, errors)
    def bar(g: Any) -> int:
        for _ in range(3):
            dist.barrier(group=g)
        return 1
    _both("barrier", bar, zmq, gloo, None, True, world, errors)


def _subgroup_cases(rank: int, world: int, errors: list[str]) -> None:
    if world < 3:
        return
    members = [0, 2]
    zsub = dist.new_group(members)  # default backend: zmq
    gsub = dist.new_group(members, backend="gloo")
    if rank in members:
        def sub(g: Any) -> list[torch.Tensor]:
            t = make(rank, "sub", 1000, torch.float64)
            dist.all_reduce(t, group=g)
            b = make(rank, "subb", 10, torch.int64)
            dist.broadcast(b, src=2, group=g)
            return [t, b]
        _both("subgroup [0, 2]", sub, zsub, gsub, None, False, world, errors)
    dist.barrier()


def _worker(rank: int, world: int) -> list[str]:
    os.environ.setdefault("COMMLAYER_LINGER", "0.5")
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    assert dist.get_backend() == "zmq"
    gloo = dist.new_group(backend="gloo")
    zmq = dist.group.WORLD
    errors: list[str] = []
    for part in (_allreduce_cases, _rooted_cases, _gather_scatter_cases, _p2p_object_cases):
        part(rank, world, zmq, gloo, errors)
    _subgroup_cases(rank, world, errors)
    dist.destroy_process_group()
    return errors


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_collective_matches_gloo(world: int) -> None:
    results = run_world(_worker, world, timeout=280)
    problems = [f"rank {r}: {e}" for r, errs in enumerate(results) for e in errs]
    assert not problems, f"{len(problems)} mismatches:\n" + "\n".join(problems[:40])
