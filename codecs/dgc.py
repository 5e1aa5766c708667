"""Deep Gradient Compression (Lin et al., ICLR 2018).

Three parts of the paper, all per tensor key:

* sampled threshold estimation: the top-``ratio`` threshold is estimated on a random ``sample``
  fraction of the accumulated gradient; entries above it are kept, and if more than ``k`` pass,
  exact top-k among them (the paper's hierarchical selection). The count is data dependent
  (at most ``k``), so ``wire_bytes`` is an upper bound.
* momentum correction and factor masking: ``u <- m u + g;  v <- v + u``; ``v`` is sparsified and
  both ``u`` and ``v`` are zeroed where sent. Use plain SGD (no momentum) in the optimizer.
* local gradient clipping: with a global norm bound ``clip`` and ``world`` workers, each worker
  clips its gradient to ``clip / sqrt(world)`` before accumulating.

The warm-up schedule of the paper (sparsity ramped over the first epochs) is left to the caller
(build a codec with a different ``ratio``). The state (``u``, ``v``) is in :meth:`DGC.state_dict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from commlayer.codecs.base import CodecContext, Encoded, acc_dtype, as_array, chunks, torch_generator, validate_config_types
from commlayer.codecs.registry import register_codec
from commlayer.codecs.sparse import SparseCodec, check_index_mode, pack_indices, ratio_k


@dataclass(frozen=True)
class DGCConfig:
    """Options of :class:`DGC`.

    Attributes:
        ratio: target fraction kept (the paper uses 0.001).
        sample: fraction sampled to estimate the threshold (0.001-0.01 in the paper).
        momentum: momentum of the correction (0 disables it: plain residual accumulation).
        clip: global gradient-norm bound for local clipping (0 disables it).
        world: number of workers, for the ``clip / sqrt(world)`` local bound.
        index: index code, "bits" or "delta".
    """

    ratio: float = 0.001
    sample: float = 0.01
    momentum: float = 0.9
    clip: float = 0.0
    world: int = 1
    index: str = "bits"

    def __post_init__(self) -> None:
        validate_config_types(self)
        if not 0 < self.ratio <= 1 or not 0 < self.sample <= 1:
            raise ValueError(f"Expected ratio and sample in (0, 1], got {self.ratio}, {self.sample}")
        if not 0 <= self.momentum < 1 or self.clip < 0 or self.world < 1:
            raise ValueError(f"Expected 0 <= momentum < 1, clip >= 0, world >= 1, got {self.momentum}, {self.clip}, {self.world}")
        check_index_mode(self.index)


def sampled_threshold_select(v: torch.Tensor, k: int, sample: float, gen: torch.Generator) -> torch.Tensor:
    """DGC selection: threshold from a random sample, then exact top-k among the survivors if > k."""
    n = v.numel()
    if k >= n:
        return torch.arange(n)
    m = min(n, max(64, math.ceil(sample * n)))
    s = v[torch.randint(0, n, (m,), generator=gen)].abs()
    thr = torch.topk(s, max(1, math.ceil(k * m / n)), sorted=False).values.min()
    idx = torch.cat([torch.nonzero(v[a:e].abs() >= thr).squeeze(1) + a for a, e in chunks(n)])
    if idx.numel() > k:
        idx = idx[torch.topk(v[idx].abs(), k, sorted=False).indices]
    return idx.sort().values


@register_codec
class DGC(SparseCodec):
    """Stateful DGC compressor: momentum correction, local clipping, sampled-threshold sparsification."""

    codec_id = "dgc"
    Config = DGCConfig
    stateful = True
    keeps_residual = True
    fixed_size = False

    def __init__(self, config: DGCConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def max_kept(self, numel: int) -> int:
        return ratio_k(self.config.ratio, numel)

    def select(self, flat: torch.Tensor, ctx: CodecContext) -> torch.Tensor:
        return sampled_threshold_select(flat, self.max_kept(flat.numel()), self.config.sample, torch_generator(ctx, "dgc"))

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        c = self.config
        acc = acc_dtype(ctx.dtype)
        g = tensor.detach().reshape(-1).to(acc)
        if c.clip > 0:
            bound = c.clip / math.sqrt(c.world)
            norm = float(torch.linalg.vector_norm(g))
            if norm > bound:
                g = g * (bound / norm)
        st = self.state.setdefault(ctx.key, {"u": torch.zeros_like(g), "v": torch.zeros_like(g)})
        if st["v"].shape != g.shape:
            raise ValueError(f"Expected DGC state of {tuple(g.shape)} for key {ctx.key!r}, got {tuple(st['v'].shape)}")
        u, v = st["u"], st["v"]
        u.mul_(c.momentum).add_(g)
        v.add_(u)
        idx = self.select(v, ctx)
        values = v[idx].to(ctx.dtype)
        v[idx] = 0
        u[idx] = 0
        return Encoded({"k": int(idx.numel())}, [as_array(values), pack_indices(idx.numpy(), g.numel(), c.index)])

    def state_dict(self) -> dict[str, Any]:
        """``{key: {"u": momentum, "v": accumulated}}`` (copies)."""
        return {k: {n: t.clone() for n, t in s.items()} for k, s in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not all(isinstance(s, dict) and set(s) == {"u", "v"} for s in state.values()):
            raise ValueError("Expected {key: {'u': tensor, 'v': tensor}}")
        self.state = {str(k): {n: t.clone() for n, t in s.items()} for k, s in state.items()}

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values())
