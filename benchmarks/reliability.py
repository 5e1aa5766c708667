"""Reliability runs of the zmq backend: kill injection, frame fuzzing, soak and timeouts (issue 7).

Every part runs real processes over real loopback sockets and is bounded in time. The small
versions run in CI (``tests/test_reliability*.py`` import this module); the full-size runs are

    python benchmarks/reliability.py --kill 50 --fuzz 100000 --soak 10000          # the issue's figures
    python benchmarks/reliability.py --kill 6 --fuzz 3000 --soak 500 --timeouts --json out.json

and print one table. Processes come from a ``forkserver`` that has imported torch once, so a
kill run costs a fork, not a torch import. Randomness comes from private generators seeded from
``--seed``; every rank derives the same operation sequence from it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import msgpack
import torch
import torch.distributed as dist

from commlayer.transport.errors import CommError, CommTimeout, WireError
from commlayer.transport.wire import DTYPE_SIZES, MAX_HEADER_BYTES, Header, Kind, check_frames, unpack_header

logger = logging.getLogger(__name__)

# ==================================================================================== process harness


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def census(pid: int | str = "self") -> dict[str, int]:
    """File descriptors, OS threads and resident memory of a process (from /proc)."""
    out = {"fds": -1, "threads": -1, "rss_kb": -1, "hwm_kb": -1}
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key == "Threads":
                    out["threads"] = int(val)
                elif key == "VmRSS":
                    out["rss_kb"] = int(val.split()[0])
                elif key == "VmHWM":
                    out["hwm_kb"] = int(val.split()[0])
    except OSError:
        pass
    return out


def commlayer_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("commlayer"))


_CTX: Any = None


def _mp() -> Any:
    """A forkserver context that has imported torch and this module once (cheap children)."""
    global _CTX
    if _CTX is None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the server before torch loads
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", __name__])
        _CTX = ctx
    return _CTX


def stack_file(pid: int) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"commlayer-reliability-{pid}.stacks"


def _child(fn: Callable[..., Any], rank: int, world: int, env: dict[str, str], args: Sequence[Any], q: Any) -> None:
    stacks = open(stack_file(os.getpid()), "w")  # SIGUSR1 dumps every thread's stack here (for hang reports)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    logging.getLogger("commlayer").setLevel(logging.CRITICAL)  # rejections and peer deaths are expected here
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renames of the *_tensor collectives
    try:
        q.put((rank, "result", fn(rank, world, q, *args)))
    except BaseException as exc:  # report everything, including SystemExit
        q.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


class World:
    """``world`` processes running ``fn(rank, world, events, *args)``; they may post ``(rank, kind, value)``.

    Unlike ``tests/multiproc.run_world`` the parent keeps the processes, so it can kill, stop or
    attack them while they run and check afterwards that none is left behind.
    """

    def __init__(self, fn: Callable[..., Any], world: int, *args: Any, env: dict[str, str] | None = None) -> None:
        ctx = _mp()
        self.world = world
        self.q = ctx.Queue()
        self.env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
                    "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **(env or {})}
        self.procs = [ctx.Process(target=_child, args=(fn, r, world, self.env, args, self.q), daemon=True)
                      for r in range(world)]
        self.events: list[tuple[int, str, Any]] = []

    def start(self) -> "World":
        for p in self.procs:
            p.start()
        return self

    def next_event(self, timeout: float) -> tuple[int, str, Any] | None:
        try:
            ev = self.q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        self.events.append(ev)
        return ev

    def wait_for(self, kind: str, ranks: Sequence[int], timeout: float) -> dict[int, Any]:
        """Collects one ``kind`` event (or a result/error) from each of ``ranks`` until ``timeout``."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        for r, k, v in self.events:
            if r in ranks and k in (kind, "result", "error") and r not in got:
                got[r] = (k, v)
        while len(got) < len(ranks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ev = self.next_event(min(remaining, 0.5))
            if ev is None:
                if all(self.procs[r].exitcode is not None for r in ranks if r not in got):
                    ev = self.next_event(0.5)  # a last message may still be in flight
                    if ev is None:
                        break
                else:
                    continue
            r, k, v = ev
            if r in ranks and k in (kind, "result", "error") and r not in got:
                got[r] = (k, v)
        return got

    def stacks(self, rank: int) -> str:
        """Every thread's stack of a live rank (for a hang report); '' if it is gone."""
        p = self.procs[rank]
        if not p.is_alive():
            return ""
        try:
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1.0)
            return stack_file(p.pid).read_text()
        except OSError:
            return ""

    def close(self, grace: float = 10.0) -> list[int]:
        """Waits up to ``grace`` s for every process to exit, then kills the rest. Returns the killed ranks."""
        deadline = time.monotonic() + grace
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        leftovers = [r for r, p in enumerate(self.procs) if p.is_alive()]
        for r in leftovers:
            try:
                os.kill(self.procs[r].pid, signal.SIGCONT)
            except OSError:
                pass
            self.procs[r].kill()
            self.procs[r].join(timeout=5)
        self.q.close()
        self.q.join_thread()
        for p in self.procs:
            if p.pid:
                stack_file(p.pid).unlink(missing_ok=True)
        return leftovers


def _remove_stale_ipc(pids: Sequence[int]) -> int:
    """Deletes IPC socket files of killed ranks (a SIGKILLed process cannot unlink its own)."""
    base = Path(os.environ.get("COMMLAYER_IPC_DIR", "/tmp"))
    n = 0
    for pid in pids:
        for f in base.glob(f"commlayer-{pid}-*.sock"):
            try:
                f.unlink()
                n += 1
            except OSError:
                pass
    return n


# ==================================================================================== random collectives

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


