"""Compressed all-reduce: a gradient codec carried by any registered all-reduce algorithm.

The aggregation itself is the codec protocol (:func:`commlayer.codecs.aggregate.aggregate`), run
over :class:`CommExchange`, this module's blocking implementation of its exchange interface on one
operation's communicator. How payloads are combined follows the codec's declared modes
(:func:`commlayer.codecs.aggregation_mode`) and is never silently wrong:

* ``allreduce`` (linear codecs: identity, fp16, bf16, randomk...): each rank encodes, the
  codec's *summable* tensor is summed by the algorithm's exact all-reduce (from
  :mod:`commlayer.topologies.registry`: ring, tree, chain, ps...), and every rank decodes the sum.
  With ``average=True`` the input is divided by the group size before encoding (no fp16 overflow).
* ``allgather`` (every other codec): the packed payloads travel the way the algorithm declares
  (``gather="ring"``: around the ring; ``"direct"``: straight to every rank); every rank decodes
  all of them and sums in rank order, so all ranks hold bitwise-identical results.
* ``majority_vote`` (``sign:scale=none``): all-gather of the 1-bit payloads, then
  ``sign(sum of votes)`` (signSGD with majority vote); the result is the vote, for either
  ``average`` value.
* ``powersgd``: PowerSGD's two mean all-reduces (of P and Q) over the algorithm's all-reduce, each
  in its own step range of the one operation (:meth:`OpComm.shifted`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from commlayer.codecs import Codec, CodecContext, Encoded, from_frames, to_frames
from commlayer.codecs.aggregate import aggregate, done
from commlayer.topologies import registry
from commlayer.topologies.comm import OpComm
from commlayer.topologies.p2p import buf
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.ring import DEFAULT_CHUNK_BYTES, ring_schedule
from commlayer.topologies.schedule import Step, fan

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


def allgather_schedule(size: int, nbytes: int, algo: str = "ring", order: Sequence[int] | None = None) -> list[Step]:
    """What :func:`allgather_encoded` sends when every payload is ``nbytes``: whole payloads, never chunked.

    ``"ring"``: p-1 steps; in step s the rank at ring position k forwards the payload of position
    k - s to position k + 1. Otherwise one step in which rank r sends to r+1, r+2, ... (mod p).
    """
    p = size
    if p <= 1:
        return []
    if algo == "ring":  # one chunk per payload: the ring's all-gather with a chunk as large as a block
        elems = max(1, -(-nbytes // 4))
        return list(ring_schedule(p, elems * p, 4, order, elems * 4, phase="allgather"))
    outs = [[(s + k) % p for k in range(1, p)] for s in range(p)]
    return [fan(list(range(p)), outs, [[nbytes] * (p - 1)] * p, work="copy")]


class CommExchange:
    """The codec protocol's exchange over one operation's communicator (blocking; futures come back done).

    Each all-reduce runs the registered algorithm in its own step range (``PHASE`` apart), so the
    rounds of a multi-round protocol never mix their messages.

    Args:
        comm: the operation's communicator.
        algo: a registered algorithm (not "auto": resolve it first).
        order: ring / chain order.
        chunk_bytes: pipeline chunk.
    """

    def __init__(self, comm: OpComm, algo: registry.Algorithm, order: Sequence[int] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.comm, self.algo, self.order, self.chunk_bytes = comm, algo, order, chunk_bytes
        self.size = comm.size
        self._calls = 0

    def allreduce(self, tensor: torch.Tensor) -> torch.futures.Future:
        sub = self.comm.shifted(self._calls * PHASE) if self._calls else self.comm
        self._calls += 1
        self.algo.run(sub, tensor, ReduceOp.SUM, self.order, self.chunk_bytes)
        return done(tensor)

    def allgather(self, encoded: Encoded) -> torch.futures.Future:
        return done(allgather_encoded(self.comm, encoded, self.algo.gather, self.order))


def _check(flat: torch.Tensor, ctx: CodecContext) -> None:
    if flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"Expected a 1-D contiguous tensor, got shape {tuple(flat.shape)}")
    if flat.numel() != ctx.numel or flat.dtype != ctx.dtype:
        raise ValueError(f"Expected the context to describe the tensor ({flat.numel()} x {flat.dtype}), got {ctx.shape} x {ctx.dtype}")


def codec_allreduce(comm: OpComm, flat: torch.Tensor, codec: Codec, ctx: CodecContext, algo: str = "auto", average: bool = True,
                    mode: str | None = None, order: Sequence[int] | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> str:
    """All-reduces ``flat`` in place through ``codec``: afterwards every rank holds the same
    approximation of the mean (``average=True``) or the sum (``average=False``) over the group.

    Args:
        comm: the operation's communicator (every rank of the group calls this with equal ``ctx``
            shape/dtype/key/step/seed).
        flat: 1-D contiguous floating tensor (float32/16, bfloat16, float64).
        codec: a codec, pipeline or error-feedback wrapper (stateful ones keep state per ``ctx.key``).
        ctx: describes ``flat`` (``ctx.shape`` may be the original N-D shape, e.g. for PowerSGD).
        algo: a registered algorithm or "auto" (by the codec's wire size, identical on every rank).
        average: mean (True) or sum (False) semantics. Majority vote returns the vote either way.
        mode: aggregation mode (None: the codec's preferred one); an invalid mode raises ValueError.
        order: ring order (a permutation of group ranks).
        chunk_bytes: ring pipeline chunk.

    Returns:
        The algorithm used.

    Raises:
        ValueError: unknown algorithm, invalid mode for the codec, or ``ctx`` not describing ``flat``.
    """
    _check(flat, ctx)
    comm.declare(count=flat.numel(), dtype=flat.dtype, redop="avg" if average else "sum")
    a = registry.resolve(registry.validate(algo), codec.wire_bytes(max(ctx.numel, 1), ctx.dtype), comm.size)
    aggregate(codec, flat, ctx, CommExchange(comm, a, order, chunk_bytes), mode, average).value()
    return a.name
