"""Runs of ring/chain steps replayed in row space: the same message-by-message queues, fewer numpy calls.

A ring all-reduce over ``p`` nodes is ``2(p-1)`` steps in which every node sends one message to its
fixed successor, each step waiting on the previous one; at 4 096 nodes that is 8 190 steps of 4 096
messages per round. Step by step (:meth:`commlayer.sim.engine.Engine.transfer`), each step gathers
and scatters every queue it touches from the engine's per-node arrays. Consecutive steps that share
their sender and destination arrays (``one_link``, one chunk column, no mask: every ring and chain
step of a schedule) use the same queues, so :class:`RowRun` gathers those queues once into arrays
indexed by row (row ``g``: sender ``src[g]``, its link, the receiver ``dst[g]``'s downlink and CPU),
advances them step by step with the same operations in the same order as ``transfer`` (and the
same random draws, in the same order), and scatters them back when the run ends. Results are
bit-for-bit those of the step-by-step path (``tests/test_sim_engine.py`` compares them); bytes and
energy sums may differ in the last bits (they are summed per run, then added).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from commlayer.topologies.schedule import Step


def fusable(st: Step) -> bool:
    """Whether ``st`` can join a :class:`RowRun`: one message per row to a distinct receiver, chunk 0, no mask."""
    return st.one_link and st.mask is None and st.dst.shape[1] == 1 and not st.chunk.any()


class RowRun:
    """Queues of one (senders, receivers) pairing, held by row while steps on it follow each other.

    Args:
        eng: the :class:`~commlayer.sim.engine.Engine` whose state is gathered (and scattered back by :meth:`close`).
        done: the replay's per-(node, chunk) processed times, ``(n, width)``; column 0 is read and written.
        src: ``(G,)`` senders (node ids). dst: ``(G,)`` receivers, distinct.
    """

    def __init__(self, eng: Any, done: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
        self.eng, self.done, self.src, self.dst = eng, done, src, dst
        c = eng._consts(src, dst[:, None])
        (_, delay, inv_rate, jit, rtt, loss_a, loss_cap, self.any_jit, self.any_loss, inv_up, inv_down, queue,
         self.energy_per_B) = c
        self.delay, self.inv_rate, self.jit, self.rtt = delay[:, 0], inv_rate[:, 0], jit[:, 0], rtt[:, 0]
        self.loss_a, self.loss_cap, self.inv_up, self.inv_down = loss_a[:, 0], loss_cap[:, 0], inv_up[:, 0], inv_down[:, 0]
        self.queue = queue[:, 0]
        self.neg_delay = -self.delay
        self.device = eng.cfg.contention == "device"
        if self.device:
            self.up, self.down = eng.up_free[src], eng.down_free[dst]
        else:
            self.link = eng.link_free[src, dst]
        self.cpu = eng.cpu[dst]
        self.rdone = done[dst, 0]
        row_of = np.full(done.shape[0], -1, dtype=np.int64)
        row_of[dst] = np.arange(dst.size)
        self.perm = row_of[src]                      # the row in which each sender receives, or -1
        self.feeds = bool((self.perm >= 0).all())
        self.fixed = done[src, 0]                    # what senders that receive nothing in this run have done
        self.sent = np.zeros(src.size)
        self.work = {w: self._work(w, 1.0) for w in ("reduce", "copy", "none")}
        self.messages = 0

    def step(self, st: Step, elem_scale: float) -> None:
        """Moves one step's messages, exactly as :meth:`Engine.transfer` followed by the replay's bookkeeping
        (the same operations on the same operands, some written into buffers instead of new arrays)."""
        eng, p = self.eng, self.eng.cfg.params
        ready = self.rdone[self.perm] if self.feeds else np.where(self.perm >= 0, self.rdone[self.perm], self.fixed)
        nb = st.nbytes[:, 0].astype(float)
        ser = nb * self.inv_rate
        if self.device:
            up = nb * self.inv_up
            ufin = np.maximum(ready, self.up, out=self.up)
            ufin += up
            start = ufin - up
            late = np.subtract(start, ready, out=ready)
            late = np.greater(late, self.queue) * self.rtt
            down = np.multiply(nb, self.inv_down)
            dfin = np.add(start, self.delay)
            np.maximum(dfin, self.down, out=self.down)
            self.down += down
            arrive = np.add(start, ser, out=start)
            np.maximum(ufin, arrive, out=arrive)
            arrive += self.delay
            np.maximum(arrive, self.down, out=arrive)
            arrive += late
        else:
            fin = np.maximum(ready, self.link, out=self.link)
            fin += ser
            arrive = fin + self.delay
        if eng.cfg.jitter and self.any_jit:
            j = eng.rng.standard_normal(nb.size)
            j *= self.jit
            arrive += np.maximum(self.neg_delay, j, out=j)
        if eng.cfg.loss and self.any_loss:
            thr = np.minimum(nb, self.loss_cap)
            thr *= self.loss_a
            stall = eng.rng.random(nb.size) < -np.expm1(thr, out=thr)
            arrive += stall * self.rtt
        self.sent += nb
        nb *= self.work[st.work] if elem_scale == 1.0 else self._work(st.work, elem_scale)
        nb += p.msg_overhead_s
        np.maximum(arrive, self.cpu, out=self.cpu)
        self.cpu += nb
        np.maximum(self.rdone, self.cpu, out=self.rdone)
        self.messages += nb.size

    def _work(self, work: str, elem_scale: float) -> float:
        p = self.eng.cfg.params
        return {"reduce": elem_scale / p.reduce_Bps, "copy": 1.0 / p.copy_Bps, "none": 0.0}[work]

    def close(self) -> None:
        """Writes the queues, the receivers' processed times, bytes and energy back to the engine."""
        eng = self.eng
        if self.device:
            eng.up_free[self.src], eng.down_free[self.dst] = self.up, self.down
        else:
            eng.link_free[self.src, self.dst] = self.link
        eng.cpu[self.dst] = self.cpu
        self.done[self.dst, 0] = self.rdone
        eng.sent[self.src] += self.sent
        eng.energy[self.src] += self.sent * self.energy_per_B
        eng.messages += self.messages
