"""Collective fingerprints: any disagreement between ranks' calls fails every rank at once.

The mismatch matrix (kind x root x size 4 B / 1 MiB x dtype x op, on 2-4 ranks, for every
``COMMLAYER_ALGO``) runs one process world per rank count. A mismatch makes its group unusable on
every rank (like gloo or NCCL after an error: ranks may have issued different numbers of
messages, so later calls could not be matched safely), hence each cell runs on a fresh
``new_group`` of the same world, and a matching call on a fresh group at the end proves the
world itself stays usable. gloo, given the same cells, hangs to its timeout (see
``test_gloo_hangs_on_broadcast_root_mismatch``).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from commlayer.backend.options import ZmqOptions
from commlayer.transport import envelope
from commlayer.transport.wire import Call, Kind, unpack_header
from multiproc import run_world

ALGOS = ("auto", "ring", "tree", "ps")
SIZES = {"4B": 1, "1MiB": 1 << 18}  # float32 elements
OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _cells(n: int) -> list[tuple[str, dict, dict]]:
    """(name, everyone's call, the deviant's call) for ``n`` float32 elements."""
    base = {"n": n, "dtype": "float32", "root": 0, "op": "sum"}
    ar, bc, rd = {**base, "kind": "allreduce"}, {**base, "kind": "broadcast"}, {**base, "kind": "reduce"}
    return [
        ("kind:allreduce/broadcast", ar, bc),
        ("kind:broadcast/allreduce", bc, ar),
        ("kind:allreduce/reduce", ar, rd),
        ("kind:allreduce/barrier", ar, {**ar, "kind": "barrier"}),
        ("root:broadcast", bc, {**bc, "root": 1}),
        ("root:reduce", rd, {**rd, "root": 1}),
        ("size:allreduce", ar, {**ar, "n": n + 1}),
        ("size:broadcast", bc, {**bc, "n": n + 1}),
        ("dtype:allreduce", ar, {**ar, "dtype": "int32"}),
        ("dtype:broadcast", bc, {**bc, "dtype": "int32"}),
        ("op:allreduce", ar, {**ar, "op": "max"}),
        ("op:reduce", rd, {**rd, "op": "min"}),
    ]


def _call(spec: dict, group: Any) -> torch.Tensor:
    t = torch.ones(spec["n"], dtype=getattr(torch, spec["dtype"]))
    kind = spec["kind"]
    if kind == "allreduce":
        dist.all_reduce(t, op=OPS[spec["op"]], group=group)
    elif kind == "broadcast":
        dist.broadcast(t, src=spec["root"], group=group)
    elif kind == "reduce":
        dist.reduce(t, dst=spec["root"], op=OPS[spec["op"]], group=group)
    else:
        dist.barrier(group=group)
    return t


def _matrix_worker(rank: int, world: int, algos: tuple[str, ...], warm: bool = False) -> list[dict]:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    out = []
    try:
        i = 0
        for algo in algos:
            for size, n in SIZES.items():
                for name, base, deviant in _cells(n):
                    bad = i % world if "root" not in name else (1 + i) % world
                    i += 1
                    group = dist.new_group(backend="zmq", pg_options=ZmqOptions(algo=algo))
                    if warm:  # past the group's set-up call: co-located ranks' all-reduces then send no message
                        dist.all_reduce(torch.ones(1), group=group)
                    spec = deviant if rank == bad else base
                    t0 = time.monotonic()
                    try:
                        _call(spec, group)
                        res = {"raised": False, "msg": ""}
                    except Exception as exc:
                        res = {"raised": True, "msg": str(exc), "type": type(exc).__name__}
                    res.update(cell=f"{algo}/{size}/{name}", bad=bad, took=time.monotonic() - t0)
                    out.append(res)
        group = dist.new_group(backend="zmq")  # the world is still usable: a matching call succeeds
        t = torch.full((4,), float(rank))
        dist.all_reduce(t, group=group)
        out.append({"cell": "control", "raised": False, "sum": t.tolist(), "took": 0.0, "msg": "", "bad": -1})
    finally:
        dist.destroy_process_group()
    return out


def _check_matrix(res: list[list[dict]], world: int, algos: tuple[str, ...]) -> None:
    cells = len(res[0]) - 1
    assert cells == len(algos) * len(SIZES) * len(_cells(1))
    worst = 0.0
    for rank, rows in enumerate(res):
        for row in rows[:-1]:
            assert row["raised"], f"rank {rank}: cell {row['cell']} returned instead of raising"
            msg = row["msg"]
            assert "collective mismatch" in msg, f"rank {rank}, {row['cell']}: {msg}"
            assert f"rank {row['bad']}" in msg, f"rank {rank}, {row['cell']}: the deviant rank {row['bad']} is not named: {msg}"
            assert msg.count("called") >= 2, f"rank {rank}, {row['cell']}: both calls must be named: {msg}"
            worst = max(worst, row["took"])
        assert rows[-1]["sum"] == [float(sum(range(world)))] * 4
    took = sorted(r["took"] for rows in res for r in rows[:-1])
    print(f"world {world}: {len(took)} rank-cells, median {took[len(took) // 2] * 1e3:.1f} ms, max {worst * 1e3:.1f} ms")
    assert worst < 1.0, f"a mismatch took {worst:.2f} s to fail a rank (expected well under 1 s)"


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_mismatch_matrix_raises_on_every_rank_at_once(world: int) -> None:
    _check_matrix(run_world(_matrix_worker, world, ALGOS, timeout=280), world, ALGOS)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_mismatch_after_the_shared_memory_setup_raises_on_every_rank_at_once(world: int) -> None:
    """Co-located ranks past their group's first all-reduce compare fingerprints in shared memory (or
    by a probe when a peer ran another collective): the same matrix must fail the same way."""
    _check_matrix(run_world(_matrix_worker, world, ("auto",), True, timeout=280), world, ("auto",))


def _detail_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        same = torch.ones(2, 3)
        dist.all_reduce(same)  # identical shapes pass
        t = torch.ones(6) if rank == 0 else torch.ones(2, 3)  # same count and dtype, different shapes
        try:
            dist.all_reduce(t)
            return {"raised": False, "ok": same.tolist()}
        except Exception as exc:
            return {"raised": True, "msg": str(exc), "ok": same.tolist()}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("env", [{"COMMLAYER_DEBUG": "detail"}, {"TORCH_DISTRIBUTED_DEBUG": "DETAIL"}])
def test_detail_mode_compares_shapes(env: dict) -> None:
    res = run_world(_detail_worker, 2, env=env, timeout=120)
    for r in res:
        assert r["ok"] == [[2.0] * 3] * 2
        assert r["raised"], r
        assert "shapes=[6]" in r["msg"] and "shapes=[2, 3]" in r["msg"], r["msg"]


def test_shapes_are_not_compared_without_detail_mode() -> None:
    res = run_world(_detail_worker, 2, timeout=120)
    assert [r["raised"] for r in res] == [False, False], res


def _gloo_worker(rank: int, world: int) -> dict:
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=5))
    t = torch.full((1,), float(rank))
    t0 = time.monotonic()
    try:
        dist.broadcast(t, src=rank)  # each rank believes it is the root
        out = {"raised": False, "value": t.item()}
    except Exception as exc:
        out = {"raised": True, "msg": str(exc)[:200]}
    out["took"] = time.monotonic() - t0
    return out


def _zmq_root_worker(rank: int, world: int) -> dict:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=5))
    t = torch.full((1,), float(rank))
    t0 = time.monotonic()
    try:
        dist.broadcast(t, src=rank)
        out = {"raised": False, "value": t.item()}
    except Exception as exc:
        out = {"raised": True, "msg": str(exc)}
    out["took"] = time.monotonic() - t0
    dist.destroy_process_group()
    return out


def test_broadcast_with_different_src_fails_both_ranks() -> None:
    """The issue's reproduction: each rank a root. zmq names the mismatch on both ranks; gloo
    (reference) does not report it as such (it returns, or times out after its 5 s)."""
    zmq_res = run_world(_zmq_root_worker, 2, timeout=60)
    for r in zmq_res:
        assert r["raised"], r
        assert "root=0" in r["msg"] and "root=1" in r["msg"] and "rank 0" in r["msg"] and "rank 1" in r["msg"], r["msg"]
    gloo_res = run_world(_gloo_worker, 2, timeout=60, allow_failures=True)
    assert not any(isinstance(r, dict) and r.get("raised") and "mismatch" in r.get("msg", "") for r in gloo_res), gloo_res


def test_fingerprint_travels_in_the_header() -> None:
    call = Call(root=1, count=262144, dtype="float32", redop="sum", shapes=((512, 512),))
    h = envelope.collective("broadcast", "pg0", 7, 3, call, step=2, chunk=1, dtype="float32", shape=(4,), nbytes=(16,))
    back = unpack_header(h.pack())
    assert back == h and back.call == call and back.kind == Kind.DATA
    p = unpack_header(envelope.p2p("pg0", 42, 1).pack())
    assert (p.kind, p.tag, p.seq) == (Kind.P2P, 42, 0)
    assert call.differs(Call(root=0, count=262144, dtype="float32", redop="sum"))
    assert not call.differs(Call(root=1, count=262144, dtype="float32", redop="sum"))  # shapes only when both have them


EMPTY_KINDS = ("allreduce", "allgather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast")


def _empty_call(kind: str, n: int, world: int, group: Any) -> None:
    if kind == "allreduce":
        dist.all_reduce(torch.ones(n), group=group)
    elif kind == "allgather":
        dist.all_gather([torch.ones(n) for _ in range(world)], torch.ones(n), group=group)
    elif kind == "all_gather_into_tensor":
        dist.all_gather_into_tensor(torch.ones(n * world), torch.ones(n), group=group)
    elif kind == "reduce_scatter_tensor":
        dist.reduce_scatter_tensor(torch.ones(n), torch.ones(n * world), group=group)
    else:
        dist.broadcast(torch.ones(n), src=1, group=group)


def _empty_worker(rank: int, world: int) -> dict[str, str]:
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    out: dict[str, str] = {}
    try:
        for kind in EMPTY_KINDS:
            group = dist.new_group(backend="zmq")
            try:
                _empty_call(kind, 0 if rank == 0 else 4, world, group)  # rank 0 alone passes an empty tensor
                out[kind] = "returned"
            except Exception as exc:
                out[kind] = type(exc).__name__
            _empty_call(kind, 0, world, dist.new_group(backend="zmq"))  # everyone empty: a valid call
            out[kind + "/all-empty"] = "returned"
    finally:
        dist.destroy_process_group()
    return out


def test_an_empty_tensor_on_one_rank_is_a_mismatch_on_every_rank() -> None:
    """A rank whose tensor is empty exchanges no data, so without its fingerprint it would return at once,
    "successful", while the others called with 4 elements; an all-empty call still completes."""
    for rank, res in enumerate(run_world(_empty_worker, 3, timeout=180)):
        for kind in EMPTY_KINDS:
            assert res[kind] == "CollectiveMismatch", (rank, kind, res)
            assert res[kind + "/all-empty"] == "returned", (rank, kind, res)


def _silent_deviant_worker(rank: int, world: int) -> dict:
    """Past the set-up, the last rank waits in a broadcast from rank 0 while the others all-reduce in shared
    memory, which sends no message: the broadcast's fingerprint confirmation must still fail every rank."""
    dist.init_process_group("zmq", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    try:
        dist.all_reduce(torch.ones(1))  # the group's set-up call
        t0 = time.monotonic()
        try:
            if rank == world - 1:
                dist.broadcast(torch.ones(8), src=0)
            else:
                dist.all_reduce(torch.ones(8))
            return {"raised": False, "msg": "", "took": time.monotonic() - t0}
        except Exception as exc:
            return {"raised": True, "msg": str(exc), "took": time.monotonic() - t0}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_waiting_in_another_collective_is_found_by_the_shared_memory_ranks(world: int) -> None:
    res = run_world(_silent_deviant_worker, world, timeout=120)
    for rank, r in enumerate(res):
        assert r["raised"], f"rank {rank} returned from a mismatched call"
        assert "collective mismatch" in r["msg"] and "broadcast" in r["msg"] and "allreduce" in r["msg"], (rank, r["msg"])
        assert f"rank {world - 1}" in r["msg"], (rank, r["msg"])
        assert r["took"] < 1.0, (rank, r["took"])
