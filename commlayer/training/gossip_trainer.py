"""Gossip model averaging for decentralized training (D-PSGD)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from commlayer.topologies.gossip import Gossip


class GossipAverager:
    """Mixes a model's parameters with the graph neighbours after optimizer steps.

    Usage (D-PSGD: local step, then one gossip round)::

        gossip = world.gossip(graph="exponential")
        averager = GossipAverager(gossip, period=1)
        for batch in data:
            loss(model, batch).backward(); opt.step(); opt.zero_grad()
            averager.average_parameters(model.parameters())

    Args:
        gossip: the :class:`Gossip` topology (its mode, mixing and failure handling apply).
        period: mix every ``period`` steps (local SGD between mixes when > 1).
        warmup_steps: steps without mixing at the start.
        rounds: gossip rounds per mix.
        codec: codec spec for CHOCO-SGD (compressed gossip), or None.
        key: state key (push-sum weights and CHOCO copies persist under it).
    """

    def __init__(self, gossip: Gossip, period: int = 1, warmup_steps: int = 0, rounds: int = 1, codec: Any = None,
                 key: str = "params") -> None:
        if period < 1 or warmup_steps < 0 or rounds < 1:
            raise ValueError(f"Expected period >= 1, warmup_steps >= 0, rounds >= 1, got {period}, {warmup_steps}, {rounds}")
        self.gossip, self.period, self.warmup_steps, self.rounds, self.codec, self.key = gossip, period, warmup_steps, rounds, codec, key
        self.step = 0

    @torch.no_grad()
    def average_parameters(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Counts a step and mixes ``params`` in place when due; returns whether it mixed."""
        params = list(params)
        self.step += 1
        if self.step <= self.warmup_steps or (self.step - self.warmup_steps) % self.period:
            return False
        flat = parameters_to_vector(params).contiguous()
        for _ in range(self.rounds):
            self.gossip.mix_(flat, self.key, self.codec)
        vector_to_parameters(flat, params)
        return True
