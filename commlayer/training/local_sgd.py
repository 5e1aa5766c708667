"""Periodic model averaging: local SGD and DiLoCo.

Local SGD (Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019; Lin et al.,
"Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020): every worker takes ``period`` optimizer
steps on its own, then the models are averaged. DiLoCo (Douillard et al., "DiLoCo: Distributed
Low-Communication Training of Language Models", 2023) treats the averaged change as a
pseudo-gradient ``delta = theta_global - mean_i(theta_i)`` and applies an outer Nesterov-momentum
SGD step to ``theta_global`` (paper: lr 0.7, momentum 0.9). With outer lr 1 and no momentum the
outer step is exactly model averaging, so one class serves both. Works over any backend.

Usage::

    avg = PeriodicAverager(model.parameters(), period=50)        # or diloco(model.parameters(), 500)
    for batch in data:
        loss_fn(model(batch)).backward(); opt.step(); opt.zero_grad()
        avg.step()                                               # communicates every `period` calls
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class PeriodicAverager:
    """Averages parameters every ``period`` steps through an outer SGD step.

    Args:
        params: the model parameters (updated in place).
        period: ``H``, local steps between synchronizations.
        outer_lr: outer learning rate (1.0 with no momentum = plain averaging).
        outer_momentum: outer momentum (DiLoCo: 0.9).
        nesterov: Nesterov outer momentum (DiLoCo: True).
        group: process group (None: default).
        broadcast_init: broadcast rank 0's parameters at construction so all workers start equal.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        period: int,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        nesterov: bool = False,
        group: Any = None,
        broadcast_init: bool = True,
    ) -> None:
        if period < 1:
            raise ValueError(f"Expected period >= 1, got {period}")
        self.params = [p for p in params]
        self.period = period
        self.group = group
        self.local_steps = 0
        self.syncs = 0
        if broadcast_init:
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        self.global_params = [p.detach().clone() for p in self.params]
        self.outer = torch.optim.SGD(self.global_params, lr=outer_lr, momentum=outer_momentum, nesterov=nesterov)

    @torch.no_grad()
    def step(self) -> bool:
        """Counts one local step; every ``period`` steps synchronizes. Returns True if it did."""
        self.local_steps += 1
        if self.local_steps % self.period:
            return False
        self.sync()
        return True

    @torch.no_grad()
    def sync(self) -> None:
        """Averages the pseudo-gradient now and applies the outer step (collective: all ranks)."""
        world = dist.get_world_size(self.group)
        deltas = [(g - p.detach()).reshape(-1) for g, p in zip(self.global_params, self.params)]
        flat = torch.cat(deltas) if deltas else torch.zeros(0)
        dist.all_reduce(flat, group=self.group)
        flat /= world
        off = 0
        for g in self.global_params:
            g.grad = flat[off : off + g.numel()].view_as(g).clone()
            off += g.numel()
        self.outer.step()
        for g, p in zip(self.global_params, self.params):
            p.copy_(g)
        self.syncs += 1

    def state_dict(self) -> dict[str, Any]:
        """Step counter, global parameters and outer optimizer state."""
        return {"local_steps": self.local_steps, "global": [g.clone() for g in self.global_params], "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_steps = int(state["local_steps"])
        with torch.no_grad():
            for g, s in zip(self.global_params, state["global"]):
                g.copy_(s)
        self.outer.load_state_dict(state["outer"])


def local_sgd(params: Iterable[torch.Tensor], period: int, group: Any = None) -> PeriodicAverager:
    """Local SGD: plain model averaging every ``period`` steps."""
    return PeriodicAverager(params, period, group=group)


def diloco(
    params: Iterable[torch.Tensor], period: int, outer_lr: float = 0.7, outer_momentum: float = 0.9, group: Any = None
) -> PeriodicAverager:
    """DiLoCo: outer Nesterov SGD on the averaged pseudo-gradient (paper defaults lr 0.7, momentum 0.9)."""
    return PeriodicAverager(params, period, outer_lr=outer_lr, outer_momentum=outer_momentum, nesterov=True, group=group)
