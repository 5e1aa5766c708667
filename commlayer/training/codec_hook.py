"""DDP communication hook applying any codec spec over any torch.distributed backend.

Usage (like ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``)::

    from commlayer.hooks import CodecHookState, codec_hook
    state = CodecHookState.from_spec("topk:ratio=0.01+ef", process_group=None, seed=0)
    ddp_model.register_comm_hook(state, codec_hook)

How each bucket is averaged follows :func:`commlayer.codecs.aggregation_mode`:

* linear codecs (``identity``, ``fp16``, ``bf16``, ``randomk``...): ``dist.all_reduce`` of the
  compressed payload, asynchronous, decoded when it completes;
* non-linear codecs: ``dist.all_gather`` of the packed payloads, then decode + average
  (``sign:scale=none``: majority vote);
* PowerSGD: its two mean-allreduces of ``P`` and ``Q`` per bucket, over the bucket's tensors.

Error feedback (``+ef``) keeps one residual per bucket (per tensor for PowerSGD). The first
``start_iter`` iterations run a plain allreduce because DDP rebuilds its buckets after the first
iteration.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from commlayer.codecs import Codec, CodecContext, aggregation_mode, average_payloads, from_spec, pack, powersgd_allreduce, unpack

logger = logging.getLogger(__name__)


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


def _done(tensor: torch.Tensor) -> "torch.futures.Future[torch.Tensor]":
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def _allgather_bytes(blob: bytes, group: Any) -> list[bytes]:
    world = dist.get_world_size(group)
    size = torch.tensor([len(blob)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else mine[:0]
    outs = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(outs, mine, group=group)
    return [o[: int(s.item())].numpy().tobytes() for o, s in zip(outs, sizes)]


# No ``from __future__ import annotations`` here: DDP checks these annotations at registration.
def codec_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: averages ``bucket`` across ranks through ``state.codec``.

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

    if mode == "powersgd":
        grads = bucket.gradients()
        ctxs = [CodecContext(tuple(g.shape), g.dtype, f"{key}/{i}:{tuple(g.shape)}", step, state.seed) for i, g in enumerate(grads)]

        def mean(t: torch.Tensor) -> torch.Tensor:
            state.bytes_sent += t.numel() * t.element_size()
            dist.all_reduce(t, group=group)
            return t.div_(world)

        for g, out in zip(grads, powersgd_allreduce(codec, grads, ctxs, mean)):
            g.copy_(out)
        return _done(buf)

    if mode == "allreduce":
        # Divide first (like torch's fp16 hook) so a half-precision sum cannot overflow.
        enc = codec.encode(buf.div_(world), ctx)
        state.bytes_sent += enc.nbytes

        def finish(f: torch.futures.Future) -> torch.Tensor:
            return buf.copy_(codec.decode(codec.from_summable(f.value()[0], ctx), ctx))

        payload = codec.summable(enc, ctx)
        return dist.all_reduce(payload, group=group, async_op=True).get_future().then(finish)
    enc = codec.encode(buf, ctx)
    state.bytes_sent += enc.nbytes
    payloads = [unpack(b) for b in _allgather_bytes(pack(enc), group)]
    buf.copy_(average_payloads(codec, payloads, ctx, mode))
    return _done(buf)
