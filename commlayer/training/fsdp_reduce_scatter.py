"""Compressed gradient reduce-scatter for FSDP2 (``FSDPModule.set_custom_reduce_scatter``).

FSDP2 reduce-scatters one flat gradient buffer per parameter group: block ``r`` of the buffer is
rank r's shard. This comm sends every block but one's own through a ``commlayer.codecs`` codec
(fp16, bf16, int8, top-k, ... with optional error feedback) and sums what arrives in float32:

1. ``blocks[r]`` is encoded with the context key ``"<name>/shard<r>"``: with ``+ef`` each rank
   keeps one residual per destination shard (error feedback per shard);
2. payload sizes, then payloads, travel in two ``all_to_all_single`` calls (any backend that has
   it: ``zmq``, gloo);
3. the output is this rank's own block (exact) plus the decoded blocks of the peers, then AVG's
   division or PREMUL_SUM's factor, as FSDP asked.

Blocks smaller than ``min_numel``, non-float buffers and ops other than SUM/AVG/PREMUL_SUM take the
exact ``reduce_scatter_tensor``. The call is synchronous (FSDP2 calls it without ``async_op`` and
reads the output right after). Use one instance per FSDP module (:func:`install` does), so
residuals never mix between parameter groups.

Usage::

    from commlayer.training.fsdp_reduce_scatter import install
    comms = install(model, "topk:ratio=0.05+ef")   # after fully_shard(...)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from commlayer.codecs import Codec, CodecContext, from_spec, pack, unpack

logger = logging.getLogger(__name__)


@dataclass
class ReduceScatterStats:
    """Bytes this rank sent: as encoded, and as the exact reduce-scatter would have sent them."""

    calls: int = 0
    exact_calls: int = 0
    wire_bytes: int = 0
    dense_bytes: int = 0


def _kind(op: object) -> tuple[str, float | None]:
    """("sum" | "avg" | "other", premul factor)."""
    red = op.op if hasattr(op, "op") else op  # a ReduceOp object or its RedOpType
    if red == dist.ReduceOp.RedOpType.SUM:  # type: ignore[attr-defined]
        return "sum", None
    if red == dist.ReduceOp.RedOpType.AVG:  # type: ignore[attr-defined]
        return "avg", None
    if red == dist.ReduceOp.RedOpType.PREMUL_SUM:  # type: ignore[attr-defined]
        f = op.factor  # type: ignore[union-attr,attr-defined]
        return "sum", float(f.item() if isinstance(f, torch.Tensor) else f)
    return "other", None


class CompressedReduceScatter(ReduceScatter):
    """A ``ReduceScatter`` comm for FSDP2 that compresses every block it sends.

    Args:
        codec: a codec spec (``"bf16"``, ``"int8"``, ``"topk:ratio=0.05+ef"``, ...) or a Codec.
        name: prefix of the per-shard codec keys (distinct per FSDP module).
        min_numel: blocks of fewer elements go exact.
        seed: job seed for codecs with shared randomness.
    """

    def __init__(self, codec: str | Codec, name: str = "fsdp", min_numel: int = 1024, seed: int = 0) -> None:
        self.codec = from_spec(codec) if isinstance(codec, str) else codec
        if self.codec.kind == "protocol":
            raise ValueError(f"Expected a one-shot codec (dense, sparse or lossless), got {self.codec!r}: "
                             "multi-round protocols such as PowerSGD need an all-reduce, not a reduce-scatter")
        self.name = name
        self.min_numel = min_numel
        self.seed = seed
        self.step = 0
        self.stats = ReduceScatterStats()

    def allocate(self, size: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:  # type: ignore[override]
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,  # type: ignore[override]
                 op: object, async_op: bool = False) -> None:
        p, me = group.size(), group.rank()
        kind, factor = _kind(op)
        if input_tensor.numel() != output_tensor.numel() * p:
            raise ValueError(f"{self.name}: expected an input of {output_tensor.numel() * p} elements "
                             f"(output {output_tensor.numel()} x {p} ranks), got {input_tensor.numel()}")
        if (kind == "other" or not input_tensor.dtype.is_floating_point or output_tensor.numel() < self.min_numel
                or input_tensor.device.type != "cpu"):
            self.stats.exact_calls += 1
            dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)  # type: ignore[arg-type]
            return None
        blocks = input_tensor.reshape(p, -1)
        if factor is not None:
            blocks = blocks * factor
        n = blocks.shape[1]
        step = self.step
        self.step += 1
        blobs = [b"" if r == me else pack(self.codec.encode(blocks[r].contiguous(), self._ctx(r, n, blocks.dtype, step)))
                 for r in range(p)]
        send_sizes = torch.tensor([len(b) for b in blobs], dtype=torch.int64)
        recv_sizes = torch.empty(p, dtype=torch.int64)
        dist.all_to_all_single(recv_sizes, send_sizes, group=group)
        sent = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if sum(map(len, blobs)) else torch.empty(0, dtype=torch.uint8)
        recv = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8)
        dist.all_to_all_single(recv, sent, recv_sizes.tolist(), send_sizes.tolist(), group=group)
        acc = blocks[me].to(torch.float64 if blocks.dtype == torch.float64 else torch.float32)
        off = 0
        for r, size in enumerate(recv_sizes.tolist()):
            if r != me:
                enc = unpack(memoryview(recv[off:off + size].numpy()))  # type: ignore[arg-type]
                acc = acc + self.codec.decode(enc, self._ctx(me, n, blocks.dtype, step)).reshape(-1).to(acc.dtype)
            off += size
        if kind == "avg":
            acc = acc / p
        output_tensor.copy_(acc.view_as(output_tensor))
        self.stats.calls += 1
        self.stats.wire_bytes += int(send_sizes.sum())
        self.stats.dense_bytes += (p - 1) * n * blocks.element_size()
        return None

    def _ctx(self, shard: int, n: int, dtype: torch.dtype, step: int) -> CodecContext:
        return CodecContext(shape=(n,), dtype=dtype, key=f"{self.name}/shard{shard}", step=step, seed=self.seed)


def install(model: torch.nn.Module, codec: str, min_numel: int = 1024, seed: int = 0) -> dict[str, CompressedReduceScatter]:
    """Gives every FSDP2 module in ``model`` its own :class:`CompressedReduceScatter`.

    Returns:
        The comms by module name (``""`` for the root), e.g. to read their ``stats``.
    """
    from torch.distributed.fsdp import FSDPModule

    comms: dict[str, CompressedReduceScatter] = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            comm = CompressedReduceScatter(codec, name=name or "root", min_numel=min_numel, seed=seed)
            module.set_custom_reduce_scatter(comm)
            comms[name] = comm
    if not comms:
        raise ValueError("Expected a model with fully_shard() applied, found no FSDPModule")
    return comms
