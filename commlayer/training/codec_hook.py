"""DDP communication hook applying any codec spec over any torch.distributed backend.

Usage (like ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``)::

    from commlayer.hooks import CodecHookState, codec_hook
    state = CodecHookState.from_spec("topk:ratio=0.01+ef", process_group=None, seed=0)
    ddp_model.register_comm_hook(state, codec_hook)

Each bucket is averaged by the codec aggregation protocol (:func:`commlayer.codecs.aggregate.aggregate`)
over :class:`TorchExchange`, whose collectives are asynchronous torch.distributed calls chained with
``Future.then`` / ``add_done_callback``; the hook itself never waits, so communication overlaps
with the rest of backward:

* linear codecs (``identity``, ``fp16``, ``bf16``, ``randomk``...): ``dist.all_reduce`` of the
  compressed payload, decoded when it completes;
* non-linear codecs: ``dist.all_gather`` of the payload sizes, then of the packed payloads, then
  decode + average (``sign:scale=none``: majority vote);
* PowerSGD: its two mean-allreduces of ``P`` and ``Q`` per bucket, over the bucket's tensors.

Modes that need several rounds launch the later rounds from completion callbacks; so that every rank
issues the collectives in the same order, such buckets run one after another (each starts when the
previous bucket's aggregate is ready). Error feedback (``+ef``) keeps one residual per bucket (per
tensor for PowerSGD). The first ``start_iter`` iterations run a plain allreduce because DDP
rebuilds its buckets after the first iteration.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from commlayer.codecs import Codec, CodecContext, Encoded, aggregation_mode, from_spec, pack, unpack
from commlayer.codecs.aggregate import aggregate, multi_round, then

logger = logging.getLogger(__name__)

Future = torch.futures.Future


@dataclass
class CodecHookState:
    """State of :func:`codec_hook` (one per DDP model).

    Attributes:
        codec: the codec (stateful ones keep per-bucket state here).
        process_group: group to communicate in (None: the default group).
        seed: job seed shared by all ranks (random-k indices, PowerSGD init, QSGD draws).
        mode: aggregation mode; None picks the preferred valid one for ``codec``.
        start_iter: iterations averaged densely before compression starts.
        iteration: completed iterations (advanced at the last bucket).
        bytes_sent: payload bytes this rank contributed (for measurements).
    """

    codec: Codec
    process_group: Any = None
    seed: int = 0
    mode: str | None = None
    start_iter: int = 1
    iteration: int = 0
    bytes_sent: int = 0
    _resolved: str = field(default="", repr=False)
    _tail: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._resolved = aggregation_mode(self.codec, self.mode)

    @classmethod
    def from_spec(cls, spec: str, process_group: Any = None, seed: int = 0, **kwargs: Any) -> "CodecHookState":
        """State for a codec spec string (see docs/codecs.md)."""
        return cls(from_spec(spec), process_group, seed, **kwargs)

    @property
    def resolved_mode(self) -> str:
        """The aggregation mode in use."""
        return self._resolved

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: iteration and the codec's state (EF residuals, warm starts)."""
        return {"iteration": self.iteration, "codec": self.codec.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.codec.load_state_dict(state["codec"])


def _then_future(fut: Future, fn: Callable[[Any], Future], need_value: bool = True) -> Future:
    """A future of the future ``fn(fut.value())`` returns (``then`` would nest futures).

    Errors propagate; with ``need_value=False``, ``fn(None)`` runs once ``fut`` is done however it ended.
    """
    out: Future = torch.futures.Future()

    def relay(f: Future) -> None:
        try:
            out.set_result(f.value())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's future
            out.set_exception(exc)

    def start(f: Future) -> None:
        try:
            nxt = fn(f.value() if need_value else None)
        except BaseException as exc:  # noqa: BLE001
            out.set_exception(exc)
            return
        nxt.add_done_callback(relay)

    fut.add_done_callback(start)
    return out


class TorchExchange:
    """The aggregation protocol's :class:`~commlayer.codecs.aggregate.Exchange` over torch.distributed.

    Every method issues asynchronous collectives and returns a future at once.

    Args:
        group: process group (None: the default group).
        state: the hook state whose ``bytes_sent`` counts the payload bytes (optional).
    """

    def __init__(self, group: Any = None, state: CodecHookState | None = None) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self._state = state

    def _count(self, nbytes: int) -> None:
        if self._state is not None:
            self._state.bytes_sent += nbytes

    def allreduce(self, tensor: torch.Tensor) -> Future:
        self._count(tensor.numel() * tensor.element_size())
        fut = dist.all_reduce(tensor, group=self.group, async_op=True).get_future()
        return then(fut, lambda v: v[0])  # type: ignore[index]

    def allgather(self, encoded: Encoded) -> Future:
        self._count(encoded.nbytes)
        blob = pack(encoded)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        first = dist.all_gather(sizes, torch.tensor([len(blob)], dtype=torch.int64), group=self.group, async_op=True).get_future()

        def payloads(_: Any) -> Future:
            longest = int(max(int(s.item()) for s in sizes))
            mine = torch.zeros(longest, dtype=torch.uint8)
            if blob:
                mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            outs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)]
            fut = dist.all_gather(outs, mine, group=self.group, async_op=True).get_future()
            return then(fut, lambda _v: [unpack(o[: int(s.item())].numpy().tobytes()) for o, s in zip(outs, sizes)])

        return _then_future(first, payloads)


# No ``from __future__ import annotations`` here: DDP checks these annotations at registration.
def codec_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: averages ``bucket`` across ranks through ``state.codec``; never blocks.

    Args:
        state: a :class:`CodecHookState`.
        bucket: the DDP gradient bucket.

    Returns:
        A future holding the averaged flat bucket.
    """
    group = state.process_group
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    step = state.iteration
    if bucket.is_last():
        state.iteration += 1
    if step < state.start_iter:
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))
    key = f"b{bucket.index()}:{buf.numel()}"
    ctx = CodecContext(tuple(buf.shape), buf.dtype, key, step, state.seed)
    codec, mode = state.codec, state.resolved_mode
    parts = None
    if multi_round(codec, mode):  # shape-aware multi-round protocol (PowerSGD): per gradient
        grads = bucket.gradients()
        parts = [(g, CodecContext(tuple(g.shape), g.dtype, f"{key}/{i}:{tuple(g.shape)}", step, state.seed)) for i, g in enumerate(grads)]
    exchange = TorchExchange(group, state)

    def start(_: Any = None) -> Future:
        return aggregate(codec, buf, ctx, exchange, mode, average=True, parts=parts)

    if mode == "allreduce":  # one collective, issued here in bucket order
        return start()
    # Later rounds are issued from callbacks: start this bucket once the previous one is done, so
    # the order of collectives is the same on every rank.
    prev = state._tail
    fut = start() if prev is None or prev.done() else _then_future(prev, start, need_value=False)
    state._tail = fut
    return fut
