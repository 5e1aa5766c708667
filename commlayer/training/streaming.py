"""Streaming, compressed DiLoCo: the outer all-reduce runs in the background while inner steps compute.

DiLoCo (Douillard et al., 2023) averages the pseudo-gradient ``delta = theta_global - theta_local``
every ``H`` inner steps and applies an outer Nesterov step. Streaming DiLoCo (Douillard et al.,
"Streaming DiLoCo with overlapping communication", 2025) removes the stall:

* **fragments**: the parameters are cut into ``P`` contiguous fragments of about equal size;
  fragment ``p`` is sent at inner steps ``(p + 1) * (H // P) + k * H``, so syncs are spread over
  the period and the link carries ``1 / P`` of the model at a time;
* **overlap**: a fragment's all-reduce is issued asynchronously (torch.distributed ``async_op``
  work, futures chained with callbacks; any backend, gloo and zmq alike) and its result is applied
  ``delay`` inner steps later (default ``H // P``: the one-step-delayed outer update); meanwhile
  training goes on;
* **merge**: when the averaged pseudo-gradient arrives, the outer optimizer updates the fragment's
  global copy and the local fragment becomes ``mixing * local + (1 - mixing) * global`` (the
  paper's alpha; 0 = take the global copy, as plain DiLoCo does). With ``delay=0`` and
  ``mixing=0`` this is exactly :class:`commlayer.sync.PeriodicAverager` (DiLoCo).
* **compression**: the pseudo-gradient goes through any codec spec (``int8+ef``, ``qsgd:levels=7+ef``
  = 4 bits, ``topk:ratio=0.01+ef`` ...) by the one aggregation protocol
  (:func:`commlayer.codecs.aggregate.aggregate` over :class:`~commlayer.training.codec_hook.TorchExchange`);
  error-feedback residuals are kept per fragment, bounded by one copy of the parameters
  (:mod:`commlayer.codecs.memory`).
* ``period="auto"``: ``H`` follows the measured all-reduce time and inner step time
  (:mod:`commlayer.training.sync_period`): the ranks share their measurements when fragment 0's
  result is applied and all adopt the agreed ``H`` at the next round boundary.

Collectives of one instance are issued one after another (each starts when the previous one is
complete), so every rank issues them in the same order even though later rounds are launched from
completion callbacks. Give the sync a process group that nothing else uses while it is in flight:
by default it creates its own (``dist.new_group()``, collective at construction).

Usage::

    sync = StreamingDiLoCo(model.parameters(), StreamingConfig(period="auto", fragments=4, codec="int8+ef"))
    for batch in data:
        loss_fn(model(batch)).backward(); opt.step(); opt.zero_grad()
        sync.step()
    sync.flush()
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist

from commlayer.codecs import CodecContext
from commlayer.codecs.aggregate import aggregate, then
from commlayer.codecs.memory import check_state, limit_state
from commlayer.training.codec_hook import CodecHookState, TorchExchange, _then_future
from commlayer.training.streaming_parts import StreamingConfig, fragment_bounds, memory_report
from commlayer.training.sync_period import Recent

logger = logging.getLogger(__name__)

Future = torch.futures.Future
__all__ = ["StreamingConfig", "StreamingDiLoCo"]


@dataclass
class _Pending:
    apply_step: int
    future: Future
    round: int
    flat: torch.Tensor = field(repr=False)


class StreamingDiLoCo:
    """Fragment-wise DiLoCo whose compressed outer all-reduce overlaps the next inner steps.

    Args:
        params: the model parameters (updated in place).
        config: a :class:`StreamingConfig`.
        group: process group used only by this sync (None: a new group of all ranks).
        broadcast_init: broadcast group rank 0's parameters first so all workers start equal.
    """

    def __init__(self, params: Iterable[torch.Tensor], config: StreamingConfig | None = None, group: Any = None,
                 broadcast_init: bool = True) -> None:
        self.cfg = cfg = config if config is not None else StreamingConfig()
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("Expected at least one parameter, got none")
        self.group = group if group is not None else dist.new_group()
        self.world = dist.get_world_size(self.group)
        self.bounds = fragment_bounds([p.numel() for p in self.params], cfg.fragments)
        if broadcast_init:
            src = dist.get_global_rank(self.group, 0)
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=src, group=self.group)
        self.global_flat = [self._local_flat(f).clone() for f in range(cfg.fragments)]
        self.outer = torch.optim.SGD(self.global_flat, lr=cfg.outer_lr, momentum=cfg.outer_momentum, nesterov=cfg.nesterov)
        self.codec_state = CodecHookState.from_spec(cfg.codec or "identity", self.group, cfg.seed)
        self.grad_bytes = sum(p.numel() * p.element_size() for p in self.params)
        limit_state(self.codec_state.codec, self.grad_bytes, cfg.memory_copies)
        self.exchange = TorchExchange(self.group, self.codec_state)
        self.period = cfg.period if isinstance(cfg.period, int) else cfg.rule.period_min
        self.step_count = 0
        self.syncs = 0
        self._rounds = [0] * cfg.fragments
        self._next_send = self._schedule(0)
        self._pending: dict[int, _Pending] = {}
        self._tail: Future | None = None
        self._stats: Future | None = None
        self._stats_step = 0
        self.comm_s, self.step_s = Recent(), Recent()
        self.compute_total_s = self.overhead_total_s = self.wait_total_s = 0.0
        self._returned: float | None = None
        self.decisions: list[dict[str, float]] = []

    # -- public -----------------------------------------------------------------------------
    @property
    def delay(self) -> int:
        """Inner steps between sending a fragment and applying its average (for the current period)."""
        return self.cfg.delay if self.cfg.delay is not None else self.period // self.cfg.fragments

    def in_flight(self) -> int:
        """Fragments whose outer all-reduce was issued and not applied yet."""
        return len(self._pending)

    @torch.no_grad()
    def step(self) -> bool:
        """Counts one inner step: applies due results, sends due fragments. Returns True if it sent one."""
        entered = time.perf_counter()
        if self._returned is not None:
            self.step_s.add(entered - self._returned)
            self.compute_total_s += entered - self._returned
        self.step_count += 1
        t = self.step_count
        for f in sorted(f for f, pend in self._pending.items() if pend.apply_step <= t):
            self._apply(f)
        due = [f for f in range(self.cfg.fragments) if self._next_send[f] == t]
        if due and due[0] == 0 and self._stats is not None and self._stats_step < t:  # shared at an earlier step
            self._adopt()
        for f in due:
            if f in self._pending:  # the schedule changed (period=auto): the previous result lands before the next send
                self._apply(f)
            self._send(f)
        self._returned = time.perf_counter()
        self.overhead_total_s += self._returned - entered
        return bool(due)

    @torch.no_grad()
    def flush(self) -> None:
        """Waits for and applies every outstanding result (call at the end of training)."""
        for f in sorted(self._pending):
            self._apply(f)
        if self._stats is not None:
            self._wait(self._stats, "the period statistics")
            self._stats = None
        self._returned = None

    def utilization(self) -> float:
        """Compute time / (compute time + time spent inside :meth:`step`), since construction."""
        total = self.compute_total_s + self.overhead_total_s
        return self.compute_total_s / total if total > 0 else 1.0

    def memory(self) -> dict[str, Any]:
        """This rank's memory for the sync, in bytes: codec state (error-feedback residuals...),
        global copy, outer momentum, in-flight buffers, and the gradient size they are bounded by."""
        return memory_report(self)

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank contributed to outer all-reduces."""
        return self.codec_state.bytes_sent

    def global_parameters(self) -> list[torch.Tensor]:
        """The outer (global) copy, one flat tensor per fragment."""
        return list(self.global_flat)

    # -- internals ----------------------------------------------------------------------------
    def _schedule(self, start: int) -> list[int]:
        spacing = self.period // self.cfg.fragments
        return [start + (f + 1) * spacing for f in range(self.cfg.fragments)]

    def _views(self, f: int) -> list[tuple[torch.Tensor, int, int]]:
        lo, hi = self.bounds[f]
        out, off = [], 0
        for p in self.params[lo:hi]:
            out.append((p, off, off + p.numel()))
            off += p.numel()
        return out

    def _local_flat(self, f: int) -> torch.Tensor:
        lo, hi = self.bounds[f]
        return torch.cat([p.detach().reshape(-1) for p in self.params[lo:hi]])

    def _chain(self, start: Any) -> Future:
        prev = self._tail
        fut = start() if prev is None or prev.done() else _then_future(prev, lambda _v: start(), need_value=False)
        self._tail = fut
        return fut

    def _send(self, f: int) -> None:
        flat = self.global_flat[f] - self._local_flat(f)  # pseudo-gradient (a new tensor)
        ctx = CodecContext((flat.numel(),), flat.dtype, f"outer/f{f}:{flat.numel()}", self._rounds[f], self.cfg.seed)
        codec, mode = self.codec_state.codec, self.codec_state.resolved_mode

        def start() -> Future:
            t0 = time.perf_counter()
            fut = aggregate(codec, flat, ctx, self.exchange, mode, average=True)
            check_state(codec, self.grad_bytes, self.cfg.memory_copies, "streaming DiLoCo")
            fut.add_done_callback(lambda _f: self.comm_s.add(time.perf_counter() - t0))
            return fut

        fut = self._chain(start)
        self._pending[f] = _Pending(self.step_count + self.delay, fut, self._rounds[f], flat)
        self._rounds[f] += 1
        self._next_send[f] = self.step_count + self.period
        if self.delay == 0:
            self._apply(f)

    def _apply(self, f: int) -> None:
        pend = self._pending.pop(f)
        avg = self._wait(pend.future, f"the outer all-reduce of fragment {f} (round {pend.round})")
        g = self.global_flat[f]
        g.grad = avg.view_as(g)
        self.outer.step()
        g.grad = None
        a = self.cfg.mixing
        for p, lo, hi in self._views(f):
            src = g[lo:hi].view_as(p)
            if a == 0.0:
                p.copy_(src)
            else:
                p.mul_(a).add_(src, alpha=1.0 - a)
        self.syncs += 1
        if f == 0 and self.cfg.period == "auto" and self._stats is None:
            self._share_stats()

    def _wait(self, fut: Future, what: str) -> Any:
        if not fut.done():
            t0 = time.perf_counter()
            ready = threading.Event()
            fut.add_done_callback(lambda _f: ready.set())
            if not ready.wait(self.cfg.timeout_s):
                raise TimeoutError(f"streaming DiLoCo: {what} did not complete within {self.cfg.timeout_s:.0f} s on rank "
                                   f"{dist.get_rank(self.group)}; a peer is dead or far behind (StreamingConfig.timeout_s)")
            self.wait_total_s += time.perf_counter() - t0
        return fut.value()

    def _adopt(self) -> None:
        """At a round boundary: adopt the period the ranks agreed from the last statistics."""
        assert self._stats is not None
        comm_s, step_s = (float(v) for v in self._wait(self._stats, "the period statistics"))
        self._stats = None
        old = self.period
        self.period = self.cfg.rule.choose(comm_s, step_s, old)
        self.decisions.append({"step": self.step_count, "comm_s": comm_s, "step_s": step_s, "period": self.period})
        if self.period != old:
            logger.info("streaming DiLoCo: period %d -> %d (all-reduce %.3f s, inner step %.4f s)", old, self.period, comm_s, step_s)
            self._next_send = self._schedule(self.step_count - self.period // self.cfg.fragments)

    def _share_stats(self) -> None:
        """Right after fragment 0's result was applied (the same step on every rank, and its all-reduce
        has been measured everywhere): all-reduce the MAX over ranks of the median all-reduce and
        inner step times, chained like the data; adopted at the next round boundary."""
        stats = torch.tensor([self.comm_s.median(), self.step_s.median()], dtype=torch.float64)

        def start() -> Future:
            work = dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
            return then(work.get_future(), lambda _v: stats)

        self._stats = self._chain(start)
        self._stats_step = self.step_count
