"""Which aggregation a codec allows, and reference aggregation of payloads.

A topology must never sum payloads of a non-linear codec (top-k indices differ per worker, int8
scales differ...). Modes:

* ``allreduce``: payloads are summed in the compressed domain (``Codec.summable`` /
  ``sum_encoded``), e.g. by a ring; linear codecs only.
* ``allgather``: every payload reaches the aggregator(s), which decode each and average (an
  all-gather, or a parameter server that decodes, sums and re-encodes). Valid for every codec.
* ``majority_vote``: signSGD with majority vote (``sign:scale=none``).
* ``powersgd``: PowerSGD's two mean-allreduce rounds (:func:`powersgd_allreduce`).
"""

from __future__ import annotations

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded

MODES = ("allreduce", "allgather", "majority_vote", "powersgd")


def _inner(codec: Codec) -> Codec:
    return getattr(codec, "inner", codec) if codec.codec_id == "ef" else codec


def valid_aggregations(codec: Codec) -> tuple[str, ...]:
    """Valid modes for ``codec``, preferred first."""
    from commlayer.codecs.powersgd import PowerSGD
    from commlayer.codecs.sign import Sign

    inner = _inner(codec)
    if isinstance(inner, PowerSGD):
        return ("powersgd", "allgather")
    modes = ["allreduce"] if codec.linear else []
    if isinstance(inner, Sign) and inner.config.scale == "none":
        modes.append("majority_vote")
    modes.append("allgather")
    return tuple(modes)


def aggregation_mode(codec: Codec, requested: str | None = None) -> str:
    """The mode a topology should use for ``codec``.

    Args:
        codec: codec, pipeline or error-feedback wrapper.
        requested: a mode from :data:`MODES`, or None for the preferred valid one.

    Raises:
        ValueError: if ``requested`` is unknown or not valid for ``codec`` (e.g. summing a
            non-linear codec); the message says which modes are valid.
    """
    valid = valid_aggregations(codec)
    if requested is None:
        return valid[0]
    if requested not in MODES:
        raise ValueError(f"Expected an aggregation mode in {MODES}, got {requested!r}")
    if requested not in valid:
        why = " (it is not linear: payloads cannot be summed in the compressed domain)" if requested == "allreduce" else ""
        raise ValueError(f"Aggregation {requested!r} is not valid for codec {codec!r}{why}; valid: {', '.join(valid)}")
    return requested


def average_payloads(codec: Codec, payloads: list[Encoded], ctx: CodecContext, mode: str | None = None) -> torch.Tensor:
    """Reference aggregation: the mean over workers that ``mode`` defines (majority vote: its sign).

    Raises:
        ValueError: for an invalid mode, or ``powersgd`` (which needs the multi-round protocol).
    """
    mode = aggregation_mode(codec, mode)
    if not payloads:
        raise ValueError("Expected at least one payload, got none")
    if mode == "allreduce":
        return codec.decode(codec.sum_encoded(payloads, ctx), ctx) / len(payloads)
    if mode == "majority_vote":
        return _inner(codec).majority_vote(payloads, ctx)  # type: ignore[attr-defined]
    if mode == "powersgd":
        raise ValueError("Expected a one-shot mode; powersgd averages through powersgd_allreduce()")
    acc = torch.float64 if ctx.dtype == torch.float64 else torch.float32
    total = torch.zeros(ctx.shape, dtype=acc)
    for p in payloads:
        total += codec.decode(p, ctx).to(acc)
    return (total / len(payloads)).to(ctx.dtype)
