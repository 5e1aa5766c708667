"""PowerSGD: rank-r compression by one step of power iteration (Vogels et al., NeurIPS 2019).

For a gradient reshaped to a matrix ``M`` (n x m), with ``Q`` (m x r) warm-started from the
previous step (random normal from the shared seed at first)::

    P = M Q;  P <- allreduce_mean(P);  P^ = orthogonalize(P)   # Gram-Schmidt
    Q = M^T P^;  Q <- allreduce_mean(Q);  M~ = P^ Q^T

Because ``P`` and ``Q`` are linear in ``M`` the two means equal the compression of the mean
gradient (Alg. 1 of the paper). A 1-D tensor of at least ``flat_min`` elements (a flat DDP bucket,
as the zmq backend sees it) is viewed as a square-ish ``n x m`` matrix, ``n = ceil(sqrt(numel))``,
zero-padded at the end, as torch's ``batched_powerSGD_hook`` does. Tensors that would not shrink
(short vectors, ``(n+m) r >= n m``) ride uncompressed in the ``P`` round; :meth:`PowerSGD.why_not`
says why. With error feedback (``powersgd:rank=2+ef``, as in the paper's
Alg. 2) the residual is ``M - M~`` with the aggregated ``M~``, as in the reference implementation.

Drive it with :func:`powersgd_allreduce` (any ``allreduce(tensor) -> mean`` callable), or step
by step with :meth:`PowerSGD.compute_p`, :meth:`PowerSGD.after_p_allreduce`,
:meth:`PowerSGD.compute_q` and :meth:`PowerSGD.decompress`. As a plain codec (``encode``) it
sends one worker's own ``P^, Q``; such payloads are not linear and must be all-gathered.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Generator

import torch

from commlayer.codecs.base import Codec, CodecContext, Encoded, acc_dtype, as_array, from_buffer, torch_generator, validate_config_types
from commlayer.codecs.registry import register_codec


@dataclass(frozen=True)
class PowerSGDConfig:
    """Options of :class:`PowerSGD`.

    Attributes:
        rank: ``r``, the rank of the approximation.
        warm_start: reuse the previous step's ``Q`` (the paper's default).
        flat_min: 1-D tensors of at least this many elements are compressed as a square-ish matrix.
    """

    rank: int = 2
    warm_start: bool = True
    flat_min: int = 1024

    def __post_init__(self) -> None:
        validate_config_types(self)
        if self.rank < 1:
            raise ValueError(f"Expected rank >= 1, got {self.rank}")
        if self.flat_min < 4:
            raise ValueError(f"Expected flat_min >= 4, got {self.flat_min}")


def orthogonalize(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``p`` (in place; returns ``p``).

    Each projection is applied twice ("twice is enough", Giraud et al. 2005): with one pass, a column
    that is (nearly) a combination of earlier ones keeps rounding noise along them, and after
    normalisation P^ is not orthonormal (a rank-1 gradient at rank 2 came back 68 % off).
    """
    for i in range(p.shape[1]):
        col = p[:, i : i + 1]
        col /= torch.linalg.vector_norm(col) + eps
        if i + 1 < p.shape[1]:
            rest = p[:, i + 1 :]
            rest -= col @ (col.T @ rest)
            rest -= col @ (col.T @ rest)
    return p


