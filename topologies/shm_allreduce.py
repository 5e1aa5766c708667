"""All-reduce through one shared-memory region when every rank of the group is on this machine.

Instead of the ring's 2(p-1) socket hops, each rank copies its input once into its area of a
segment every rank maps (:mod:`commlayer.transport.shm_region`), and then:

- small tensors (bytes x ranks <= ``small_bytes``): after one barrier every rank folds all p
  inputs itself, reading them in place;
- larger ones, in rounds of ``area_bytes``: a reduce-scatter (rank r folds slice r of all p
  inputs, in place, into its result area; its own slice it reads from its own tensor, so it
  never copies that one in), one barrier, and an all-gather (every rank copies the p reduced
  slices out). The next round's input is published at the same barrier, so a round
  costs one barrier.

Every element is combined in rank order 0, 1, ..., p-1 (``x0 op x1 op ... op x_{p-1}``, the same
as a sequential numpy/torch fold), by exactly one rank or identically by all, so every rank ends
with bit-identical results. Buffers alternate by barrier parity: data published at barrier g is
read between passing g and arriving at g+1, so it is never overwritten while read.

Past the set-up no socket message is sent: each rank publishes its call's fingerprint (sequence,
size, dtype, reduce op; :mod:`~commlayer.topologies.shm_fingerprint`) beside its first input, and
every rank compares all of them after the first barrier, before reading any input, so a
disagreement fails every rank alike. A peer that runs another collective instead never arrives;
that collective's messages or fingerprint confirmations reach this rank's transport, whose
failure the waits below check.

Every wait is bounded by the operation's timeout and checks, about every 20 ms, the peer's
process (pid) and the transport's failure state, raising :class:`PeerFailure` or
:class:`CommTimeout` naming the peer. Set-up (the group's first all-reduce) runs over the
operation's messages, steps 0-2 (:data:`SETUP_STEPS`): group rank 0 creates the segment, the
others map it, and rank 0 unlinks it once all have (or any failed), so nothing is left in
``/dev/shm`` whatever way the ranks exit later.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from commlayer import settings
from commlayer.topologies.comm import Group, OpComm
from commlayer.topologies.reduce_ops import ReduceOp, combine_
from commlayer.topologies.shm_fingerprint import compare_tags, call_tag
from commlayer.topologies.ring import even_bounds
from commlayer.transport import shm_region
from commlayer.transport.errors import CommError, CommTimeout, PeerFailure, rewrap

logger = logging.getLogger(__name__)

SETUP_STEPS = 3  # message steps the first all-reduce of a group spends on set-up
_BLOCK = 256 << 10  # bytes folded at a time, so the accumulator stays in cache


@dataclass(frozen=True)
class ShmConfig:
    """Knobs of the shared-memory all-reduce (rank 0's values are used by the whole group).

    Attributes:
        enabled: ``COMMLAYER_SHM_ALLREDUCE``.
        area_bytes: bytes of a round per rank (two areas each). ``COMMLAYER_SHM_AREA_BYTES``.
        small_bytes: bytes x ranks up to which every rank folds the whole tensor. ``COMMLAYER_SHM_SMALL_BYTES``.
        spin: flag scans before sleeping (-1: 20 when ranks <= cores, else 0). ``COMMLAYER_SHM_SPIN``.
    """

    enabled: bool = True
    area_bytes: int = 4 << 20
    small_bytes: int = 512 << 10
    spin: int = -1

    def __post_init__(self) -> None:
        if self.area_bytes < 4096:
            raise ValueError(f"COMMLAYER_SHM_AREA_BYTES: expected at least 4096, got {self.area_bytes}")
        if self.small_bytes < 0:
            raise ValueError(f"COMMLAYER_SHM_SMALL_BYTES: expected >= 0, got {self.small_bytes}")

    @classmethod
    def from_settings(cls) -> "ShmConfig":
        return cls(settings.get("COMMLAYER_SHM_ALLREDUCE"), settings.get("COMMLAYER_SHM_AREA_BYTES"),
                   settings.get("COMMLAYER_SHM_SMALL_BYTES"), settings.get("COMMLAYER_SHM_SPIN"))


class _State:
    """The group's region (None when the group cannot use one) and what its waits need."""

    def __init__(self, region: shm_region.Region | None, why: str, small_bytes: int, spin: int, pids: list[int]) -> None:
        self.region, self.why, self.small_bytes, self.spin, self.pids = region, why, small_bytes, spin, pids
        self.closed = False
        self.listener: tuple[Any, Callable[[int, str], None]] | None = None  # (transport, its failure listener)

    def close(self) -> None:
        self.closed = True
        if self.listener is not None:
            self.listener[0].remove_failure_listener(self.listener[1])
            self.listener = None
        if self.region is not None:
            self.region.close()
            self.region = None


_states: "weakref.WeakKeyDictionary[Group, _State]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def shm_allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, enabled: bool = True) -> bool:
    """All-reduces the 1-D contiguous ``flat`` in place through shared memory (AVG is left as a SUM).

    Args:
        comm: the operation; its group's first call negotiates the region over steps 0-2.
        enabled: False skips it (e.g. an algorithm was forced).

    Returns:
        False when the group cannot use shared memory (a rank elsewhere, disabled, set-up failed);
        the caller then runs another algorithm on ``comm.shifted(SETUP_STEPS)``.

    Raises:
        PeerFailure: a peer died or failed while this rank waited for it.
        CommTimeout: a peer did not arrive within the operation's timeout.
    """
    if comm.size == 1 or not enabled:
        return False
    state = _states.get(comm.group)
    if state is not None and state.region is None:
        return False
    if state is not None and flat.numel() and comm.shapes is None:
        # Steady state: the fingerprint travels in the region beside the data (no socket message) and
        # every rank compares all of them after the first barrier, before it reads any input.
        comm.declare(count=flat.numel(), dtype=flat.dtype, redop=op)
        _run(state, comm, flat, op)
        return True
    # The group's first call (set-up), an empty call or the debug mode's shape check: every rank's call
    # is compared over the sockets first (one payload-free message per peer).
    comm.declare(count=flat.numel(), dtype=flat.dtype, redop=op, confirm=True)
    comm.finish()
    if state is None:
        state = _negotiate(comm)
    if state.region is None:
        return False
    if flat.numel():
        _run(state, comm, flat, op)
    return True


def _run(state: _State, comm: OpComm, flat: torch.Tensor, op: ReduceOp) -> None:
    try:
        _allreduce(state, comm, flat, op)
    except BaseException as exc:
        # The failed frames hold views of the mapping (flag words, areas); the error lives on in the
        # group and its Works, and while they do the region cannot be unmapped, nor its fd closed.
        traceback.clear_frames(exc.__traceback__)
        raise


# ---- the algorithm ------------------------------------------------------------------------------
def _fold(dst: torch.Tensor, srcs: Sequence[torch.Tensor], op: ReduceOp) -> None:
    """``dst = srcs[0] op srcs[1] op ...`` (left to right), block by block."""
    m = dst.numel()
    step = max(1, _BLOCK // dst.element_size())
    for a in range(0, m, step):
        b = min(m, a + step)
        d = dst[a:b] if (a, b) != (0, m) else dst
        d.copy_(srcs[0][a:b])
        for s in srcs[1:]:
            combine_(d, s[a:b], op)


def _allreduce(state: _State, comm: OpComm, flat: torch.Tensor, op: ReduceOp) -> None:
    reg = state.region
    assert reg is not None
    p, r, dt, n = comm.size, comm.rank, flat.dtype, flat.numel()
    esize = flat.element_size()
    deadline = time.monotonic() + comm.timeout
    mine = call_tag(comm, flat, op)

    def check(q: int, now: float) -> None:
        _check_peer(state, comm, q, now, deadline)

    def barrier() -> int:
        g = reg.arrive()
        reg.wait_all(g, deadline, state.spin, check)
        return g

    reg.set_tag((reg.gen + 1) % 2, mine)
    if n * esize * p <= state.small_bytes:
        reg.inputs((reg.gen + 1) % 2, dt, 0, n)[r].copy_(flat)
        g = barrier()
        compare_tags(comm, reg.tags(g % 2), mine)
        _fold(flat, reg.inputs(g % 2, dt, 0, n), op)
        return
    cap = reg.area_bytes // esize
    starts = list(range(0, n, cap))

    def publish(buf: int, lo: int) -> list[tuple[int, int]]:
        """Copies round ``lo``'s input into area ``buf``, all but this rank's own slice (only it reads that)."""
        hi = min(n, lo + cap)
        bounds = even_bounds(hi - lo, p)
        a, b = bounds[r]
        area = reg.inputs(buf, dt, 0, hi - lo)[r]
        area[:a].copy_(flat[lo:lo + a])
        area[b:].copy_(flat[lo + b:hi])
        return bounds

    bounds = publish((reg.gen + 1) % 2, 0)
    g = barrier()
    compare_tags(comm, reg.tags(g % 2), mine)
    for k, lo in enumerate(starts):
        a, b = bounds[r]
        outs = reg.results((g + 1) % 2, dt, [y - x for x, y in bounds])
        srcs = reg.inputs(g % 2, dt, a, b)
        srcs[r] = flat[lo + a:lo + b]
        _fold(outs[r], srcs, op)  # this rank's slice of round k
        this = bounds
        if k + 1 < len(starts):  # round k+1's input goes out at the same barrier
            bounds = publish((g + 1) % 2, starts[k + 1])
        g = barrier()
        for (x, y), out in zip(this, outs):
            flat[lo + x:lo + y].copy_(out)


def _check_peer(state: _State, comm: OpComm, q: int, now: float, deadline: float) -> None:
    group = comm.group
    gq = group.ranks[q]
    what = f"{comm.describe()}, shared-memory all-reduce"
    err = group.transport.failure_for(group.channel, gq)
    if err is not None:
        raise rewrap(err, f"{what}: {err}")
    if state.closed:
        raise CommError(f"{what}: the transport of this rank was shut down")
    if state.pids[q] and not shm_region.pid_alive(state.pids[q]):
        raise PeerFailure(f"{what}: rank {q} (global rank {gq}, pid {state.pids[q]}) exited while this rank waited for it", peer=gq)
    if now > deadline:
        raise CommTimeout(f"{what}: Timed out after {comm.timeout:.1f} s waiting for rank {q} (global rank {gq}); is it alive "
                          "and running the same collective? Raise timeout= of init_process_group/new_group if it is just slow")


# ---- set-up ---------------------------------------------------------------------------------------
def _colocated(group: Group) -> str:
    """"" when every rank of ``group`` is reached over ipc:// (same machine, no override), else why not."""
    stats = group.transport.peer_stats()
    far = [group.ranks.index(g) for g in group.ranks if g != group.transport.rank and not stats[g]["endpoint"].startswith("ipc://")]
    return f"ranks {far} are not reached over ipc:// on this machine" if far else ""


def _negotiate(comm: OpComm) -> _State:
    """Decides, identically on every rank, whether the group uses a region, and maps it."""
    group = comm.group
    cfg = ShmConfig.from_settings()
    why = "" if cfg.enabled else "COMMLAYER_SHM_ALLREDUCE=0"
    why = why or shm_region.supported() or _colocated(group)
    if why:  # the same on every rank: settings and endpoint records are shared
        state = _State(None, why, 0, 0, [])
    else:
        # A peer in another pid namespace is invisible here: only the transport watches it (pid 0).
        pids = [pid if shm_region.pid_alive(pid) else 0 for pid in (group.transport.peer_info[g].pid for g in group.ranks)]
        spin = cfg.spin if cfg.spin >= 0 else (20 if comm.size <= (os.cpu_count() or 1) else 0)
        state = _State(None, "", cfg.small_bytes, spin, pids)
        region, state.why, state.small_bytes = _setup(comm, cfg)
        state.region = region
        if region is None:
            logger.warning("%s: the shared-memory all-reduce is off for this group (%s); using the socket algorithms",
                           comm.describe(), state.why)
        else:
            group.transport.add_close_hook(state.close)
            # A peer's failure (pidfd, socket, heartbeat) wakes this rank's shared-memory waits at once: under
            # torchrun the survivors must raise before the launcher's teardown signal (~10 ms after the death).
            def interrupt(_peer: int, _why: str) -> None:
                if state.region is not None:
                    state.region.interrupt()

            state.listener = (group.transport, interrupt)
            group.transport.add_failure_listener(interrupt)
    with _lock:
        _states[group] = state
    return state


def _meta(msg: Any, q: int, step: int) -> dict[str, Any]:
    meta = msg.header.meta
    if not isinstance(meta, dict) or meta.get("shm_setup") != step:
        raise CommError(f"rank {q} does not run the shared-memory all-reduce set-up (step {step}); set the same "
                        "COMMLAYER_SHM_ALLREDUCE, COMMLAYER_IPC and COMMLAYER_CONNECT_OVERRIDES on every rank")
    return meta


def _setup(comm: OpComm, cfg: ShmConfig) -> tuple[shm_region.Region | None, str, int]:
    """Rank 0 creates, the others attach; returns (region or None, why not, small_bytes)."""
    p = comm.size
    if comm.rank != 0:
        offer = _meta(comm.recv(0, 0), 0, 0)
        path, why = str(offer["path"]), str(offer["why"])
        area, result, small = int(offer["area"]), int(offer["result"]), int(offer["small"])
        region = None
        if path:
            try:
                region = shm_region.attach(path, p, area, result, comm.rank)
            except (OSError, ValueError) as exc:
                why = f"rank {comm.rank} could not map {path}: {exc}"
        try:
            comm.send(0, 1, [], meta={"shm_setup": 1, "why": why})
            verdict = _meta(comm.recv(0, 2), 0, 2)
        except BaseException:
            if region is not None:
                region.close()
            raise
        if region is not None and not verdict["go"]:
            region.close()
            region = None
        return region, str(verdict["why"]), small
    area = max(4096, cfg.area_bytes // 64 * 64)
    result = (area // p + 64 + 63) // 64 * 64
    path = shm_region.region_path(os.getpid(), comm.group.transport.nonce, comm.group.channel)
    region, why = None, ""
    try:
        try:
            region = shm_region.create(path, p, area, result)
        except OSError as exc:
            why = f"rank 0 could not create {path} ({shm_region.Region.nbytes(p, area, result)} bytes): {exc}"
        offer = {"shm_setup": 0, "path": path if region is not None else "", "why": why, "area": area, "result": result,
                 "small": cfg.small_bytes}
        for q in range(1, p):
            comm.send(q, 0, [], meta=offer)
        whys = [str(_meta(comm.recv(q, 1), q, 1)["why"]) for q in range(1, p)]
    except BaseException:
        if region is not None:
            region.close()
        raise
    finally:
        shm_region.unlink(path)  # every rank has mapped it (or failed): the name is no longer needed
    why = why or next((w for w in whys if w), "")
    go = region is not None and not why
    try:
        for q in range(1, p):
            comm.send(q, 2, [], meta={"shm_setup": 2, "go": go, "why": why})
    except BaseException:  # a peer failed during the set-up: the region must not outlive it
        if region is not None:
            region.close()
        raise
    if not go and region is not None:
        region.close()
        region = None
    return region, why, cfg.small_bytes