def _reduce_ref(xs: list[torch.Tensor], op: Any, world: int) -> torch.Tensor:
    out = xs[0].clone()
    for x in xs[1:]:
        if op in (_RED.SUM, _RED.AVG):
            out.add_(x)
        elif op == _RED.PRODUCT:
            out.mul_(x)
        elif op == _RED.MIN:
            out = torch.minimum(out, x)
        elif op == _RED.MAX:
            out = torch.maximum(out, x)
        elif op == _RED.BAND:
            out.bitwise_and_(x)
        elif op == _RED.BOR:
            out.bitwise_or_(x)
        elif op == _RED.BXOR:
            out.bitwise_xor_(x)
    if op == _RED.AVG and world > 1:
        if out.dtype.is_complex:  # each part divided as a real number (complex division rounds differently)
            torch.view_as_real(out).div_(world)
        elif out.dtype.is_floating_point:
            out.div_(world)
        else:
            out = torch.div(out, world, rounding_mode="trunc").to(xs[0].dtype)
    return out


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
    inp = (lambda r, k=None: make_input(seed, spec, r, k))
    what = spec.describe()
    if name in ("all_reduce_small", "all_reduce_large"):
        w = dist.all_reduce(mine, op=spec.op, async_op=a)
        return w, (lambda: _same(what, mine, _reduce_ref([inp(r) for r in range(world)], spec.op, world))) if check else None
    if name == "broadcast":
        w = dist.broadcast(mine, src=root, async_op=a)
        return w, (lambda: _same(what, mine, inp(root))) if check else None
    if name == "reduce":
        w = dist.reduce(mine, dst=root, op=spec.op, async_op=a)
        want = (lambda: _reduce_ref([inp(r) for r in range(world)], spec.op, world)) if rank == root else (lambda: inp(rank))
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
        outs = [torch.empty(n, dtype=dt) for _ in range(world)] if rank == root else None
        w = dist.gather(mine, outs, dst=root, async_op=a)
        if rank != root:
            return w, None
        return w, (lambda: next((e for r in range(world) if (e := _same(f"{what} from {r}", outs[r], inp(r)))), None)) if check else None
    if name == "scatter":
        ins = [make_input(seed, spec, root * world + d) for d in range(world)] if rank == root else None
        out = torch.empty(n, dtype=dt)
        w = dist.scatter(out, ins, src=root, async_op=a)
        return w, (lambda: _same(what, out, make_input(seed, spec, root * world + rank))) if check else None
    if name == "reduce_scatter":
        ins = [make_input(seed, spec, rank * world + d) for d in range(world)]
        out = torch.empty(n, dtype=dt)
        w = dist.reduce_scatter(out, ins, op=spec.op, async_op=a)
        return w, (lambda: _same(what, out, _reduce_ref([make_input(seed, spec, s * world + rank) for s in range(world)],
                                                        spec.op, world))) if check else None
    if name == "reduce_scatter_tensor":
        big = inp(rank, n * world)
        out = torch.empty(n, dtype=dt)
        w = dist.reduce_scatter_tensor(out, big, op=spec.op, async_op=a)
        return w, (lambda: _same(what, out, _reduce_ref([inp(s, n * world)[rank * n:(rank + 1) * n] for s in range(world)],
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


# ==================================================================================== kill injection

KILL_MODES = ("exit", "sigkill", "sigstop")
DETECT_SLACK = 0.75  # grace before a dropped peer is declared dead (0.25 s) + I/O loop and scheduling


def _init(timeout: float) -> None:
    dist.init_process_group("zmq", timeout=timedelta(seconds=timeout))


def fd_names() -> list[str]:
    """What each open file descriptor of this process points to."""
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(re.sub(r"\[\d+\]$", "", os.readlink(f"/proc/self/fd/{f}")))
        except OSError:
            pass
    return sorted(out)


def _diff(before: list[str], after: list[str]) -> list[str]:
    rest = list(before)
    added = []
    for x in after:
        if x in rest:
            rest.remove(x)
        else:
            added.append(x)
    return added


def kill_worker(rank: int, world: int, events: Any, seed: int, victim: int, mode: str, delay: float,
                kill_times: Any, max_elems: int, deadline: float, port2: int) -> dict:
    """One rank of a kill run: random collectives until the victim dies, then a clean shutdown.

    A first init/destroy cycle creates torch's one-time state; the second cycle is the one that
    loses a rank, and after its destroy_process_group the survivor must hold exactly the file
    descriptors (and no commlayer thread) it held after the first. The victim (mode ``exit``)
    calls ``os._exit`` from a timer ``delay`` s into the run, wherever its main thread is; in the
    other modes the parent signals it. Survivors report the error they got and when they got it
    (``time.monotonic`` is system-wide).
    """
    _init(timeout=60.0)
    dist.barrier()
    dist.destroy_process_group()
    base = fd_names()
    os.environ["MASTER_PORT"] = str(port2)
    _init(timeout=60.0)
    events.put((rank, "ready", os.getpid()))
    if rank == victim and mode == "exit":
        def die() -> None:
            kill_times[victim] = time.monotonic()
            os._exit(9)
        timer = threading.Timer(delay, die)
        timer.daemon = True
        timer.start()
    err: tuple[str, str, int | None] | None = None
    t_err = 0.0
    step = 0
    t_end = time.monotonic() + deadline
    mism: list[str] = []
    is_comm = False
    try:
        step = run_ops(rank, world, seed, 0, 10**7, max_elems, False, mism, stop=lambda i: time.monotonic() > t_end)
    except Exception as exc:
        t_err = time.monotonic()
        err = (type(exc).__name__, str(exc)[:600], getattr(exc, "peer", None))
        is_comm = isinstance(exc, CommError)
    t0 = time.monotonic()
    dist.destroy_process_group()
    destroy_s = time.monotonic() - t0
    return {"error": err, "comm_error": is_comm, "t_err": t_err, "steps": step, "destroy_s": destroy_s,
            "threads_left": commlayer_threads(), "fds_added": _diff(base, fd_names()), "pid": os.getpid()}


@dataclass
class KillRun:
    """Outcome of one kill run."""

    run: int
    world: int
    victim: int
    mode: str
    delay: float
    clean: bool
    detect_s: float  # worst survivor: kill -> exception
    problems: list[str]
    errors: dict[int, str]
    misnamed: list[str] = field(default_factory=list)  # blamed a survivor that shut down, not the dead rank


def names_rank(msg: str, rank: int) -> bool:
    """True if ``msg`` names ``rank`` as the failed peer ("rank 2 ...", "global rank 2", "from rank 2")."""
    return re.search(rf"\brank {rank}\b", msg) is not None


def kill_once(run: int, seed: int, heartbeat: float, max_elems: int = 1 << 18, modes: Sequence[str] = KILL_MODES,
              worlds: Sequence[int] = (3, 4), limit: float | None = None) -> KillRun:
    """One kill run: a random world size, victim, kill mode and moment. ``limit``: detection bound for 'clean'."""
    rng = random.Random(seed * 31 + run)
    world = rng.choice(list(worlds))
    victim = rng.randrange(world)
    mode = modes[run % len(modes)]
    delay = rng.uniform(0.05, 1.5)
    if limit is None:
        # A dropped connection is seen at once (+ the 0.25 s grace); a frozen peer only when ZeroMQ's
        # heartbeat expires: up to one interval until the next PING, one more for its timeout.
        limit = 2 * heartbeat + (DETECT_SLACK if mode == "sigstop" else 0.0)
    kill_times = _mp().Array("d", world, lock=False)
    env = {"COMMLAYER_HEARTBEAT": str(heartbeat), "COMMLAYER_LINGER": "1"}
    deadline = 30.0 + 4 * heartbeat  # survivors stop looping after this long even if nothing happens
    w = World(kill_worker, world, seed * 7 + run, victim, mode, delay, kill_times, max_elems, deadline, free_port(), env=env).start()
    problems: list[str] = []
    misnamed: list[str] = []
    errors: dict[int, str] = {}
    detect = math.inf
    try:
        ready = w.wait_for("ready", list(range(world)), 120.0)
        if len(ready) < world or any(k != "ready" for k, _ in ready.values()):
            problems.append(f"setup failed: {ready}")
        else:
            if mode != "exit":
                time.sleep(delay)
                kill_times[victim] = time.monotonic()
                try:
                    os.kill(w.procs[victim].pid, signal.SIGKILL if mode == "sigkill" else signal.SIGSTOP)
                except ProcessLookupError:
                    problems.append(f"rank {victim} exited before it was killed: {[e for e in w.events if e[0] == victim][-1:]}")
            survivors = [r for r in range(world) if r != victim]
            res = w.wait_for("result", survivors, deadline + 30.0)
            worst = 0.0
            for r in survivors:
                if r not in res:
                    problems.append(f"rank {r} hung (no report); its stacks:\n{w.stacks(r)[-3000:]}")
                    continue
                kind, v = res[r]
                if kind != "result":
                    problems.append(f"rank {r} crashed: {v[-400:]}")
                    continue
                if v["error"] is None:
                    problems.append(f"rank {r} finished {v['steps']} ops without noticing the dead rank")
                    continue
                etype, msg, _peer = v["error"]
                errors[r] = f"{etype}: {msg}"
                took = v["t_err"] - kill_times[victim]
                worst = max(worst, took)
                if not v["comm_error"]:
                    problems.append(f"rank {r} raised {etype}, not a CommError: {msg[:200]}")
                elif not names_rank(msg, victim):
                    # A survivor that noticed first and shut down sends BYE; a survivor waiting on it
                    # then blames it instead of the dead rank (see docs/reliability.md).
                    (misnamed if "shut down its process group" in msg else problems).append(
                        f"rank {r}'s error does not name rank {victim}: {etype}: {msg[:300]}")
                if took > limit:
                    problems.append(f"rank {r} needed {took:.2f} s to notice (limit {limit:.1f} s)")
                if v["threads_left"]:
                    problems.append(f"rank {r}: threads left after destroy_process_group: {v['threads_left']}")
                if v["fds_added"]:
                    problems.append(f"rank {r}: destroy_process_group after the failure left more fds open than a clean "
                                    f"init/destroy: {v['fds_added']}")
            detect = worst if errors else math.inf
    finally:
        if mode == "sigstop":
            try:
                os.kill(w.procs[victim].pid, signal.SIGKILL)
            except OSError:
                pass
        leftovers = w.close(grace=15.0)
        orphans = [r for r in leftovers if r != victim]
        if orphans:
            problems.append(f"ranks {orphans} did not exit and were killed")
        for r, p in enumerate(w.procs):
            if r != victim and p.exitcode not in (0, None) and r not in orphans:
                problems.append(f"rank {r} exited with code {p.exitcode}")
        _remove_stale_ipc([p.pid for p in w.procs if p.pid])
    return KillRun(run, world, victim, mode, round(delay, 3), not problems and not misnamed, round(detect, 3), problems,
                   errors, misnamed)


def run_kill(n: int, seed: int, heartbeat: float = 2.0, max_elems: int = 1 << 18, log: Callable[[str], None] = print,
             modes: Sequence[str] = KILL_MODES) -> dict:
    """``n`` kill runs; returns the counts, the worst detection time per mode and every unclean run."""
    runs = []
    t0 = time.monotonic()
    for i in range(n):
        r = kill_once(i, seed, heartbeat, max_elems, modes)
        runs.append(r)
        log(f"kill {i + 1}/{n}: world {r.world} victim {r.victim} {r.mode:7s} after {r.delay:.2f} s: "
            f"{'clean' if r.clean else 'UNCLEAN'}, detected in {r.detect_s:.2f} s" + ("" if r.clean else f" {r.problems + r.misnamed}"))
    by_mode = {m: [r.detect_s for r in runs if r.mode == m and math.isfinite(r.detect_s)] for m in modes}
    return {"runs": n, "clean": sum(r.clean for r in runs), "heartbeat_s": heartbeat, "seconds": round(time.monotonic() - t0, 1),
            "worst_detect_s": {m: (max(v) if v else None) for m, v in by_mode.items()},
            "median_detect_s": {m: (sorted(v)[len(v) // 2] if v else None) for m, v in by_mode.items()},
            "unclean": [asdict(r) for r in runs if not r.clean],
            "misnamed_runs": sum(bool(r.misnamed) for r in runs),
            "hard_failures": sum(bool(r.problems) for r in runs),
            "sample_errors": sorted({e.split(":", 1)[0] + ": " + e.split(":", 1)[1][:160] for r in runs[:3] for e in r.errors.values()})}



def flush_worker(rank: int, world: int, events: Any, go: Any, nbytes: int, timeout: float) -> dict:
    """Rank 0 broadcasts ``nbytes`` to a rank the parent froze (SIGSTOP) and then kills (SIGKILL)."""
    _init(timeout=timeout)
    dist.barrier()
    events.put((rank, "ready", os.getpid()))
    if rank != 0:
        time.sleep(3 * timeout)  # frozen by the parent
        return {}
    go.wait(timeout=60.0)
    t0 = time.monotonic()
    try:  # three queued broadcasts: the first is on the wire when the receiver dies, the others still queued
        works = [dist.broadcast(torch.ones(nbytes // 4), src=0, async_op=True) for _ in range(3)]
        for wk in works:
            wk.wait()
        out = {"error": None}
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    out["t_err"] = time.monotonic()
    out["took"] = out["t_err"] - t0
    dist.destroy_process_group()
    return out


def dead_receiver_of_large_send(nbytes: int = 64 << 20, timeout: float = 20.0) -> dict:
    """How long rank 0 takes to fail a broadcast whose receiver froze and then died mid-transfer."""
    go = _mp().Event()
    w = World(flush_worker, 2, go, nbytes, timeout, env={"COMMLAYER_HEARTBEAT": "1"}).start()
    try:
        ready = w.wait_for("ready", [0, 1], 120.0)
        os.kill(ready[1][1], signal.SIGSTOP)
        go.set()
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(ready[1][1], signal.SIGKILL)
        res = w.wait_for("result", [0], timeout + 60.0)
    finally:
        w.close(grace=10.0)
        _remove_stale_ipc([p.pid for p in w.procs if p.pid])
    v = res.get(0, ("", {"error": "rank 0 did not report"}))[1]
    return {"error": v.get("error") if isinstance(v, dict) else v,
            "after_kill_s": round(v["t_err"] - t_kill, 2) if isinstance(v, dict) and "t_err" in v else None}

# ==================================================================================== frame fuzzing

_VALID_DTYPES = [d for d in DTYPE_SIZES if d]


def valid_message(rng: random.Random, src: int = 0, channel: str = "pg0") -> list[bytes]:
    """A well-formed message (header + payload frames) as a rank would send it."""
    kind = rng.choice(list(Kind))
    dtype = rng.choice(_VALID_DTYPES + [""])
    if dtype and rng.random() < 0.7:
        shape = [rng.randint(0, 6) for _ in range(rng.randint(1, 3))]
        total = math.prod(shape) * DTYPE_SIZES[dtype]
        cut = rng.randint(0, total)
        sizes = [cut, total - cut] if rng.random() < 0.3 else [total]
    else:
        shape, sizes = [], [rng.randint(0, 64) for _ in range(rng.randint(0, 3))]
    meta = rng.choice([None, {"world_size": 2, "nonce": "abc"}, {"codec": b"\x00\x01", "k": [1, 2.5, "x"]}])
    h = Header(kind, rng.choice(["allreduce", "broadcast", "p2p", "hello", "x" * 64]), channel, rng.randint(0, 2**40),
               rng.randint(0, 100), rng.randint(0, 100), src, dtype, tuple(shape), tuple(sizes), meta or {})
    return [h.pack()] + [bytes(rng.getrandbits(8) for _ in range(n)) if n < 64 else os.urandom(n) for n in sizes]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if r < 0.15:
        return rng.choice([0, 1, -1, 2**31, -(2**31), 2**62, -(2**62), 2**63 - 1, -(2**63), 2**64 - 1, 2**48])
    if r < 0.25:
        return rng.choice([float("nan"), float("inf"), -0.0, 1e308, 3.5])
    if r < 0.35:
        return rng.choice([None, True, False])
    if r < 0.5:
        return "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.choice([0, 1, 8, 65, 257, 4096])))
    if r < 0.6:
        return os.urandom(rng.choice([0, 1, 16, 1000]))
    if r < 0.8 and depth < 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    if depth < 3:
        return {rng.choice(["a", "world_size", "", "nonce"]) + str(i): _random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}
    return rng.randint(-5, 5)


def _nested(depth: int, leaf: bytes = b"\x00") -> bytes:
    return b"\x91" * depth + leaf  # fixarray of one element, ``depth`` times


DEEP_DEPTHS = (990, 1000, 1010, 1022, 1023)  # msgpack accepts them; repr() of such a value overflows the C stack guard


def mutate_header(rng: random.Random, hdr: bytes, deep: bool = True) -> bytes:
    """One malformed header frame derived from a valid one (or from nothing)."""
    fields = msgpack.unpackb(hdr, raw=False)
    k = rng.randrange(12)
    if k == 0:  # bit flips
        b = bytearray(hdr)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if k == 1:  # truncation
        return hdr[:rng.randrange(len(hdr))]
    if k == 2:  # trailing garbage
        return hdr + os.urandom(rng.randint(1, 16))
    if k == 3:  # random bytes, sometimes over the size limit
        return os.urandom(rng.choice([0, 1, 2, 13, 100, 1000, MAX_HEADER_BYTES + 1]))
    if k == 4:  # one field replaced by a value of another type or range
        i = rng.randrange(12)
        fields[i] = _random_value(rng)
        return msgpack.packb(fields, use_bin_type=rng.random() < 0.8)
    if k == 5:  # several fields replaced
        for i in rng.sample(range(12), rng.randint(2, 6)):
            fields[i] = _random_value(rng)
        return msgpack.packb(fields, use_bin_type=True)
    if k == 6:  # wrong field count
        return msgpack.packb(fields[:rng.randrange(12)] if rng.random() < 0.5 else fields + [_random_value(rng)])
    if k == 7:  # lengths that promise more than the frame holds (array32/map32/str32/bin32)
        return rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xdc", b"\xde"]) + rng.choice(
            [b"\xff\xff\xff\xff", b"\x00\x01\x00\x00", b"\xff\xff"]) + os.urandom(rng.randint(0, 8))
    if k == 8:  # deep nesting in one field (msgpack allows 1023 levels; repr recursion does not)
        i = rng.choice([0, 1, 2, 3, 4, 8, 9, 10, 11])
        parts = [msgpack.packb(f, use_bin_type=True) for f in fields]
        parts[i] = _nested(rng.choice([10, 500, 900, 1024, 1100, 3000] + (list(DEEP_DEPTHS) if deep else [])))
        return b"\x9c" + b"".join(parts)
    if k == 9:  # a non-array top level
        return msgpack.packb(_random_value(rng), use_bin_type=True)
    if k == 10:  # consistent-looking but oversized declared payloads
        fields[10] = [rng.choice([2**47, 2**48 - 1, 2**48, 10**12])] * rng.randint(1, 3)
        fields[8], fields[9] = "", []
        return msgpack.packb(fields, use_bin_type=True)
    # shapes whose product overflows 64 bits, or disagrees with the frame sizes
    fields[8] = rng.choice(_VALID_DTYPES)
    fields[9] = [rng.choice([0, 1, 7, 2**31, 2**62 - 1]) for _ in range(rng.randint(1, 33))]
    return msgpack.packb(fields, use_bin_type=True)


def deep_header(depth: int = 1000, field_index: int = 4) -> bytes:
    """A ~1 KB header whose field ``field_index`` is an array nested ``depth`` levels deep."""
    fields = [1, 0, "allreduce", "pg0", 1, 0, 0, 0, "", [], [], None]
    parts = [msgpack.packb(f) for f in fields]
    parts[field_index] = _nested(depth)
    return b"\x9c" + b"".join(parts)


def fuzz_message(rng: random.Random, src: int = 0, deep: bool = True) -> list[bytes]:
    """A malformed message: a mutated header, or a valid header with wrong payload frames.

    ``deep=False`` leaves out the headers nested 990-1023 levels deep (see :data:`DEEP_DEPTHS`).
    """
    msg = valid_message(rng, src)
    u = rng.random()
    if u < 0.75:
        return [mutate_header(rng, msg[0], deep)] + msg[1:]
    if u < 0.85:  # payload frame missing or extra
        return msg[:-1] if len(msg) > 1 and rng.random() < 0.5 else msg + [os.urandom(rng.randint(0, 32))]
    if u < 0.95 and len(msg) > 1:  # one payload frame too short or too long
        i = rng.randrange(1, len(msg))
        msg[i] = msg[i][:-1] if msg[i] and rng.random() < 0.5 else msg[i] + b"\x00" * rng.randint(1, 9)
        return msg
    return [os.urandom(rng.randint(0, 40)) for _ in range(rng.randint(1, 6))]  # multipart garbage


def fuzz_decoder(n: int, seed: int, deep: bool = True, time_limit: float = 600.0) -> dict:
    """Feeds ``n`` malformed messages to ``unpack_header`` + ``check_frames`` in this process.

    Only :class:`WireError` may escape. A message that happens to be valid (a mutation can be a
    no-op) counts as accepted. Returns counts, the slowest call and one example per escaping type.
    """
    rng = random.Random(seed)
    counts = {"rejected": 0, "accepted": 0, "escaped": 0}
    escaped: dict[str, str] = {}
    slowest = 0.0
    t_end = time.monotonic() + time_limit
    done = 0
    for done in range(1, n + 1):
        frames = fuzz_message(rng, deep=deep)
        hdr = frames[0]
        data = memoryview(hdr) if rng.random() < 0.5 else hdr
        t0 = time.perf_counter()
        try:
            h = unpack_header(data)
            check_frames(h, frames[1:])
            counts["accepted"] += 1
        except WireError:
            counts["rejected"] += 1
        except BaseException as exc:  # the finding: anything else would escape the transport's handler
            counts["escaped"] += 1
            escaped.setdefault(type(exc).__name__, f"{str(exc)[:120]} (header {hdr[:40]!r}..., {len(hdr)} bytes)")
        slowest = max(slowest, time.perf_counter() - t0)
        if time.monotonic() > t_end:
            break
    return {"messages": done, **counts, "escaped_types": escaped, "slowest_call_ms": round(slowest * 1e3, 3)}


def fuzz_serve_worker(rank: int, world: int, events: Any, stop: Any, ticks: Any, expect_rejected: Any, limit: float) -> dict:
    """A rank that keeps running verified collectives while the parent attacks rank 1's socket."""
    _init(timeout=60.0)
    tr = dist.group.WORLD.transport
    # The attacker is an insider (it holds rank 0's job credentials), so its garbage passes the
    # ZeroMQ handshake and reaches commlayer's validation; a stranger never gets that far.
    pw = tr.creds.passwords[0] if tr.creds.passwords is not None else ""
    events.put((rank, "ready", {"tcp": tr.endpoint.tcp, "pid": os.getpid(), "password": pw}))
    wrong: list[str] = []
    t_end = time.monotonic() + limit
    i = 0
    for i in range(1, 10**7):
        flag = torch.tensor([1 if (rank == 0 and (stop.is_set() or time.monotonic() > t_end)) else 0])
        x = torch.full((1000 + i % 7,), float(rank + 1 + i))
        dist.all_reduce(x)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        want = float(sum(r + 1 + i for r in range(world)))
        if not bool((x == want).all()):
            wrong.append(f"iteration {i}: all_reduce gave {x[0].item()}, expected {want}")
        b = torch.full((3,), float(i)) if rank == i % world else torch.zeros(3)
        dist.broadcast(b, src=i % world)
        if not bool((b == i).all()):
            wrong.append(f"iteration {i}: broadcast gave {b.tolist()}")
        ticks[rank] = i
        if flag.item():
            break
    settle = time.monotonic() + 15.0  # let the transport read whatever the attacker left queued
    while rank == 1 and tr.rejected < expect_rejected.value and time.monotonic() < settle:
        time.sleep(0.05)  # the idle I/O thread reads the socket now
    out = {"iterations": i, "wrong": wrong[:5], "rejected": tr.rejected, "census": census()}
    dist.destroy_process_group()
    return out


def _rogue_socket(ctx: Any, target: str, ident: bytes | None, password: str = "") -> Any:
    import zmq

    s = ctx.socket(zmq.DEALER)
    if password:
        s.plain_username, s.plain_password = b"r0", password.encode()
    if ident is not None:
        s.setsockopt(zmq.ROUTING_ID, ident)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, 10_000)
    s.setsockopt(zmq.SNDHWM, 1000)
    s.connect(target)
    return s


def fuzz_socket(n: int, seed: int, world: int = 2, deep: bool = True, big_frames: int = 8, raw_conns: int = 50,
                time_limit: float = 540.0, deep_every: int = 0) -> dict:
    """Sends ``n`` malformed messages to a live rank over its real TCP socket while the ranks keep
    running verified collectives.

    The attacker uses fresh identities, the target's own identity and a live peer's identity
    (ZeroMQ drops the latter: identities are first come, first served), sends ``big_frames``
    garbage messages of 8 MiB, and opens ``raw_conns`` TCP connections that speak no ZMTP at all.
    With ``deep=False`` the headers nested ~1000 levels deep (see docs/reliability.md) are left out;
    ``deep_every=k`` makes every k-th message one of them.

    Returns crash/hang/wrong-result counts, rejections, and the target's RSS, fds and threads.
    """
    import zmq

    ctx_mp = _mp()
    stop, ticks, expect = ctx_mp.Event(), ctx_mp.Array("q", world, lock=False), ctx_mp.Value("q", 10**12, lock=False)
    w = World(fuzz_serve_worker, world, stop, ticks, expect, time_limit + 60.0, env={"COMMLAYER_HEARTBEAT": "2"}).start()
    rng = random.Random(seed)
    out: dict[str, Any] = {"messages": 0, "crashes": 0, "hangs": 0, "wrong_results": 0}
    zctx = zmq.Context()
    socks: list[Any] = []
    try:
        ready = w.wait_for("ready", list(range(world)), 120.0)
        if len(ready) < world or any(k != "ready" for k, _ in ready.values()):
            raise RuntimeError(f"fuzz world did not start: {ready}")
        target, pid = ready[1][1]["tcp"], ready[1][1]["pid"]
        idents = [b"evil", b"r1", b"r0", b"r%d" % (world + 3), b"\x00" * 255, None]
        socks = [_rogue_socket(zctx, target, i, ready[1][1].get("password", "")) for i in idents]
        time.sleep(0.5)
        before = census(pid)
        peak = before["rss_kb"]
        counted = 0  # messages the target should count as rejected (the r0 impostor is dropped by ZeroMQ)
        t0 = time.monotonic()
        last_tick, last_progress = ticks[1], time.monotonic()
        sent = 0
        big_at = set(rng.sample(range(n), min(big_frames, n)))
        raw_at = set(rng.sample(range(n), min(raw_conns, n)))
        raws: list[socket.socket] = []
        checkpoints: list[float] = []  # target RSS (MiB) every tenth of the attack: flat = bounded
        for sent in range(1, n + 1):
            frames = fuzz_message(rng, deep=deep)
            if deep_every and sent % deep_every == 0:
                frames = [deep_header()]
            if sent - 1 in big_at:
                frames = [frames[0], os.urandom(8 << 20)]
            k = rng.randrange(len(socks))
            try:
                socks[k].send_multipart(frames, copy=len(frames[-1]) < 65536)
            except zmq.Again:
                out["hangs"] += 1  # the target stopped reading for 10 s
                break
            counted += idents[k] != b"r0"
            if sent - 1 in raw_at:
                host, port = target.removeprefix("tcp://").rsplit(":", 1)
                try:
                    c = socket.create_connection((host, int(port)), timeout=5)
                    c.sendall(rng.choice([b"GET / HTTP/1.1\r\n\r\n", b"\xff" + os.urandom(9), os.urandom(64)]))
                    raws.append(c)
                except OSError:
                    pass  # the target is gone: counted below
            if sent % 500 == 0:
                rss = census(pid)["rss_kb"]
                peak = max(peak, rss)
                if sent % max(500, (n // 10) // 500 * 500) == 0:
                    checkpoints.append(round(rss / 1024, 1))
                if ticks[1] != last_tick:
                    last_tick, last_progress = ticks[1], time.monotonic()
                if any(p.exitcode is not None for p in w.procs):
                    break
                if time.monotonic() - last_progress > 30 or time.monotonic() - t0 > time_limit:
                    break
        during = census(pid)
        for c in raws:
            c.close()
        out["messages"] = sent
        out["send_s"] = round(time.monotonic() - t0, 1)
        expect.value = counted
        # Progress after the attack: the collectives must go on.
        tick0 = ticks[1]
        deadline = time.monotonic() + 30
        while ticks[1] < tick0 + 20 and time.monotonic() < deadline and w.procs[1].exitcode is None:
            time.sleep(0.1)
        progressed = ticks[1] >= tick0 + 20
        time.sleep(1.0)
        stop.set()
        res = w.wait_for("result", list(range(world)), 90.0)
        after = census(pid) if w.procs[1].is_alive() else {}
        for r in range(world):
            if r not in res:
                out["hangs"] += 1
                out.setdefault("hang_stacks", {})[r] = w.stacks(r)[-3000:]
            elif res[r][0] != "result":
                out["crashes"] += 1
                out.setdefault("crash_errors", {})[r] = res[r][1][-1500:]
            else:
                out["wrong_results"] += len(res[r][1]["wrong"])
        if not progressed and not out["crashes"]:
            out["hangs"] += 1
        v = res.get(1, ("", {}))[1]
        final = v.get("census", after) if isinstance(v, dict) else after
        out.update({
            "rejected": v.get("rejected") if isinstance(v, dict) else None, "expected_rejections": counted,
            "iterations": v.get("iterations") if isinstance(v, dict) else None,
            "rss_before_mb": round(before["rss_kb"] / 1024, 1), "rss_peak_mb": round(max(peak, during["rss_kb"]) / 1024, 1),
            "rss_after_mb": round(final.get("rss_kb", -1) / 1024, 1), "rss_checkpoints_mb": checkpoints,
            "fds_before": before["fds"], "fds_during": during["fds"], "fds_after": final.get("fds", -1),
            "threads_before": before["threads"], "threads_after": final.get("threads", -1),
        })
    finally:
        for s in socks:
            s.close(linger=0)
        zctx.term()
        stop.set()
        leftovers = w.close(grace=15.0)
        if leftovers:
            out["hangs"] += len(leftovers)
            out["killed"] = leftovers
        _remove_stale_ipc([p.pid for p in w.procs if p.pid])
    return out


# ==================================================================================== soak


def soak_worker(rank: int, world: int, events: Any, seed: int, n_ops: int, max_elems: int, limit: float) -> dict:
    """``n_ops`` random collectives, each checked element-wise against a locally computed reference."""
    t_init = census()
    _init(timeout=120.0)
    mismatches: list[str] = []
    run_ops(rank, world, seed, 0, 20, max_elems, True, mismatches)  # warm-up: lazily created threads and buffers
    before = census()
    t0 = time.monotonic()
    t_end = t0 + limit
    rss_mb: list[int] = []  # every tenth of the run: a plateau means bounded memory
    every = max(50, n_ops // 10 // 50 * 50)

    def stop(i: int) -> bool:
        if i % every == 0:
            rss_mb.append(round(census()["rss_kb"] / 1024))
        return i % 50 == 0 and _agree_stop(time.monotonic() > t_end)

    done = 20 + run_ops(rank, world, seed, 20, n_ops - 20, max_elems, True, mismatches, stop=stop)
    secs = time.monotonic() - t0
    after = census()
    mb = dist.group.WORLD.transport.mailbox
    stats = mb.stats()
    with mb._lock:  # which channels still hold messages nobody took (diagnostic)
        stats["left_by_channel"] = {}
        for key in list(mb._box):
            stats["left_by_channel"][key[0]] = stats["left_by_channel"].get(key[0], 0) + 1
    dist.destroy_process_group()
    return {"ops": done, "mismatches": len(mismatches), "first_mismatches": mismatches[:5], "seconds": round(secs, 1),
            "before_init": t_init, "before": before, "after": after, "after_destroy": census(),
            "threads_left": commlayer_threads(), "mailbox": stats, "rss_mb": rss_mb}


def _agree_stop(mine: bool) -> bool:
    """All ranks stop at the same operation if any of them ran out of time."""
    t = torch.tensor([int(mine)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_soak(n_ops: int, seed: int, world: int = 4, max_elems: int = 300_000, time_limit: float = 540.0) -> dict:
    """Runs the soak on ``world`` ranks; per-rank figures and the totals."""
    w = World(soak_worker, world, seed, n_ops, max_elems, time_limit).start()
    try:
        res = w.wait_for("result", list(range(world)), time_limit + 240.0)
    finally:
        leftovers = w.close(grace=15.0)
    out: dict[str, Any] = {"world": world, "ops_requested": n_ops, "hangs": len(leftovers) + world - len(res), "crashes": 0}
    per_rank = {}
    for r in range(world):
        if r not in res:
            continue
        kind, v = res[r]
        if kind != "result":
            out["crashes"] += 1
            out.setdefault("crash_errors", {})[r] = v[-1500:]
            continue
        per_rank[r] = v
    if per_rank:
        vs = list(per_rank.values())
        out.update({
            "ops": min(v["ops"] for v in vs), "mismatches": sum(v["mismatches"] for v in vs),
            "first_mismatches": [m for v in vs for m in v["first_mismatches"]][:5],
            "seconds": max(v["seconds"] for v in vs),
            "threads_before_after": [(v["before"]["threads"], v["after"]["threads"]) for v in vs],
            "fds_before_after": [(v["before"]["fds"], v["after"]["fds"]) for v in vs],
            "rss_mb_before_after": [(round(v["before"]["rss_kb"] / 1024), round(v["after"]["rss_kb"] / 1024)) for v in vs],
            "fds_before_init_after_destroy": [(v["before_init"]["fds"], v["after_destroy"]["fds"]) for v in vs],
            "threads_left": sorted({t for v in vs for t in v["threads_left"]}),
            "mailbox_after": [v["mailbox"] for v in vs],
            "rss_mb_every_tenth": [v["rss_mb"] for v in vs],
        })
    return out


# ==================================================================================== timeouts

TIMEOUT_KINDS = ("all_reduce", "broadcast_from_stalled", "reduce", "all_gather", "all_gather_into_tensor",
                 "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                 "barrier", "barrier_per_call", "async_wait_per_call", "recv", "irecv_wait_per_call")
_PER_CALL = {"barrier_per_call", "async_wait_per_call", "irecv_wait_per_call"}


def _timeout_op(kind: str, group: Any, rank: int, world: int, t: float, stalled: int) -> None:
    x = torch.ones(1000)
    gsize = world
    per_call = timedelta(seconds=t)
    if kind == "all_reduce":
        dist.all_reduce(x, group=group)
    elif kind == "broadcast":
        dist.broadcast(x, src=0, group=group)
    elif kind == "broadcast_from_stalled":
        dist.broadcast(x, src=stalled, group=group)
    elif kind == "reduce":
        dist.reduce(x, dst=0, group=group)
    elif kind == "all_gather":
        dist.all_gather([torch.empty(1000) for _ in range(gsize)], x, group=group)
    elif kind == "all_gather_into_tensor":
        dist.all_gather_into_tensor(torch.empty(1000 * gsize), x, group=group)
    elif kind == "gather":
        dist.gather(x, [torch.empty(1000) for _ in range(gsize)] if rank == 0 else None, dst=0, group=group)
    elif kind == "scatter":
        dist.scatter(x, [torch.ones(1000) for _ in range(gsize)] if rank == 0 else None, src=0, group=group)
    elif kind == "reduce_scatter":
        dist.reduce_scatter(x, [torch.ones(1000) for _ in range(gsize)], group=group)
    elif kind == "reduce_scatter_tensor":
        dist.reduce_scatter_tensor(x, torch.ones(1000 * gsize), group=group)
    elif kind == "all_to_all":
        dist.all_to_all([torch.empty(10) for _ in range(gsize)], [torch.ones(10) for _ in range(gsize)], group=group)
    elif kind == "all_to_all_single":
        dist.all_to_all_single(torch.empty(10 * gsize), torch.ones(10 * gsize), group=group)
    elif kind == "barrier":
        dist.barrier(group=group)
    elif kind == "barrier_per_call":
        dist.barrier(group=group, timeout=per_call)
    elif kind == "async_wait_per_call":
        dist.all_reduce(x, group=group, async_op=True).wait(timeout=per_call)
    elif kind == "recv":
        dist.recv(x, src=stalled, tag=7, group=group)
    elif kind == "irecv_wait_per_call":
        dist.irecv(x, src=stalled, tag=8, group=group).wait(timeout=per_call)
    else:
        raise ValueError(kind)


def timeout_worker(rank: int, world: int, events: Any, kinds: Sequence[str], t: float, release: Any) -> dict:
    """Ranks 0..world-2 run each kind of operation on its own group; the last rank never joins them.

    Group kinds use a group created with ``timeout=t``; the per-call kinds use a group with a long
    timeout and pass ``t`` to the call. Afterwards the stalled rank sends two messages with the tag
    of the receives that timed out, to see where they land.
    """
    stalled = world - 1
    _init(timeout=120.0)
    groups = {k: dist.new_group(list(range(world)), timeout=timedelta(seconds=120.0 if k in _PER_CALL else t)) for k in kinds}
    out: dict[str, Any] = {}
    if rank != stalled:
        for k in kinds:
            t0 = time.monotonic()
            try:
                _timeout_op(k, groups[k], rank, world, t, stalled)
                out[k] = ("no error", "", time.monotonic() - t0)
            except Exception as exc:
                out[k] = (type(exc).__name__, str(exc)[:400], time.monotonic() - t0)
        events.put((rank, "done", None))
    if rank in (0, stalled) and "recv" in kinds:
        release.wait(timeout=300.0)
        # Two messages with the tag of the receive that timed out: a fresh receive must get the first.
        g = groups["recv"]
        if rank == stalled:
            dist.send(torch.full((1000,), 42.0), dst=0, tag=7, group=g)
            dist.send(torch.full((1000,), 43.0), dst=0, tag=7, group=g)
        else:
            y = torch.zeros(1000)
            try:
                w = dist.irecv(y, src=stalled, tag=7, group=g)
                w.wait(timeout=timedelta(seconds=10))
                out["late_recv_got"] = float(y[0])
            except Exception as exc:
                out["late_recv_got"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    else:
        release.wait(timeout=300.0)
    dist.destroy_process_group()
    return out


def run_timeouts(t: float = 1.0, world: int = 3, kinds: Sequence[str] = TIMEOUT_KINDS, margin: float = 2.0) -> dict:
    """Every kind of blocking call against a rank that stopped participating: CommTimeout within t + margin,
    naming the operation, the group and a peer."""
    release = _mp().Event()
    w = World(timeout_worker, world, kinds, t, release).start()
    try:
        done = w.wait_for("done", list(range(world - 1)), 120.0 + len(kinds) * (t + 10.0))
        release.set()
        res = w.wait_for("result", list(range(world)), 120.0)
    finally:
        release.set()
        leftovers = w.close(grace=15.0)
    rows = {}
    problems: list[str] = []
    for k in kinds:
        worst, row_problems, example = 0.0, [], ""
        for r in range(world - 1):
            if r not in res or res[r][0] != "result":
                row_problems.append(f"rank {r} did not report: {res.get(r, ('', 'hung'))[1][-300:]}")
                continue
            etype, msg, took = res[r][1][k]
            worst = max(worst, took)
            if etype == "CommTimeout":
                example = example or f"{etype}: {msg}"
            if etype == "no error":  # a rank that only sends to the stalled one may finish (as with gloo)
                pass
            elif etype != "CommTimeout":
                row_problems.append(f"rank {r}: {etype} {msg[:200]}")
            elif not (re.search(r"\brank \d\b", msg) and "group" in msg):
                row_problems.append(f"rank {r}: the message does not name a peer and the group: {msg[:200]}")
            if took > t + margin:
                row_problems.append(f"rank {r}: raised after {took:.2f} s (timeout {t} s + margin {margin} s)")
        if not example and not row_problems:
            row_problems.append("no rank raised CommTimeout")
        rows[k] = {"ok": not row_problems, "worst_s": round(worst, 2), "problems": row_problems, "example": example[:300]}
        problems += [f"{k}: {p}" for p in row_problems]
    late = res.get(0, ("", {}))[1].get("late_recv_got") if isinstance(res.get(0, ("", {}))[1], dict) else None
    if "recv" in kinds and late != 42.0:
        problems.append(f"a receive after a timed-out one got {late!r}, expected the first message sent after it (42.0)")
    return {"timeout_s": t, "margin_s": margin, "kinds": rows, "late_recv_got": late, "problems": problems,
            "hung_ranks": leftovers, "ok": sum(v["ok"] for v in rows.values()), "total": len(rows)}


# ==================================================================================== command line


def _fmt_detect(d: dict) -> str:
    return ", ".join(f"{m} {v:.2f} s" for m, v in d.items() if v is not None) or "-"


def table(res: dict) -> str:
    """The figures of a run as a plain-text table."""
    rows: list[tuple[str, str, str]] = []
    if "kill" in res:
        k = res["kill"]
        rows += [("kill: clean failures", f"{k['clean']}/{k['runs']}", "all"),
                 ("kill: blamed a survivor / other failures", f"{k['misnamed_runs']} / {k['hard_failures']}", "0 / 0"),
                 ("kill: worst detection", _fmt_detect(k["worst_detect_s"]), f"<= {2 * k['heartbeat_s']:.1f} s (2 x heartbeat)"),
                 ("kill: median detection", _fmt_detect(k["median_detect_s"]), ""),
                 ("kill: wall time", f"{k['seconds']:.0f} s", "")]
    for key, label in (("fuzz_decoder", "fuzz decoder"), ("fuzz_decoder_no_deep", "fuzz decoder (no deep nesting)")):
        if key in res:
            f = res[key]
            rows += [(f"{label}: messages", str(f["messages"]), ""),
                     (f"{label}: non-WireError escapes", f"{f['escaped']} {sorted(f['escaped_types'])}", "0"),
                     (f"{label}: slowest call", f"{f['slowest_call_ms']:.1f} ms", "")]
    for key, label in (("fuzz_socket", "fuzz socket"), ("fuzz_socket_deep", "fuzz socket (+2 deep headers)")):
        if key in res:
            f = res[key]
            rows += [(f"{label}: messages", f"{f['messages']} in {f.get('send_s', 0):.0f} s", ""),
                     (f"{label}: crashes / hangs / wrong", f"{f['crashes']} / {f['hangs']} / {f['wrong_results']}", "0 / 0 / 0")]
            if "rss_before_mb" in f:
                rows += [(f"{label}: rejected", f"{f['rejected']} of {f['expected_rejections']}", "all"),
                         (f"{label}: RSS before/peak/after", f"{f['rss_before_mb']} / {f['rss_peak_mb']} / {f['rss_after_mb']} MiB", "bounded"),
                         (f"{label}: fds before/during/after", f"{f['fds_before']} / {f['fds_during']} / {f['fds_after']}", "")]
    if "soak" in res:
        s = res["soak"]
        rows += [("soak: collectives x ranks", f"{s.get('ops', 0)} x {s['world']}", ""),
                 ("soak: mismatches", str(s.get("mismatches")), "0"),
                 ("soak: crashes / hangs", f"{s['crashes']} / {s['hangs']}", "0 / 0")]
        if "threads_before_after" in s:
            rows += [("soak: threads before->after", " ".join(f"{a}->{b}" for a, b in s["threads_before_after"]), "equal"),
                     ("soak: fds before->after", " ".join(f"{a}->{b}" for a, b in s["fds_before_after"]), "equal"),
                     ("soak: RSS MiB before->after", " ".join(f"{a}->{b}" for a, b in s["rss_mb_before_after"]), "bounded"),
                     ("soak: wall time", f"{s['seconds']:.0f} s", "")]
    if "timeouts" in res:
        t = res["timeouts"]
        rows += [("timeouts: kinds ok", f"{t['ok']}/{t['total']}", "all"),
                 ("timeouts: worst (timeout 1 s)", f"{max(v['worst_s'] for v in t['kinds'].values()):.2f} s", f"<= {t['timeout_s'] + t['margin_s']:.0f} s")]
    w = max(len(r[0]) for r in rows) if rows else 10
    v = max(len(r[1]) for r in rows) if rows else 10
    lines = [f"{'figure':<{w}}  {'measured':<{v}}  target", "-" * (w + v + 12)]
    lines += [f"{a:<{w}}  {b:<{v}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill", type=int, default=0, help="kill runs (issue 7: 50)")
    ap.add_argument("--fuzz", type=int, default=0, help="malformed messages, in-process and over a live socket (issue 7: 100000)")
    ap.add_argument("--soak", type=int, default=0, help="random collectives on --world ranks (issue 7: 10000)")
    ap.add_argument("--timeouts", action="store_true", help="every blocking call against a rank that stopped participating")
    ap.add_argument("--world", type=int, default=4, help="ranks of the soak")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="COMMLAYER_HEARTBEAT of the kill runs")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write every figure (with the unclean runs' details) here")
    args = ap.parse_args(argv)
    if not (args.kill or args.fuzz or args.soak or args.timeouts):
        ap.error("nothing to do: give --kill, --fuzz, --soak and/or --timeouts")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("commlayer").setLevel(logging.CRITICAL)
    res: dict[str, Any] = {"seed": args.seed}
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    if args.kill:
        res["kill"] = run_kill(args.kill, args.seed, args.heartbeat, log=say)
    if args.fuzz:
        say(f"fuzz: {args.fuzz} messages into unpack_header/check_frames")
        res["fuzz_decoder"] = fuzz_decoder(args.fuzz, args.seed)
        res["fuzz_decoder_no_deep"] = fuzz_decoder(args.fuzz, args.seed, deep=False)
        say(f"fuzz: {args.fuzz} messages into a live rank's socket (without the deep-nesting headers)")
        res["fuzz_socket"] = fuzz_socket(args.fuzz, args.seed, deep=False)
        say("fuzz: 2000 messages into a live rank's socket, two of them deep-nesting headers")
        res["fuzz_socket_deep"] = fuzz_socket(2000, args.seed + 1, deep=False, deep_every=1000)
    if args.soak:
        say(f"soak: {args.soak} random collectives on {args.world} ranks")
        res["soak"] = run_soak(args.soak, args.seed, world=args.world)
    if args.timeouts:
        say("timeouts: every kind of blocking call against a stalled rank")
        res["timeouts"] = run_timeouts()
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    # Workers must be pickled as reliability.<name>, not __main__.<name>: import this file by name.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reliability

    sys.exit(reliability.main())
