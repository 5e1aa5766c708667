"""How the payloads of several workers are combined: valid modes, and the one aggregation protocol.

A topology must never sum payloads of a non-linear codec (top-k indices differ per worker, int8
scales differ...). Each codec declares its valid modes (:meth:`Codec.aggregations`, preferred
first):

* ``allreduce``: payloads are summed in the compressed domain (``Codec.summable`` /
  ``sum_encoded``), e.g. by a ring; linear codecs only.
* ``allgather``: every payload reaches the aggregator(s), which decode each and sum (an
  all-gather, or a parameter server that decodes, sums and re-encodes). Valid for every codec.
  Sparse payloads are added into one buffer with ``index_add_`` (no dense decode per worker).
* a codec's own mode: one-shot over the gathered payloads (``Codec.combine``, e.g. signSGD's
  ``majority_vote``) or multi-round (``Codec.rounds``, e.g. PowerSGD's two mean all-reduces).

:func:`aggregate` runs the protocol over an :class:`Exchange`, the small interface saying how
payloads meet: the topologies' communicator (``commlayer.topologies.codec_allreduce``, blocking,
its futures come back completed), torch.distributed (``commlayer.training.codec_hook``: futures
chained with ``then``, nothing blocks in a DDP hook) and the parameter server, whose server
thread runs the gathered half (:func:`combine`) on the payloads its workers pushed.
"""

from __future__ import annotations

from typing import Callable, Generator, Protocol

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, acc_dtype

MODES = ("allreduce", "allgather", "majority_vote", "powersgd")
__all__ = ["MODES", "Exchange", "acc_dtype", "aggregate", "aggregation_mode", "average_payloads", "combine", "done", "drive", "gathered_mode",
           "multi_round", "sum_decoded", "then", "valid_aggregations"]

Future = torch.futures.Future


def valid_aggregations(codec: Codec) -> tuple[str, ...]:
    """Valid modes for ``codec``, preferred first (declared by the codec)."""
    return tuple(codec.aggregations())


def aggregation_mode(codec: Codec, requested: str | None = None) -> str:
    """The mode a topology should use for ``codec``.

    Args:
        codec: codec, pipeline or error-feedback wrapper.
        requested: a mode from :data:`MODES` (or one the codec declares), or None for the preferred valid one.

    Raises:
        ValueError: if ``requested`` is unknown or not valid for ``codec`` (e.g. summing a
            non-linear codec); the message says which modes are valid.
    """
    valid = valid_aggregations(codec)
    if requested is None:
        return valid[0]
    if requested not in MODES and requested not in valid:
        raise ValueError(f"Expected an aggregation mode in {MODES}, got {requested!r}")
    if requested not in valid:
        why = " (it is not linear: payloads cannot be summed in the compressed domain)" if requested == "allreduce" else ""
        raise ValueError(f"Aggregation {requested!r} is not valid for codec {codec!r}{why}; valid: {', '.join(valid)}")
    return requested


def multi_round(codec: Codec, mode: str) -> bool:
    """True if ``mode`` is a multi-round protocol of ``codec`` (it needs an all-reduce, not payloads)."""
    gen = codec.rounds(mode, [], [])
    if gen is None:
        return False
    gen.close()  # never started: nothing ran
    return True


def gathered_mode(codec: Codec) -> str:
    """The codec's preferred mode among those that combine gathered payloads (a server holding every
    worker's payload): its own one-shot mode (majority vote), else ``allgather``."""
    for mode in valid_aggregations(codec):
        if mode != "allreduce" and not multi_round(codec, mode):
            return mode
    return "allgather"


def sum_decoded(codec: Codec, payloads: list[Encoded], ctx: CodecContext) -> torch.Tensor:
    """Sum of the decoded payloads (flat, in :func:`acc_dtype`), added in list order.

    Sparse payloads (:meth:`Codec.sparse_parts`) are added with ``index_add_`` into the one buffer:
    the same additions, in the same order, as summing their dense decodes.
    """
    acc = acc_dtype(ctx.dtype)
    total = torch.zeros(ctx.numel, dtype=acc)
    for e in payloads:
        parts = codec.sparse_parts(e, ctx)
        if parts is None:
            total += codec.decode(e, ctx).reshape(-1).to(acc)
        else:
            idx, values = parts
            total.index_add_(0, idx, values.to(acc))
    return total


def combine(codec: Codec, mode: str, payloads: list[Encoded], ctx: CodecContext, average: bool) -> torch.Tensor:
    """The gathered half of the protocol: every worker's payload (rank order) -> the aggregate.

    ``allgather`` sums the decoded payloads (divided by their number if ``average``), in the
    accumulation dtype; a codec's own one-shot mode returns ``codec.combine`` (majority vote: the
    vote, for either ``average``). Flat result of ``ctx.numel`` elements.
    """
    if not payloads:
        raise ValueError("Expected at least one payload, got none")
    if mode == "allgather":
        total = sum_decoded(codec, payloads, ctx)
        return total.div_(len(payloads)) if average else total
    if mode == "allreduce" or multi_round(codec, mode):
        raise ValueError(f"Expected a one-shot gathered mode, got {mode!r} (it needs an all-reduce: use aggregate())")
    return codec.combine(mode, payloads, ctx).reshape(-1)


