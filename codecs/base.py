"""Codec contract: :class:`Codec`, :class:`Encoded`, :class:`CodecContext` and shared helpers.

The split follows GRACE (Xu et al., "GRACE: A Compressed Communication Framework for Distributed
Machine Learning", ICDCS 2021): a *codec* is stateless tensor math (encode/decode), the
*memory* (error feedback, momentum) is state kept per tensor key, and the *communicator*
(topology, transport) decides who sends what to whom. Only ``Encoded.buffers`` and the small
``Encoded.header`` travel; :class:`CodecContext` (shape, dtype, key, step, seed) stays local.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generator, Iterator

import numpy as np
import torch

from commlayer.codecs.config import spec_token
from commlayer.codecs.config import validate_config_types  # noqa: F401  (re-exported for codecs)

logger = logging.getLogger(__name__)

#: Elements per chunk in the quantizers: temporaries stay in cache and below the mmap threshold.
CHUNK = 1 << 18

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class CodecContext:
    """Local facts about one tensor; never sent.

    Attributes:
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (decode returns this dtype).
        key: stable name of the tensor or bucket (selects error-feedback state and seeds).
        step: training step (seeds per-step randomness).
        seed: job-wide seed shared by all ranks.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    key: str = ""
    step: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype not in DTYPE_NAMES:
            raise TypeError(f"Expected a floating dtype in {sorted(DTYPES)}, got {self.dtype}")

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(self.shape)

    @classmethod
    def for_tensor(cls, t: torch.Tensor, key: str = "", step: int = 0, seed: int = 0) -> "CodecContext":
        """Context describing ``t``."""
        return cls(tuple(t.shape), t.dtype, key, step, seed)

    def child(self, suffix: str, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> "CodecContext":
        """Context for a derived tensor (e.g. the kept values of a sparsifier)."""
        return CodecContext(shape, dtype or self.dtype, f"{self.key}/{suffix}", self.step, self.seed)


@dataclass
class Encoded:
    """What goes on the wire.

    Attributes:
        header: small msgpack-serializable dict (ints, floats, str, bytes, lists, dicts).
        buffers: contiguous byte-like objects (numpy arrays, bytes, memoryviews), sent as raw frames.
    """

    header: dict[str, Any] = field(default_factory=dict)
    buffers: list[Any] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Payload bytes: the sum of the buffer lengths (the header is not counted)."""
        return sum(memoryview(b).nbytes for b in self.buffers)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` tensors accumulate in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stable_hash(*parts: object) -> int:
    """64-bit hash of ``parts`` that is identical in every process (unlike ``hash``)."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def np_generator(ctx: CodecContext, salt: str = "") -> np.random.Generator:
    """Private numpy generator seeded from (job seed, step, tensor key); never global state."""
    return np.random.Generator(np.random.PCG64(stable_hash(ctx.seed, ctx.step, ctx.key, salt)))


def torch_generator(ctx: CodecContext, salt: str = "") -> torch.Generator:
    """Private torch generator seeded from (job seed, step, tensor key); never global state."""
    return torch.Generator().manual_seed(stable_hash(ctx.seed, ctx.step, ctx.key, salt) >> 1)


def as_array(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor (bfloat16 is viewed as uint16)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def from_buffer(buf: Any, dtype: torch.dtype, count: int, what: str) -> torch.Tensor:
    """Tensor view of a wire buffer, checking its size.

    Raises:
        ValueError: if the buffer does not hold exactly ``count`` elements of ``dtype``.
    """
    mv = memoryview(buf).cast("B")
    need = count * itemsize(dtype)
    if mv.nbytes != need:
        raise ValueError(f"Malformed payload: expected {need} bytes for {what} ({count} x {dtype}), got {mv.nbytes}")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    if mv.readonly:
        mv = memoryview(bytearray(mv))
    if dtype == torch.bfloat16:
        return torch.frombuffer(mv, dtype=torch.int16).view(torch.bfloat16)
    return torch.frombuffer(mv, dtype=dtype)


def bytes_buffer(buf: Any, nbytes: int, what: str) -> np.ndarray:
    """uint8 view of a wire buffer of exactly ``nbytes`` bytes (ValueError otherwise)."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes != nbytes:
        raise ValueError(f"Malformed payload: expected {nbytes} bytes for {what}, got {mv.nbytes}")
    return np.frombuffer(mv, dtype=np.uint8)


def check_header(header: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """Returns ``header[key]`` after checking its type (ValueError otherwise)."""
    if not isinstance(header, dict) or key not in header:
        raise ValueError(f"Malformed header for {what}: expected key {key!r}, got {header!r}")
    value = header[key]
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"Malformed header for {what}: expected {key!r} of type {kind.__name__}, got {value!r}")
    return value


def chunks(n: int, block: int = 1, size: int = CHUNK) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering ``range(n)``; every start is a multiple of ``block``."""
    size = max(block, size - size % block)
    for s in range(0, n, size):
        yield s, min(n, s + size)


@dataclass(frozen=True)
class NoConfig:
    """Configuration of a codec without options."""


class Codec(abc.ABC):
    """Stateless gradient codec (numcodecs-style configuration, GRACE-style split).

    Class attributes:
        codec_id: registry id, also the name used in specs.
        Config: frozen dataclass of the options (its fields are the spec keys).
        kind: "dense" (tensor -> payload), "sparse" (values + indices; a following dense stage
            quantizes the values), "lossless" (bytes -> bytes) or "protocol" (multi-round, e.g.
            PowerSGD).
        linear: payloads of several workers can be summed in the compressed domain.
        unbiased: E[decode(encode(x))] = x.
        needs_shared_seed: ranks must use the same (seed, step, key) to agree.
        stateful: encode updates per-key state (see ``state_dict``).
        fixed_size: ``wire_bytes`` is exact; otherwise it is an upper bound.
    """

    codec_id: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    kind: ClassVar[str] = "dense"
    linear: bool = False
    unbiased: bool = False
    needs_shared_seed: bool = False
    stateful: bool = False
    fixed_size: bool = True

    def __init__(self, config: Any = None, **options: Any) -> None:
        if config is not None and options:
            raise TypeError("Expected either a config object or keyword options, got both")
        self.config = config if config is not None else self.Config(**options)
        if not isinstance(self.config, self.Config):
            raise TypeError(f"Expected {self.Config.__name__}, got {type(self.config).__name__}")

    # --- configuration -------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """Plain-dict configuration, ``{"id": codec_id, **options}``."""
        return {"id": self.codec_id, **dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Codec":
        """Instance from :meth:`get_config` output."""
        options = {k: v for k, v in config.items() if k != "id"}
        return cls(**options)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.get_config() == self.get_config()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(repr(self.get_config()))

    def to_spec(self) -> str:
        """Spec string that :func:`commlayer.codecs.from_spec` turns back into an equal codec (non-default options only)."""
        return spec_token(self.get_config(), type(self).Config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.to_spec()!r}>"

    # --- tensor math ---------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        """Compresses ``tensor`` (of ``ctx.shape`` / ``ctx.dtype``)."""

    @abc.abstractmethod
    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        """Reconstructs a tensor of ``ctx.shape`` and ``ctx.dtype``.

        Raises:
            ValueError: on a malformed payload.
        """

    @abc.abstractmethod
    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Payload bytes for a tensor of ``numel`` elements: exact if ``fixed_size``, else an upper bound."""

    def summable(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        """Linear codecs: the payload as one 1-D tensor that workers may add elementwise.

        A topology (or ``dist.all_reduce``) sums these tensors and hands the result to
        :meth:`from_summable`; the header of a linear codec depends only on ``ctx``.

        Raises:
            TypeError: if the codec is not linear.
        """
        raise TypeError(f"Expected a linear codec, got {self!r}: its payloads cannot be summed; aggregate by all-gather")

    def from_summable(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        """Inverse of :meth:`summable` (linear codecs only)."""
        raise TypeError(f"Expected a linear codec, got {self!r}: its payloads cannot be summed; aggregate by all-gather")

    def sum_encoded(self, encoded: list[Encoded], ctx: CodecContext) -> Encoded:
        """Sums payloads in the compressed domain (linear codecs only; floats accumulate in float32/64).

        Raises:
            TypeError: if the codec is not linear.
            ValueError: if there is nothing to sum or the payloads disagree in size.
        """
        if not self.linear:
            raise TypeError(f"Expected a linear codec to sum payloads, got {self!r}; aggregate by all-gather instead")
        if not encoded:
            raise ValueError("Expected at least one payload to sum, got none")
        parts = [self.summable(e, ctx) for e in encoded]
        total = torch.zeros(parts[0].shape, dtype=acc_dtype(parts[0].dtype))
        for p in parts:
            if p.shape != total.shape:
                raise ValueError(f"Expected payloads of {tuple(total.shape)} elements, got {tuple(p.shape)}")
            total += p
        return self.from_summable(total.to(parts[0].dtype), ctx)

    # --- aggregation (how payloads of several workers combine; commlayer.codecs.aggregate) --
    def aggregations(self) -> tuple[str, ...]:
        """Valid modes, preferred first: ``allreduce`` (sum :meth:`summable`) if linear, then ``allgather``.

        A codec with an aggregation of its own adds its mode and implements :meth:`combine`
        (one-shot, over the gathered payloads) or :meth:`rounds` (a multi-round protocol).
        """
        return ("allreduce", "allgather") if self.linear else ("allgather",)

    def combine(self, mode: str, payloads: list[Encoded], ctx: CodecContext) -> torch.Tensor:
        """Aggregate of every worker's payload (rank order) for a one-shot mode of the codec's own."""
        raise ValueError(f"Expected a one-shot aggregation mode of {self!r}, got {mode!r}")

    def rounds(self, mode: str, tensors: list[torch.Tensor], ctxs: list[CodecContext],
               outer: "Codec | None" = None) -> "Generator[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None":
        """A multi-round mode as a generator (yields 1-D tensors, is sent their mean over workers, returns
        the aggregated ``tensors``), or None. ``outer``: a wrapper (error feedback) whose state to use."""
        return None

    def sparse_parts(self, encoded: Encoded, ctx: CodecContext) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """``(indices, values)`` of a sparse payload (decode = zeros with values at indices), else None."""
        return None

    # --- state (stateful codecs override) ------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (empty for stateless codecs)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        if state:
            raise ValueError(f"Expected empty state for stateless codec {self.codec_id!r}, got keys {sorted(state)}")

    def state_bytes(self) -> int:
        """Bytes of state held (memory accounting)."""
        return 0
