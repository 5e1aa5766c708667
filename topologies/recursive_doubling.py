"""Recursive doubling all-reduce: ceil(log2 p) rounds, the latency optimum for small messages.

Thakur, Rabenseifner & Gropp, "Optimization of collective communication operations in MPICH"
(IJHPCA 2005). Non-power-of-two sizes fold the first 2r ranks in pairs before the exchange and
unfold after it. Every rank combines the same operands in the same pairing, so all ranks end
with bitwise-identical results.
"""

from __future__ import annotations

import torch

from commlayer.topologies.comm import OpComm
from commlayer.topologies.cost import CostParams, Links
from commlayer.topologies.reduce_ops import ReduceOp, combine_
from commlayer.topologies.schedule import Step, single


def recursive_doubling_allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp) -> None:
    """All-reduces ``flat`` in place (AVG is left as a SUM; the caller divides)."""
    p, rank, n = comm.size, comm.rank, flat.numel()
    if p == 1:
        return
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    if rank < 2 * rem:
        if rank % 2 == 0:
            comm.send_tensor(rank + 1, 0, flat, copy=True)
            newrank = -1
        else:
            combine_(flat, comm.recv_tensor(rank - 1, 0, flat.dtype, n), op)
            newrank = rank // 2
    else:
        newrank = rank - rem
    if newrank >= 0:
        mask, step = 1, 1
        while mask < pof2:
            partner = newrank ^ mask
            peer = partner * 2 + 1 if partner < rem else partner + rem
            comm.send_tensor(peer, step, flat, copy=True)
            other = comm.recv_tensor(peer, step, flat.dtype, n)
            # Same operand order on both sides, so both hold identical bits.
            if partner < newrank:
                res = other.clone()
                combine_(res, flat, op)
                flat.copy_(res)
            else:
                combine_(flat, other, op)
            mask <<= 1
            step += 1
    final = 64
    if rank < 2 * rem:
        if rank % 2 == 1:
            comm.send_tensor(rank - 1, final, flat, copy=True)
        else:
            flat.copy_(comm.recv_tensor(rank + 1, final, flat.dtype, n))


def recursive_doubling_schedule(size: int, nbytes: int) -> list[Step]:
    """What :func:`recursive_doubling_allreduce` sends: the fold, the log2 exchanges, the unfold (whole tensor each)."""
    p = size
    if p <= 1 or nbytes == 0:
        return []
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    steps = []
    if rem:
        steps.append(single(list(range(0, 2 * rem, 2)), list(range(1, 2 * rem, 2)), [nbytes] * rem))
    active = [r for r in range(p) if not (r < 2 * rem and r % 2 == 0)]
    mask = 1
    while mask < pof2:
        steps.append(single(active, [active[nr ^ mask] for nr in range(len(active))], [nbytes] * len(active)))
        mask <<= 1
    if rem:
        steps.append(single(list(range(1, 2 * rem, 2)), list(range(0, 2 * rem, 2)), [nbytes] * rem, work="copy"))
    return steps


def recursive_doubling_time(s: Links, nbytes: float, params: CostParams, elem_scale: float = 1.0) -> float:
    """Recursive doubling (with the fold/unfold of non-powers of two), whole tensor per message."""
    p = s.size
    if p <= 1 or nbytes <= 0:
        return 0.0
    red = nbytes * elem_scale / params.reduce_Bps
    o = params.msg_overhead_s

    def xfer(a: int, b: int, t_send: float) -> float:
        return t_send + s.alpha[a][b] + (nbytes + params.msg_wire_bytes) / s.beta[a][b] + o

    t = [0.0] * p
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    for r in range(1, 2 * rem, 2):  # fold: even sends to odd
        t[r] = max(t[r], xfer(r - 1, r, t[r - 1])) + red
    active = [r for r in range(p) if not (r < 2 * rem and r % 2 == 0)]
    mask = 1
    while mask < pof2:
        new = list(t)
        for nr, r in enumerate(active):
            q = active[nr ^ mask]
            new[r] = max(t[r], xfer(q, r, t[q])) + red
        t = new
        mask <<= 1
    for r in range(1, 2 * rem, 2):  # unfold
        t[r - 1] = max(t[r - 1], xfer(r, r - 1, t[r])) + nbytes / params.copy_Bps
    return max(t)