def average_payloads(codec: Codec, payloads: list[Encoded], ctx: CodecContext, mode: str | None = None) -> torch.Tensor:
    """Reference aggregation: the mean over workers that ``mode`` defines (majority vote: its sign).

    Written with dense decodes on purpose (the reference the tests hold :func:`aggregate` to).

    Raises:
        ValueError: for an invalid mode, or a multi-round mode (``powersgd``).
    """
    mode = aggregation_mode(codec, mode)
    if not payloads:
        raise ValueError("Expected at least one payload, got none")
    if mode == "allreduce":
        return codec.decode(codec.sum_encoded(payloads, ctx), ctx) / len(payloads)
    if mode == "allgather":
        total = torch.zeros(ctx.shape, dtype=acc_dtype(ctx.dtype))
        for p in payloads:
            total += codec.decode(p, ctx).to(total.dtype)
        return (total / len(payloads)).to(ctx.dtype)
    if multi_round(codec, mode):
        raise ValueError(f"Expected a one-shot mode; {mode} averages through its rounds (aggregate() or powersgd_allreduce())")
    return codec.combine(mode, payloads, ctx).to(ctx.dtype)


class Exchange(Protocol):
    """How the payloads of one aggregation meet (every rank of the group calls in the same order).

    Attributes:
        size: number of ranks.
    """

    size: int

    def allreduce(self, tensor: torch.Tensor) -> Future:
        """Future of the element-wise sum over ranks of the 1-D ``tensor`` (which it may overwrite)."""
        ...

    def allgather(self, encoded: Encoded) -> Future:
        """Future of every rank's payload (a list of :class:`Encoded`, indexed by rank)."""
        ...


def done(value: object) -> Future:
    """A completed future holding ``value`` (for blocking exchanges)."""
    fut: Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def then(fut: Future, fn: Callable[[object], object]) -> Future:
    """A future of ``fn(fut.value())``. Unlike ``Future.then``, an error keeps its type (a ``CommError``
    stays a ``CommError``, not a ``RuntimeError`` wrapping its text)."""
    out: Future = torch.futures.Future()

    def call(f: Future) -> None:
        try:
            out.set_result(fn(f.value()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
            out.set_exception(exc)

    fut.add_done_callback(call)
    return out


def drive(gen: Generator[torch.Tensor, torch.Tensor, object], exchange: Exchange) -> Future:
    """Runs a multi-round protocol (:meth:`Codec.rounds`): each yielded tensor's mean over ranks is sent back.

    Never blocks: each round is launched from the completion callback of the previous one, and the
    returned future completes with the generator's return value (or its exception).
    """
    result: Future = torch.futures.Future()
    p = exchange.size

    def advance(value: torch.Tensor | None, first: bool = False) -> None:
        try:
            t = next(gen) if first else gen.send(value)  # type: ignore[arg-type]
        except StopIteration as stop:
            result.set_result(stop.value)
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
            result.set_exception(exc)
            return

        def on_sum(f: Future) -> None:
            try:
                mean = f.value().div_(p)
            except BaseException as exc:  # noqa: BLE001
                result.set_exception(exc)
                return
            advance(mean)

        try:
            fut = exchange.allreduce(t.contiguous().clone())
        except BaseException as exc:  # noqa: BLE001 - a blocking exchange fails right here
            result.set_exception(exc)
            return
        fut.add_done_callback(on_sum)

    advance(None, first=True)
    return result


def aggregate(codec: Codec, flat: torch.Tensor, ctx: CodecContext, exchange: Exchange, mode: str | None = None,
              average: bool = True, parts: list[tuple[torch.Tensor, CodecContext]] | None = None) -> Future:
    """The aggregation protocol: ``flat`` becomes the mean (``average``) or sum over ranks, through ``codec``.

    Args:
        codec: codec, pipeline or error-feedback wrapper (stateful ones keep state per ``ctx.key``).
        flat: this rank's 1-D contiguous floating tensor, described by ``ctx`` (may be N-D shaped).
        ctx: its context (every rank passes equal shape/dtype/key/step/seed).
        exchange: how payloads meet.
        mode: aggregation mode (None: the codec's preferred one).
        average: mean (True) or sum (False); a vote mode returns the vote either way.
        parts: for multi-round modes, ``(view, ctx)`` pieces of ``flat`` to compress separately
            (PowerSGD per gradient of a DDP bucket); default the whole ``flat`` in ``ctx.shape``.

    Returns:
        A future completing with ``flat`` once it holds the aggregate (written in place).
    """
    mode = aggregation_mode(codec, mode)
    p = exchange.size
    if mode == "allreduce":
        if average and p > 1:
            flat.div_(p)
        payload = codec.summable(codec.encode(flat.view(ctx.shape), ctx), ctx).reshape(-1).contiguous().clone()
        return then(exchange.allreduce(payload),
                      lambda s: flat.copy_(codec.decode(codec.from_summable(s, ctx), ctx).reshape(-1)))  # type: ignore[arg-type]
    pieces = parts if parts is not None else [(flat.view(ctx.shape), ctx)]
    gen = codec.rounds(mode, [t for t, _ in pieces], [c for _, c in pieces])
    if gen is not None:
        def finish(outs: object) -> torch.Tensor:
            for (t, _), out in zip(pieces, outs):  # type: ignore[call-overload]
                t.copy_(out.reshape(t.shape))
            return flat if average else flat.mul_(p)

        return then(drive(gen, exchange), finish)
    enc = codec.encode(flat.view(ctx.shape), ctx)
    return then(exchange.allgather(enc), lambda payloads: flat.copy_(combine(codec, mode, payloads, ctx, average)))  # type: ignore[arg-type]
