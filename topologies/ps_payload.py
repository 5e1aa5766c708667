"""What travels between parameter-server workers and servers: tags, reply kinds, (en|de)coded shards."""

from __future__ import annotations

import torch

from commlayer.codecs import Codec, CodecContext, Encoded, from_frames, to_frames
from commlayer.topologies.comm import frame_tensor, tensor_bytes, wire_dtype
from commlayer.topologies.p2p import buf
from commlayer.transport.errors import CommError
from commlayer.transport.envelope import Message

TAG = 9
AGG, PULL = "agg", "pull"  # reply kinds: each has its own reply channel; the shard is the reply's chunk


def shard_ctx(channel: str, seed: int, n: int, dtype: torch.dtype, key: str, step: int) -> CodecContext | None:
    """The codec context of one shard, identical on the worker and the server (None: never encoded)."""
    if not dtype.is_floating_point:  # codecs take floating tensors only
        return None
    return CodecContext((n,), dtype, f"{channel}/{key}", step, seed)


def raw_frames(t: torch.Tensor) -> list:
    return [tensor_bytes(t.contiguous())] if t.numel() else []


def codec_frames(codec: Codec | None, t: torch.Tensor, ctx: CodecContext | None) -> tuple[list, dict]:
    """Frames of ``t`` (raw, or encoded with ``codec``) and the meta describing its dtype."""
    if codec is None:
        return raw_frames(t), {"dt": wire_dtype(t.dtype)}
    assert ctx is not None
    header, buffers = to_frames(codec.encode(t, ctx))
    return [header, *buffers], {"dt": wire_dtype(t.dtype)}


def encoded_of(m: Message) -> Encoded:
    """The codec payload a message carries."""
    return from_frames(buf(m.frames[0]), [buf(f) for f in m.frames[1:]])


def decode(codec: Codec | None, m: Message, dtype: torch.dtype, n: int, ctx: CodecContext | None) -> torch.Tensor:
    """The tensor a message carries (raw, or decoded with ``codec``), checked against ``n`` x ``dtype``."""
    frames = [buf(f) for f in m.frames]
    if codec is None:
        if sum(memoryview(f).nbytes for f in frames) != n * torch.empty((), dtype=dtype).element_size():
            raise CommError(f"parameter server: rank {m.header.src} sent a payload of the wrong size for {n} x {dtype}")
        return frame_tensor(frames[0], dtype).clone() if n else torch.empty(0, dtype=dtype)
    assert ctx is not None
    return codec.decode(from_frames(frames[0], frames[1:]), ctx).reshape(-1)
