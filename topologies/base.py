"""The one interface every topology implements, and its two exact collectives (ring, tree).

Every topology averages or reduces a tensor across the ranks of a :class:`~commlayer.topologies.World`
and declares what it guarantees::

    out = topo.allreduce(x, op="sum", codec=None)   # new tensor (numpy in -> numpy out)
    out = topo.average(x, codec="fp16")
    topo.guarantee(codec)                           # Guarantee(exact=..., bound="...")

* exact topologies (ring, tree, synchronous parameter server) without a codec return the
  reduction over all ranks (floating sums up to summation order; bitwise equal across ranks);
* with a codec, the result is the codec's reference aggregation
  (:func:`commlayer.codecs.average_payloads`) of the ranks' payloads, up to float summation order;
* gossip is approximate: see :meth:`Gossip.guarantee`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from commlayer.codecs import Codec, CodecContext, from_spec
from commlayer.topologies.codec_allreduce import codec_allreduce
from commlayer.topologies.comm import Group
from commlayer.topologies.dense import allreduce as dense_allreduce
from commlayer.topologies.reduce_ops import ReduceOp, check_op, finalize_
from commlayer.topologies.ring import DEFAULT_CHUNK_BYTES
from commlayer.topologies.world_view import WorldView


@dataclass(frozen=True)
class Guarantee:
    """What a topology promises for one call.

    Attributes:
        exact: True if the result is the exact reduction (floating point: up to summation order).
        bound: the documented approximation when not exact.
    """

    exact: bool
    bound: str = ""


def to_op(op: "str | ReduceOp") -> ReduceOp:
    if isinstance(op, ReduceOp):
        return op
    try:
        return ReduceOp(str(op).lower())
    except ValueError:
        raise ValueError(f"Expected op in {[o.value for o in ReduceOp]}, got {op!r}") from None


def as_flat(tensor: Any) -> tuple[torch.Tensor, Any]:
    """A private contiguous 1-D torch copy of ``tensor`` and a function mapping results back to its type/shape."""
    if isinstance(tensor, np.ndarray):
        shape = tensor.shape
        flat = torch.from_numpy(np.ascontiguousarray(tensor).reshape(-1).copy())
        return flat, lambda t: t.reshape(shape).numpy()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"Expected a torch tensor or numpy array, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"Expected a CPU tensor, got device {tensor.device}")
    shape = tensor.shape
    return tensor.detach().reshape(-1).clone().contiguous(), lambda t: t.reshape(shape)


class Topology(abc.ABC):
    """Common interface: ``allreduce(tensor, op, codec)``, ``average``, ``guarantee``, ``bytes_sent``.

    Every rank of the topology must make the same calls in the same order.
    """

    name: str = ""

    def __init__(self, world: WorldView, group: Group) -> None:
        self.world = world
        self.group = group
        self.rank = group.rank
        self.size = group.size
        self._codecs: dict[str, Codec] = {}
        self._calls = 0

    def codec(self, codec: "str | Codec | None") -> Codec | None:
        """Resolves a spec (cached, so stateful codecs keep their state across calls) or instance."""
        if codec is None or codec == "" or codec == "none":
            return None
        if isinstance(codec, Codec):
            return codec
        if codec not in self._codecs:
            self._codecs[codec] = from_spec(codec)
        return self._codecs[codec]

    def context(self, flat: torch.Tensor, key: str = "") -> CodecContext:
        self._calls += 1
        return CodecContext((flat.numel(),), flat.dtype, key or f"{self.group.channel}/{flat.numel()}", self._calls, self.world.seed)

    def allreduce(self, tensor: Any, op: "str | ReduceOp" = "sum", codec: "str | Codec | None" = None, **kwargs: Any) -> Any:
        """Reduction of ``tensor`` over all ranks, as a new tensor of the same type and shape.

        Args:
            tensor: torch tensor (CPU) or numpy array; left unchanged.
            op: "sum", "avg", "min", "max", "product", "band", "bor", "bxor" (codecs: sum/avg only).
            codec: codec spec or instance (None: exact).
        """
        flat, back = as_flat(tensor)
        op = to_op(op)
        c = self.codec(codec)
        if c is not None:
            if op not in (ReduceOp.SUM, ReduceOp.AVG):
                raise ValueError(f"Expected op sum or avg with a codec, got {op.value}")
            if not flat.dtype.is_floating_point:
                raise TypeError(f"Expected a floating tensor with a codec, got {flat.dtype}")
        else:
            check_op(op, flat.dtype)
        return back(self._allreduce(flat, op, c, **kwargs))

    def average(self, tensor: Any, codec: "str | Codec | None" = None, **kwargs: Any) -> Any:
        """Mean over ranks (``allreduce(op="avg")``)."""
        return self.allreduce(tensor, "avg", codec, **kwargs)

    @abc.abstractmethod
    def _allreduce(self, flat: torch.Tensor, op: ReduceOp, codec: Codec | None, **kwargs: Any) -> torch.Tensor:
        """Reduces the private 1-D ``flat`` (may work in place) and returns the result."""

    def guarantee(self, codec: "str | Codec | None" = None) -> Guarantee:
        if self.codec(codec) is None:
            return Guarantee(True, "exact (floating point: up to summation order; identical on every rank)")
        return Guarantee(False, "the codec's reference aggregation (commlayer.codecs.average_payloads) of every rank's payload")

    def bytes_sent(self) -> int:
        """Payload bytes this process has sent over its transport so far (all topologies of the world)."""
        return sum(s["bytes_sent"] for s in self.world.transport.peer_stats().values())

    def close(self) -> None:
        """Frees what the topology holds (nothing for collectives)."""


class Collective(Topology):
    """Ring (``algo="ring"``) or tree / recursive doubling (``algo="tree"``) all-reduce, exact or through a codec.

    Args:
        algo: "ring", "tree" or "auto" (by size, like the zmq backend).
        order: ring order (permutation of ranks).
        chunk_bytes: ring pipeline chunk.
    """

    def __init__(self, world: WorldView, group: Group, algo: str = "ring", order: Sequence[int] | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__(world, group)
        self.algo, self.order, self.chunk_bytes = algo, order, chunk_bytes
        self.name = algo

    def _allreduce(self, flat: torch.Tensor, op: ReduceOp, codec: Codec | None, mode: str | None = None) -> torch.Tensor:
        comm = self.group.op("allreduce" if codec is None else "codec_allreduce")
        if codec is None:
            dense_allreduce(comm, flat, op, self.algo, self.order, self.chunk_bytes)
            finalize_(flat, op, comm.size)
        else:
            codec_allreduce(comm, flat, codec, self.context(flat), self.algo, op == ReduceOp.AVG, mode, self.order, self.chunk_bytes)
        return flat
