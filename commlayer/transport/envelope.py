"""Envelope constructors: the only way code outside ``commlayer.transport`` builds a message header.

Three kinds of messages, each with the fields it really has:

* :func:`collective` (``Kind.DATA``): one message of collective call ``seq`` on ``channel``, at an
  algorithm ``step`` and ``chunk``, carrying the call's fingerprint (:class:`Call`) so receivers can
  compare it with their own call;
* :func:`p2p` (``Kind.P2P``): a tagged point-to-point message, matched in order per (channel, tag);
* :func:`control` (``Kind.PING`` and friends): transport-level messages without payload semantics.

:func:`data` is a keyed message outside any collective (probes, planner exchanges): exact-key
matching like a collective, but no fingerprint.
"""

from __future__ import annotations

from typing import Any, Sequence

from commlayer.transport.mailbox import Message
from commlayer.transport.wire import Call, Header, Kind

__all__ = ["Call", "Header", "Kind", "Message", "collective", "control", "data", "p2p"]


def collective(op: str, channel: str, seq: int, src: int, call: Call | None, *, step: int = 0, chunk: int = 0,
               dtype: str = "", shape: Sequence[int] = (), nbytes: Sequence[int] = (),
               meta: dict[str, Any] | None = None) -> Header:
    """A message of collective call ``seq`` (``op``, fingerprint ``call``) from global rank ``src``."""
    return Header(kind=Kind.DATA, op=op, channel=channel, seq=int(seq), step=int(step), chunk=int(chunk), src=int(src),
                  dtype=dtype, shape=tuple(shape), nbytes=tuple(nbytes), meta=meta or {}, call=call)


def data(op: str, channel: str, seq: int, src: int, *, step: int = 0, chunk: int = 0, dtype: str = "",
         shape: Sequence[int] = (), meta: dict[str, Any] | None = None) -> Header:
    """A keyed message that belongs to no collective call (probes, planner exchanges)."""
    return collective(op, channel, seq, src, None, step=step, chunk=chunk, dtype=dtype, shape=shape, meta=meta)


def p2p(channel: str, tag: int, src: int, *, dtype: str = "", shape: Sequence[int] = (),
        meta: dict[str, Any] | None = None, op: str = "p2p") -> Header:
    """A tagged point-to-point message from global rank ``src``."""
    return Header(kind=Kind.P2P, op=op, channel=channel, seq=0, step=0, chunk=0, src=int(src), dtype=dtype,
                  shape=tuple(shape), meta=meta or {}, tag=int(tag))


def control(kind: Kind, channel: str, src: int, *, seq: int = 0, meta: dict[str, Any] | None = None) -> Header:
    """A transport control message (HELLO, BYE, PING, PONG, ABORT) without payload."""
    if kind in (Kind.DATA, Kind.P2P):
        raise ValueError(f"Expected a control kind (HELLO, BYE, PING, PONG, ABORT), got {kind.name}")
    return Header(kind=kind, op=kind.name.lower(), channel=channel, seq=int(seq), step=0, chunk=0, src=int(src),
                  meta=meta or {})
