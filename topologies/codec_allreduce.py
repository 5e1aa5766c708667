"""Compressed all-reduce: a gradient codec carried by the ring / recursive-doubling collectives.

How the payloads are combined follows :func:`commlayer.codecs.aggregation_mode` and is never
silently wrong:

* ``allreduce`` (linear codecs: identity, fp16, bf16, randomk...): each rank encodes, the
  codec's *summable* tensor is summed by the exact dense all-reduce (ring or recursive doubling,
  chosen like ``topologies.dense``), and every rank decodes the sum. With ``average=True`` the
  input is divided by the group size before encoding (no fp16 overflow).
* ``allgather`` (every other codec): the packed payloads travel around the ring (or go directly
  to every rank for small payloads); every rank decodes all of them and sums in rank order, so all
  ranks hold bitwise-identical results.
* ``majority_vote`` (``sign:scale=none``): all-gather of the 1-bit payloads, then
  ``sign(sum of votes)`` (signSGD with majority vote); the result is the vote, for either
  ``average`` value.
* ``powersgd``: PowerSGD's two mean all-reduces (of P and Q) over the dense all-reduce, each in its own
  step range of the one operation (:meth:`OpComm.shifted`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from commlayer.codecs import Codec, CodecContext, Encoded, aggregation_mode, average_payloads, from_frames, powersgd_allreduce, to_frames
from commlayer.topologies.comm import OpComm
from commlayer.topologies.dense import SMALL_BYTES, allreduce as dense_allreduce
from commlayer.topologies.p2p import buf
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.ring import DEFAULT_CHUNK_BYTES

#: Step offset between the phases of one compressed all-reduce (dense collectives use < 2^16 steps).
PHASE = 1 << 16


def allgather_encoded(comm: OpComm, enc: Encoded, algo: str = "ring", order: Sequence[int] | None = None) -> list[Encoded]:
    """Every rank's payload, indexed by group rank (payload sizes may differ).

    ``algo="ring"`` forwards payloads around the ring in p-1 steps (each link carries every
    payload once); anything else sends directly to every peer (one step, p-1 messages per rank).
    """
    p, me = comm.size, comm.rank
    header, buffers = to_frames(enc)
    out: list[Encoded | None] = [None] * p
    out[me] = from_frames(header, buffers)
    if p == 1:
        return [enc]
    if algo == "ring":
        order = list(order) if order is not None else list(range(p))
        pos = order.index(me)
        nxt, prv = order[(pos + 1) % p], order[(pos - 1) % p]
        comm.send(nxt, 0, [header, *buffers], meta={"o": me})
        for s in range(p - 1):
            msg = comm.recv(prv, s)
            origin = order[(pos - s - 1) % p]
            frames = [buf(f) for f in msg.frames]
            out[origin] = from_frames(frames[0], frames[1:])
            if s < p - 2:
                comm.send(nxt, s + 1, frames, meta={"o": origin})
    else:
        for k in range(1, p):
            comm.send((me + k) % p, 0, [header, *buffers])
        for k in range(1, p):
            src = (me - k) % p
            frames = [buf(f) for f in comm.recv(src, 0).frames]
            out[src] = from_frames(frames[0], frames[1:])
    comm.finish()
    return out  # type: ignore[return-value]


def _check(flat: torch.Tensor, ctx: CodecContext) -> None:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"Expected a 1-D contiguous tensor, got shape {tuple(flat.shape)}")
    if flat.numel() != ctx.numel or flat.dtype != ctx.dtype:
        raise ValueError(f"Expected the context to describe the tensor ({flat.numel()} x {flat.dtype}), got {ctx.shape} x {ctx.dtype}")


def codec_allreduce(comm: OpComm, flat: torch.Tensor, codec: Codec, ctx: CodecContext, algo: str = "auto", average: bool = True,
                    mode: str | None = None, order: Sequence[int] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """All-reduces ``flat`` in place through ``codec``: afterwards every rank holds the same
    approximation of the mean (``average=True``) or the sum (``average=False``) over the group.

    Args:
        comm: the operation's communicator (every rank of the group calls this with equal ``ctx``
            shape/dtype/key/step/seed).
        flat: 1-D contiguous floating tensor (float32/16, bfloat16, float64).
        codec: a codec, pipeline or error-feedback wrapper (stateful ones keep state per ``ctx.key``).
        ctx: describes ``flat`` (``ctx.shape`` may be the original N-D shape, e.g. for PowerSGD).
        algo: "ring", "tree" (recursive doubling / direct all-gather) or "auto" (by the codec's
            wire size, identical on every rank).
        average: mean (True) or sum (False) semantics. Majority vote returns the vote either way.
        mode: aggregation mode (None: the codec's preferred one); an invalid mode raises ValueError.
        order: ring order (a permutation of group ranks).
        chunk_bytes: ring pipeline chunk.

    Raises:
        ValueError: invalid mode for the codec, or ``ctx`` not describing ``flat``.
    """
    _check(flat, ctx)
    comm.declare(count=flat.numel(), dtype=flat.dtype, redop="avg" if average else "sum")
    mode = aggregation_mode(codec, mode)
    p = comm.size
    if algo not in ("auto", "ring", "tree"):
        raise ValueError(f"Expected algo in ('auto', 'ring', 'tree'), got {algo!r}")
    if algo == "auto":
        algo = "tree" if codec.wire_bytes(max(ctx.numel, 1), ctx.dtype) < SMALL_BYTES else "ring"
    if mode == "allreduce":
        if average and p > 1:
            flat.div_(p)
        enc = codec.encode(flat.view(ctx.shape), ctx)
        payload = codec.summable(enc, ctx).reshape(-1).contiguous().clone()
        dense_allreduce(comm, payload, ReduceOp.SUM, algo, order, chunk_bytes)
        flat.copy_(codec.decode(codec.from_summable(payload, ctx), ctx).reshape(-1))
    elif mode == "powersgd":
        calls = [0]

        def mean(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous().clone()
            sub = comm.shifted(calls[0] * PHASE)
            calls[0] += 1
            dense_allreduce(sub, t, ReduceOp.SUM, algo, order, chunk_bytes)
            return t.div_(p)

        out = powersgd_allreduce(codec, [flat.view(ctx.shape)], [ctx], mean)[0]
        flat.copy_(out.reshape(-1))
        if not average:
            flat.mul_(p)
    else:
        enc = codec.encode(flat.view(ctx.shape), ctx)
        payloads = allgather_encoded(comm, enc, "ring" if algo == "ring" else "direct", order)
        if mode == "majority_vote":
            flat.copy_(average_payloads(codec, payloads, ctx, "majority_vote").reshape(-1))
        else:
            acc = torch.float64 if ctx.dtype == torch.float64 else torch.float32
            total = torch.zeros(ctx.numel, dtype=acc)
            for e in payloads:  # rank order: identical bits on every rank
                total += codec.decode(e, ctx).reshape(-1).to(acc)
            if average:
                total /= p
            flat.copy_(total)
