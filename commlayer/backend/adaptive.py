"""The link-aware controller in the backend: ``COMMLAYER_ALGO=auto`` on a default group of 3+ ranks.

At default-group creation every rank probes its links (subgroups keep the static size rule, so
``new_group`` stays cheap) (``commlayer.adapt``); each exact all-reduce then
runs the plan the cost model picks for its size (algorithm, chunk, ring order), tagged with the
plan version so ranks on different plans fail loudly instead of summing garbage. Every
``REPLAN_EVERY`` all-reduces the ranks compare measured against predicted times and re-probe on
drift. By default it runs when some peer is reached over the network; ``COMMLAYER_ADAPT=1`` forces it,
``COMMLAYER_ADAPT=0`` turns it off (static size threshold instead).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from commlayer import settings
from commlayer.topologies import registry
from commlayer.topologies.comm import OpComm
from commlayer.topologies.dense import allreduce as dense_allreduce
from commlayer.topologies.reduce_ops import ReduceOp

logger = logging.getLogger(__name__)

REPLAN_EVERY = 16


def wanted(options: Any, size: int, transport: Any) -> bool:
    """``COMMLAYER_ADAPT``: "auto" (default) = when some peer is reached over the network (peers on this
    machine share memory: nothing to adapt to, and probing them only measures noise); "1" = always; "0" = never."""
    mode = str(settings.get("COMMLAYER_ADAPT")).lower()
    if options.algo != "auto" or size < 3 or mode in ("0", "false", "no"):
        return False
    return mode in ("1", "true", "yes") or not transport.all_local


class AdaptiveAllreduce:
    """Owns a :class:`commlayer.adapt.planner.Planner` for one process group."""

    def __init__(self, transport: Any, ranks: list[int], channel: str, timeout: float) -> None:
        from commlayer.adapt.planner import Planner, PlannerConfig
        from commlayer.adapt.policy import Policy
        from commlayer.adapt.probe import ProbeConfig

        timeout = max(timeout, 30.0)  # probing moves real data: never tighter than 30 s
        cfg = PlannerConfig(policy=Policy(mode="exact"), channel=f"__adapt__/{channel}", timeout=timeout,
                            probe=ProbeConfig(channel=f"__adapt_probe__/{channel}", timeout=timeout),
                            metrics_path=settings.get("COMMLAYER_METRICS"))
        self.planner = Planner(transport, ranks, cfg)
        self.planner.start()  # collective: every member runs it while creating the group
        self._calls = 0

    def run(self, comm: OpComm, flat: torch.Tensor, op: ReduceOp) -> None:
        """Runs on the executor, so plans and re-plans happen in the same order on every rank."""
        from commlayer.adapt.execute import execute

        nbytes = flat.numel() * flat.element_size()
        if nbytes < registry.small_bytes():  # latency-bound: recursive doubling, without the planner's per-op bookkeeping
            dense_allreduce(comm, flat, op, "tree")
            return
        plan = self.planner.plan(nbytes, flat.dtype, exact=True)
        info = execute(comm, flat, op, plan)
        self.planner.observe(plan, nbytes, info["seconds"])
        self._calls += 1
        if self._calls % REPLAN_EVERY == 0:
            if self.planner.maybe_replan(self._calls // REPLAN_EVERY):
                logger.info("re-planned after %d all-reduces: %s", self._calls, self.planner.replans[-1:] or "")

    def close(self) -> None:
        self.planner.close()