@register_codec
class PowerSGD(Codec):
    """Rank-r power-iteration compressor with warm start (state: ``Q`` per key)."""

    codec_id = "powersgd"
    Config = PowerSGDConfig
    kind = "protocol"
    stateful = True
    needs_shared_seed = True
    fixed_size = False  # wire_bytes(numel) cannot see the shape: see matrix_wire_bytes

    def __init__(self, config: PowerSGDConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.q: dict[str, torch.Tensor] = {}

    def matrix_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """``(n, m, r)`` if a tensor of ``shape`` is worth compressing, else None.

        N-D tensors are ``shape[0] x prod(shape[1:])``; 1-D tensors of at least ``flat_min``
        elements ``ceil(sqrt(numel)) x ceil(numel / n)`` (zero-padded, see :meth:`as_matrix`).
        """
        if len(shape) < 2:
            numel = shape[0] if shape else 1
            if numel < self.config.flat_min:
                return None
            n = math.isqrt(numel - 1) + 1
            m = -(-numel // n)
        else:
            n, m = shape[0], math.prod(shape[1:])
        r = min(self.config.rank, n, m)
        return (n, m, r) if (n + m) * r < n * m else None

    def why_not(self, shape: tuple[int, ...]) -> str:
        """Why a tensor of ``shape`` is sent uncompressed ("" if it is compressed)."""
        if self.matrix_shape(tuple(shape)) is not None:
            return ""
        numel = math.prod(shape)
        if len(shape) < 2 and numel < self.config.flat_min:
            return f"a vector of {numel} elements is below flat_min={self.config.flat_min}"
        return f"rank {self.config.rank} factors of a tensor of shape {tuple(shape)} would not be smaller than the tensor"

    def as_matrix(self, tensor: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        """``tensor`` as the ``n x m`` matrix PowerSGD compresses (1-D tensors zero-padded at the end)."""
        n, m, _ = self.matrix_shape(ctx.shape) or (0, 0, 0)
        if not n:
            raise ValueError(f"Expected a compressible matrix shape, got {ctx.shape}")
        flat = tensor.reshape(-1)
        if flat.numel() < n * m:
            flat = torch.cat([flat, flat.new_zeros(n * m - flat.numel())])
        return flat.view(n, m)

    def from_matrix(self, matrix: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        """The inverse of :meth:`as_matrix`: drops the padding, restores ``ctx.shape`` and ``ctx.dtype``."""
        return matrix.reshape(-1)[: ctx.numel].to(ctx.dtype).reshape(ctx.shape)

    def _acc(self, ctx: CodecContext) -> torch.dtype:
        return acc_dtype(ctx.dtype)

    def aggregations(self) -> tuple[str, ...]:
        """PowerSGD's own two-round protocol first; ``allgather`` of each worker's ``P^, Q`` also works."""
        return ("powersgd", "allgather")

    def rounds(self, mode: str, tensors: list[torch.Tensor], ctxs: list[CodecContext],
               outer: Codec | None = None) -> Generator[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None:
        return powersgd_rounds(outer or self, tensors, ctxs) if mode == "powersgd" else None

    # --- protocol, one matrix at a time ---
    def compute_p(self, matrix: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        """``P = M Q`` (n x r), with the warm-started or freshly seeded ``Q``."""
        n, m, r = self.matrix_shape(ctx.shape) or (0, 0, 0)
        if not r:
            raise ValueError(f"Expected a compressible matrix shape, got {ctx.shape}")
        q = self.q.get(ctx.key) if self.config.warm_start else None
        if q is None or q.shape != (m, r):
            q = torch.randn(m, r, generator=torch_generator(ctx, "powersgd"), dtype=self._acc(ctx))
        return self.as_matrix(matrix, ctx).to(q.dtype) @ q

    def after_p_allreduce(self, p: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        """Orthogonalizes the averaged ``P`` (in place)."""
        return orthogonalize(p)

    def compute_q(self, matrix: torch.Tensor, p_hat: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        """``Q = M^T P^`` (m x r)."""
        return self.as_matrix(matrix, ctx).to(p_hat.dtype).T @ p_hat

    def decompress(self, p_hat: torch.Tensor, q: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        """``P^ Q^T`` in ``ctx.shape`` / ``ctx.dtype``; keeps the (averaged) ``Q`` for warm start."""
        if self.config.warm_start:
            self.q[ctx.key] = q.clone()
        return self.from_matrix(p_hat @ q.T, ctx)

    # --- single-worker codec view ---
    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        if self.matrix_shape(ctx.shape) is None:
            return Encoded({}, [as_array(tensor.detach().reshape(-1).to(torch.float32))])
        p = self.after_p_allreduce(self.compute_p(tensor, ctx), ctx)
        q = self.compute_q(tensor, p, ctx)
        if self.config.warm_start:
            self.q[ctx.key] = q.clone()
        return Encoded({}, [as_array(p.to(torch.float32)), as_array(q.to(torch.float32))])

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        shape = self.matrix_shape(ctx.shape)
        if shape is None:
            if len(encoded.buffers) != 1:
                raise ValueError(f"Malformed powersgd payload: expected 1 buffer, got {len(encoded.buffers)}")
            return from_buffer(encoded.buffers[0], torch.float32, ctx.numel, "powersgd raw").to(ctx.dtype, copy=True).reshape(ctx.shape)
        n, m, r = shape
        if len(encoded.buffers) != 2:
            raise ValueError(f"Malformed powersgd payload: expected 2 buffers, got {len(encoded.buffers)}")
        p = from_buffer(encoded.buffers[0], torch.float32, n * r, "powersgd P").view(n, r)
        q = from_buffer(encoded.buffers[1], torch.float32, m * r, "powersgd Q").view(m, r)
        return self.from_matrix(p @ q.T, ctx)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Upper bound (a tensor sent raw as float32); :meth:`matrix_wire_bytes` is exact per shape."""
        return 4 * numel

    def matrix_wire_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes sent per worker for a tensor of ``shape`` (``P`` and ``Q`` or raw float32)."""
        s = self.matrix_shape(tuple(shape))
        return 4 * (s[0] + s[1]) * s[2] if s else 4 * math.prod(shape)

    def state_dict(self) -> dict[str, Any]:
        return {"q": {k: v.clone() for k, v in self.q.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("q"), dict):
            raise ValueError("Expected {'q': {key: tensor}}")
        self.q = {str(k): v.clone() for k, v in state["q"].items()}

    def state_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.q.values())


def powersgd_rounds(codec: Codec, tensors: list[torch.Tensor],
                    ctxs: list[CodecContext]) -> Generator[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """PowerSGD's protocol as a generator: yields the 1-D ``P`` (then ``Q``) tensor whose mean over
    workers it needs, receives that mean, and returns the approximate averages of ``tensors``.

    Any driver can run it: :func:`powersgd_allreduce` (a blocking mean callable),
    :func:`commlayer.codecs.aggregate.aggregate` (future-chained, e.g. in a DDP hook).
    """
    from commlayer.codecs.ef import ErrorFeedback

    ef = codec if isinstance(codec, ErrorFeedback) else None
    ps = codec.inner if ef is not None else codec
    if not isinstance(ps, PowerSGD):
        raise TypeError(f"Expected a powersgd codec, got {codec!r}")
    comp = [i for i, c in enumerate(ctxs) if ps.matrix_shape(c.shape)]
    raw = [i for i, c in enumerate(ctxs) if not ps.matrix_shape(c.shape)]
    mats = {i: ef.compensate(tensors[i], ctxs[i].key) if ef else tensors[i].detach().to(acc_dtype(ctxs[i].dtype)) for i in comp}
    ps_ = {i: ps.compute_p(mats[i], ctxs[i]) for i in comp}
    acc = functools.reduce(torch.promote_types, (acc_dtype(c.dtype) for c in ctxs), torch.float32)  # the widest over tensors
    flat = torch.cat([ps_[i].reshape(-1).to(acc) for i in comp] + [tensors[i].detach().reshape(-1).to(acc) for i in raw]) if tensors else torch.zeros(0)
    avg = yield flat
    out: list[torch.Tensor | None] = [None] * len(tensors)
    off = 0
    p_hat = {}
    for i in comp:
        p = ps_[i]
        p_hat[i] = ps.after_p_allreduce(avg[off : off + p.numel()].view(p.shape).to(p.dtype).clone(), ctxs[i])
        off += p.numel()
    for i in raw:
        n = ctxs[i].numel
        out[i] = avg[off : off + n].to(ctxs[i].dtype).reshape(ctxs[i].shape).clone()
        off += n
    if comp:
        qs = {i: ps.compute_q(mats[i], p_hat[i], ctxs[i]) for i in comp}
        qavg = yield torch.cat([qs[i].reshape(-1).to(acc) for i in comp])
        off = 0
        for i in comp:
            q = qavg[off : off + qs[i].numel()].view(qs[i].shape).to(qs[i].dtype)
            off += qs[i].numel()
            approx = ps.decompress(p_hat[i], q, ctxs[i])
            if ef is not None:
                ef.update(ctxs[i].key, mats[i], approx.reshape(mats[i].shape))
            out[i] = approx
    return out  # type: ignore[return-value]


def powersgd_allreduce(
    codec: Codec,
    tensors: list[torch.Tensor],
    ctxs: list[CodecContext],
    allreduce: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """Averages ``tensors`` across workers with PowerSGD in two ``allreduce`` rounds.

    Args:
        codec: a :class:`PowerSGD`, or an ``ErrorFeedback`` around one (``powersgd+ef``).
        tensors: this worker's tensors (e.g. the gradients of one DDP bucket).
        ctxs: one context per tensor (distinct keys).
        allreduce: callable returning the element-wise mean over workers of a 1-D tensor; it is
            called exactly twice (or once if nothing is compressible) with the same lengths on
            every worker.

    Returns:
        The approximate averages, in each tensor's shape and dtype.
    """
    gen = powersgd_rounds(codec, tensors, ctxs)
    try:
        t = next(gen)
        while True:
            t = gen.send(allreduce(t))
    except StopIteration as stop:
        return stop.value


def shape_wire_bytes(codec: Codec, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Payload bytes one rank sends for a tensor of ``shape``: exact per shape for PowerSGD (also inside
    error feedback), ``codec.wire_bytes`` for every other codec."""
    inner = getattr(codec, "inner", codec)
    if isinstance(inner, PowerSGD):
        return inner.matrix_wire_bytes(tuple(shape))
    return int(codec.wire_bytes(math.prod(shape), dtype))
