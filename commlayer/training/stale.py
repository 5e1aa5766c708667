"""One-step-stale overlapped gradient averaging.

The gradients of step ``t`` are all-reduced asynchronously while step ``t+1`` computes; step
``t+1`` applies the average of step ``t``. Communication hides behind a whole forward/backward
pass at the price of one step of staleness (as in Pipe-SGD, Li et al., NeurIPS 2018, and
"delayed" gradient schemes analysed by Stich & Karimireddy, 2020). Use on a plain (not DDP-wrapped)
model; the first call has nothing to apply yet::

    sync = StaleGradientSync(model.parameters())
    for batch in data:
        loss_fn(model(batch)).backward()
        if sync.step():          # grads now hold the previous step's average
            opt.step()
        opt.zero_grad()
    if sync.flush():             # apply the last pending average
        opt.step()
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist


class StaleGradientSync:
    """Swaps each step's gradients for the previous step's average (async allreduce).

    Args:
        params: parameters whose ``.grad`` is exchanged (all ranks, same order).
        group: process group (None: default).
    """

    def __init__(self, params: Iterable[torch.Tensor], group: Any = None) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self._pending: tuple[Any, torch.Tensor] | None = None

    def _flat_grads(self) -> torch.Tensor:
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in self.params]
        return torch.cat(parts).clone() if parts else torch.zeros(0)

    def _apply(self) -> bool:
        if self._pending is None:
            return False
        work, flat = self._pending
        work.wait()
        flat /= dist.get_world_size(self.group)
        off = 0
        for p in self.params:
            g = flat[off : off + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += p.numel()
        self._pending = None
        return True

    @torch.no_grad()
    def step(self) -> bool:
        """Starts averaging this step's grads; writes the previous step's average into ``.grad``.

        Returns:
            True if ``.grad`` now holds an average to apply; False on the first call.
        """
        flat = self._flat_grads()
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        applied = self._apply()
        self._pending = (work, flat)
        return applied

    @torch.no_grad()
    def flush(self) -> bool:
        """Waits for the pending exchange and writes it into ``.grad`` (True if there was one)."""
        return self._apply()
