"""The shared-memory all-reduce of co-located ranks, on real processes, against gloo and a torch reference.

Small areas (COMMLAYER_SHM_AREA_BYTES=8192, COMMLAYER_SHM_SMALL_BYTES=2048) make odd sizes take
both paths, and several rounds, with few elements. The reference folds every rank's input left
to right in rank order with plain torch operators in one process; floats must match it bit for
bit, and every rank must hold the same bits.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conformance_cases import make
from multiproc import free_port, run_world

R = dist.ReduceOp
SMALL_ENV = {"COMMLAYER_SHM_AREA_BYTES": "8192", "COMMLAYER_SHM_SMALL_BYTES": "2048"}
DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.complex64]
SIZES = [1, 3, 1001, 5003]  # 5003 float64 = 40 kB: five rounds of 8 kB


def _ops(dt: torch.dtype) -> list[Any]:
    ops = [R.SUM]
    if not dt.is_complex:  # torch itself refuses PRODUCT, MIN and MAX on complex tensors
        ops += [R.PRODUCT, R.MIN, R.MAX]
    if dt != torch.bool:
        ops.append(R.AVG)
    if not (dt.is_floating_point or dt.is_complex):
        ops += [R.BAND, R.BOR, R.BXOR]
    return ops


def _input(rank: int, op: Any, dt: torch.dtype, n: int) -> torch.Tensor:
    t = make(rank, f"shm{op}", n, dt)
    if op == R.PRODUCT and (dt.is_floating_point or dt.is_complex):
        t = 1 + 0.01 * t
    return t


def _reference(op: Any, xs: list[torch.Tensor]) -> torch.Tensor:
    """x0 op x1 op ... op x_{p-1}, left to right, with plain torch operators."""
    acc = xs[0].clone()
    for x in xs[1:]:
        if op in (R.SUM, R.AVG):
            acc = acc | x if acc.dtype == torch.bool else acc + x
        elif op == R.PRODUCT:
            acc = acc & x if acc.dtype == torch.bool else acc * x
        elif op == R.MIN:
            acc = torch.minimum(acc, x)
        elif op == R.MAX:
            acc = torch.maximum(acc, x)
        elif op == R.BAND:
            acc = acc & x
        elif op == R.BOR:
            acc = acc | x
        else:
            acc = acc ^ x
    if op == R.AVG:
        p = len(xs)
        acc = acc / p if (acc.dtype.is_floating_point or acc.dtype.is_complex) else torch.div(acc, p, rounding_mode="trunc")
    return acc


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _msgs_sent(pg: Any) -> int:
    return sum(s["msgs_sent"] for s in pg.transport.peer_stats().values())


def _bytes_sent(pg: Any) -> int:
    return sum(s["bytes_sent"] for s in pg.transport.peer_stats().values())


def _region(pg: Any) -> Any:
    from commlayer.topologies.shm_allreduce import _states

    return _states[pg.group]


def _cases_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    gloo = dist.new_group(backend="gloo")
    pg = dist.group.WORLD
    errors, digests, compared = [], {}, 0
    dist.all_reduce(torch.ones(4))  # set-up: the only messages the shared-memory path sends
    fds_mapped = len(os.listdir("/proc/self/fd"))
    sent, sent_bytes, calls = _msgs_sent(pg), _bytes_sent(pg), 0
    for dt in DTYPES:
        for op in _ops(dt):
            for n in SIZES:
                name = f"{op} {dt} n={n}"
                got = _input(rank, op, dt, n)
                dist.all_reduce(got, op=op)
                calls += 1
                want = _reference(op, [_input(r, op, dt, n) for r in range(world)])
                if not torch.equal(got, want):
                    errors.append(f"{name}: differs from the rank-order reference (max diff "
                                  f"{(got.to(torch.complex128) - want.to(torch.complex128)).abs().max().item()})")
                digests[name] = _digest(got)
                if op != R.AVG and not dt.is_complex:
                    g = _input(rank, op, dt, n)
                    try:
                        dist.all_reduce(g, op=op, group=gloo)
                    except RuntimeError:  # gloo has no kernel for this dtype (e.g. int16): the reference decides
                        continue
                    compared += 1
                    exact = op not in (R.SUM, R.PRODUCT) or not dt.is_floating_point
                    if exact and not torch.equal(got, g):
                        errors.append(f"{name}: not identical to gloo")
                    elif not exact and not torch.allclose(got.double(), g.double(), rtol=2e-2, atol=2e-2):
                        errors.append(f"{name}: far from gloo")
    sent_after, bytes_after = _msgs_sent(pg), _bytes_sent(pg)
    # A transposed (non-contiguous) tensor and a multi-dimensional one.
    base = [make(r, "nc", 41 * 50, torch.float32).reshape(41, 50) for r in range(world)]
    t = base[rank].clone().t()
    dist.all_reduce(t)
    if not torch.equal(t, _reference(R.SUM, [b.t() for b in base])):
        errors.append("non-contiguous float32: differs from the reference")
    digests["nc"] = _digest(t)
    state = _region(pg)
    out = {"errors": errors, "digests": digests, "sent": sent_after - sent, "sent_bytes": bytes_after - sent_bytes, "calls": calls, "region": state.region is not None,
           "why": state.why, "fds_mapped": fds_mapped, "pid": os.getpid(), "gloo_compared": compared}
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_every_dtype_and_op_matches_reference_and_gloo_bit_identical_on_every_rank(world: int) -> None:
    res = run_world(_cases_worker, world, timeout=280, env=SMALL_ENV)
    for r in res:
        assert r["region"], r["why"]
        assert r["errors"] == [], "\n".join(r["errors"][:20])
        # After set-up the data and the fingerprints of every all-reduce went through shared memory: the
        # sockets carried no message at all.
        assert r["calls"] > 200 and r["sent_bytes"] == 0 and r["sent"] == 0, (r["sent"], r["sent_bytes"], r["calls"])
        assert r["gloo_compared"] >= 150, r["gloo_compared"]
    for r in res[1:]:
        assert r["digests"] == res[0]["digests"], [k for k in r["digests"] if r["digests"][k] != res[0]["digests"].get(k)]
    _assert_no_segments([r["pid"] for r in res])


def _assert_no_segments(pids: list[int]) -> None:
    left = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"commlayer-{pid}-") for pid in pids)]
    assert left == [], left


def _kill_worker(rank: int, world: int, victim: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    t = torch.ones(1000)
    dist.all_reduce(t)  # the region is set up and unlinked
    dist.barrier()
    if rank == victim:  # dies while the others wait for it in the all-reduce (after its barrier messages left)
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        dist.all_reduce(t)
        err = ""
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
    took = time.monotonic() - t0
    dist.destroy_process_group()
    return {"err": err, "took": took, "pid": os.getpid()}


@pytest.mark.parametrize("victim", [0, 2])
def test_killed_peer_raises_peer_failure_naming_it_within_the_timeout(victim: int) -> None:
    res = run_world(_kill_worker, 3, victim, timeout=200, allow_failures=True)
    assert all(isinstance(o, dict) for r, o in enumerate(res) if r != victim), res
    assert isinstance(res[victim], str) and "exited with code" in res[victim], res[victim]
    for r, out in enumerate(res):
        if r == victim:
            continue
        assert "PeerFailure" in out["err"] and f"rank {victim}" in out["err"], out
        assert out["took"] < 60, out  # the group timeout is 120 s: the failure was detected, not waited out
    _assert_no_segments([o["pid"] for o in res if isinstance(o, dict)])


def _stall_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=3))
    dist.all_reduce(torch.ones(10))
    out = {"err": "", "took": 0.0}
    if rank == 0:
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(10))
        except Exception as exc:
            out["err"] = f"{type(exc).__name__}: {exc}"
        out["took"] = time.monotonic() - t0
    else:
        time.sleep(6)  # alive and answering heartbeats, but not calling the collective
    dist.destroy_process_group()
    return out


def test_stalled_peer_times_out_naming_it() -> None:
    out = run_world(_stall_worker, 2, timeout=120)[0]
    assert "CommTimeout" in out["err"] and "Timed out" in out["err"] and "rank 1" in out["err"], out
    assert 3.0 <= out["took"] < 60, out


def _cycles_worker(rank: int, world: int, ports: list[int]) -> dict:
    counts = []
    for port in ports:
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        before = len(os.listdir("/proc/self/fd"))
        for n in (1, 3000, 300_000):
            t = torch.ones(n)
            dist.all_reduce(t)
            assert torch.equal(t, torch.full((n,), float(world))), n
        during = len(os.listdir("/proc/self/fd"))
        assert _region(dist.group.WORLD).region is not None
        dist.destroy_process_group()
        counts.append((before, during, len(os.listdir("/proc/self/fd"))))
    return {"counts": counts, "pid": os.getpid()}


def test_repeated_init_destroy_leaks_no_fds_or_segments() -> None:
    res = run_world(_cycles_worker, 2, [free_port() for _ in range(3)], timeout=200, env=SMALL_ENV)
    for r in res:
        c = r["counts"]
        assert all(during - before <= 1 for before, during, _ in c), c  # the one mapping of the region
        assert c[2][2] == c[1][2], f"descriptors grow per init/destroy: {c}"
    _assert_no_segments([r["pid"] for r in res])


def _fallback_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    t = make(rank, "fb", 5000, torch.float64)
    dist.all_reduce(t, op=R.MAX)
    want = _reference(R.MAX, [make(r, "fb", 5000, torch.float64) for r in range(world)])
    state = _region(dist.group.WORLD)
    out = {"ok": torch.equal(t, want), "region": state.region is not None, "why": state.why}
    dist.destroy_process_group()
    return out


def test_region_that_cannot_be_made_falls_back_on_every_rank() -> None:
    # 2**50 bytes per area: rank 0's posix_fallocate fails, and every rank uses the socket algorithms.
    for out in run_world(_fallback_worker, 2, timeout=120, env={"COMMLAYER_SHM_AREA_BYTES": str(1 << 50)}):
        assert out["ok"] and not out["region"] and "could not create" in out["why"], out
