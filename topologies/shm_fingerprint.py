"""The shared-memory all-reduce's collective fingerprint: three words each rank publishes beside its data.

Socket messages carry a :class:`~commlayer.transport.wire.Call` that receivers compare; the
shared-memory path sends no message in its steady state, so each rank writes its call as
(sequence, element count, code) into its tag slot of the region before it arrives at the first
barrier, and every rank compares all p tags after passing it, before it reads any input. The code
packs the op name (CRC-32), the dtype and the reduce op, so kind, size, dtype and op disagreements
fail every rank alike, naming the same two ranks everywhere.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from commlayer.topologies.comm import WIRE_DTYPES, OpComm, wire_dtype
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.transport.errors import CollectiveMismatch

_DTYPES: tuple[torch.dtype, ...] = tuple(WIRE_DTYPES)
_OPS: tuple[ReduceOp, ...] = tuple(ReduceOp)


def call_tag(comm: OpComm, flat: torch.Tensor, op: ReduceOp) -> tuple[int, int, int]:
    """This call's fingerprint as three words: sequence, count, and (op name, dtype, reduce op)."""
    code = (zlib.crc32(comm.op.encode()) << 16) | (_DTYPES.index(flat.dtype) << 8) | _OPS.index(op)
    return comm.seq, flat.numel(), code


def _describe(comm: OpComm, words: Sequence[int]) -> str:
    seq, count, code = words
    kind = comm.op if code >> 16 == zlib.crc32(comm.op.encode()) else "another collective"
    at = "" if seq == comm.seq else f" at call #{seq}"
    return f"{kind}({count} x {wire_dtype(_DTYPES[(code >> 8) & 0xFF])}, op={_OPS[code & 0xFF].value}){at}"


def compare_tags(comm: OpComm, tags: list[list[int]], mine: tuple[int, int, int]) -> None:
    """Raises on every rank alike when the ranks' published calls are not all the same.

    Raises:
        CollectiveMismatch: naming rank 0 and the first rank whose call differs from rank 0's (the
            same pair on every rank, whichever rank reports it).
    """
    if all(tuple(t) == mine for t in tags):
        return
    first = next(q for q, t in enumerate(tags) if t != tags[0])
    group = comm.group
    raise CollectiveMismatch(
        f"collective mismatch in group {group.channel!r}, call #{comm.seq}: rank 0 called {_describe(comm, tags[0])} but "
        f"rank {first} called {_describe(comm, tags[first])} (reported by rank {comm.rank}); every rank must call the same "
        "collectives, with the same root, size, dtype and reduce op, in the same order",
        ranks=(group.ranks[0], group.ranks[first]))
