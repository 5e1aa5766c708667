"""Small float-vector exchanges among the ranks of a group, straight over the transport.

The adaptation layer agrees on plans by all-gathering measurements: every rank sends its vector to
every other rank (one latency, no relay through other ranks) and all ranks then hold the same
vectors in the same order. Values travel as little-endian float64 frames (no pickle).
"""

from __future__ import annotations

import array
import sys
from typing import Any, Sequence

from commlayer.transport.errors import CommError
from commlayer.transport import envelope


def _pack(values: Sequence[float]) -> bytes:
    a = array.array("d", [float(v) for v in values])
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        a.byteswap()
    return a.tobytes()


def _unpack(buf: Any) -> list[float]:
    a = array.array("d")
    a.frombytes(bytes(buf))
    if sys.byteorder != "little":  # pragma: no cover
        a.byteswap()
    return a.tolist()


def send_vector(transport: Any, ranks: Sequence[int], channel: str, seq: int, values: Sequence[float],
                op: str = "adapt", meta: dict[str, Any] | None = None) -> None:
    """Sends ``values`` to every other rank of ``ranks`` (global ranks)."""
    me = transport.rank
    frame = _pack(values)
    for r in ranks:
        if r != me:
            transport.send(r, envelope.data(op, channel, seq, me, dtype="float64", shape=(len(values),), meta=meta), [frame])


def recv_vectors(transport: Any, ranks: Sequence[int], channel: str, seq: int, mine: Sequence[float], timeout: float,
                 op: str = "adapt") -> list[list[float]]:
    """Receives the vectors :func:`send_vector` sent with ``seq``; returns them in ``ranks`` order.

    Raises:
        CommError: a peer sent a different operation or vector length (ranks disagree).
        CommTimeout: a peer did not send within ``timeout``.
    """
    out: list[list[float]] = []
    for r in ranks:
        if r == transport.rank:
            out.append([float(v) for v in mine])
            continue
        msg = transport.recv(channel, seq, 0, 0, r, timeout, f"{op} #{seq} from rank {r}")
        if msg.header.op != op:
            raise CommError(f"adaptation mismatch: rank {r} sent {msg.header.op!r} #{seq} on {channel!r} while this rank "
                            f"runs {op!r}; every rank must call the planner the same way")
        vals = _unpack(msg.frames[0].buffer if hasattr(msg.frames[0], "buffer") else msg.frames[0]) if msg.frames else []
        if len(vals) != len(mine):
            raise CommError(f"adaptation mismatch: rank {r} sent {len(vals)} values for {op!r} #{seq}, this rank {len(mine)}")
        out.append(vals)
    return out


def allgather_vector(transport: Any, ranks: Sequence[int], channel: str, seq: int, values: Sequence[float],
                     timeout: float, op: str = "adapt") -> list[list[float]]:
    """Every rank's ``values`` (same length on all ranks), in ``ranks`` order."""
    send_vector(transport, ranks, channel, seq, values, op)
    return recv_vectors(transport, ranks, channel, seq, values, timeout, op)
