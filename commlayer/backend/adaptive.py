"""The link-aware controller in the backend: ``COMMLAYER_ALGO=auto`` on a default group of 3+ ranks.

At default-group creation every rank probes its links (subgroups keep the static size rule, so
``new_group`` stays cheap) (``commlayer.adapt``); each exact all-reduce then
runs the plan the cost model picks for its size (algorithm, chunk, ring order), tagged with the
plan version so ranks on different plans fail loudly instead of summing garbage. Every
``REPLAN_EVERY`` all-reduces the ranks compare measured against predicted times and re-probe on
drift. By default it runs when some peer is reached over the network; ``COMMLAYER_ADAPT=1`` forces it,
``COMMLAYER_ADAPT=0`` turns it off (static size threshold instead).

``COMMLAYER_CODEC=auto`` (or ``pg_options={"codec": "auto"}``) adds :class:`AutoCodecAllreduce`:
the backend only numbers each compressible all-reduce and hands it to
:class:`commlayer.adapt.autocodec.AutoCodec`, the one place that decides exact / fp16 / int8 /
top-k / PowerSGD per bucket (it shares this group's planner when there is one).
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


def _planner(transport: Any, ranks: list[int], channel: str, timeout: float) -> Any:
    from commlayer.adapt.planner import Planner, PlannerConfig
    from commlayer.adapt.policy import Policy
    from commlayer.adapt.probe import ProbeConfig

    timeout = max(timeout, 30.0)  # probing moves real data: never tighter than 30 s
    cfg = PlannerConfig(policy=Policy(mode="exact"), channel=f"__adapt__/{channel}", timeout=timeout,
                        probe=ProbeConfig(channel=f"__adapt_probe__/{channel}", timeout=timeout),
                        metrics_path=settings.get("COMMLAYER_METRICS"))
    planner = Planner(transport, ranks, cfg)
    planner.start()  # collective: every member runs it while creating the group
    return planner


class AdaptiveAllreduce:
    """Owns a :class:`commlayer.adapt.planner.Planner` for one process group."""

    def __init__(self, transport: Any, ranks: list[int], channel: str, timeout: float) -> None:
        self.planner = _planner(transport, ranks, channel, timeout)
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


def auto_config(channel: str, timeout: float) -> Any:
    """The controller's knobs from :mod:`commlayer.settings` (the one reader of the policy variables)."""
    from commlayer.adapt.autocodec import DEFAULT_CANDIDATES, AutoConfig

    specs = tuple(x.strip() for x in str(settings.get("COMMLAYER_AUTO_CODECS")).split(";") if x.strip())
    return AutoConfig(mode=settings.get("COMMLAYER_ADAPT_POLICY"), error_budget=settings.get("COMMLAYER_ERROR_BUDGET"),
                      compute_s=settings.get("COMMLAYER_COMPUTE_S"), candidates=specs or DEFAULT_CANDIDATES,
                      channel=f"__autocodec__/{channel}", timeout=max(timeout, 30.0))


class AutoCodecAllreduce:
    """``codec="auto"``: numbers compressible all-reduces and runs them through the controller."""

    def __init__(self, transport: Any, ranks: list[int], channel: str, timeout: float, min_bytes: int,
                 shared: AdaptiveAllreduce | None = None) -> None:
        from commlayer.adapt.autocodec import AutoCodec

        config = auto_config(channel, timeout)  # validated before any collective setup
        self.min_bytes = min_bytes
        self._owns = shared is None
        self.planner = shared.planner if shared is not None else _planner(transport, ranks, channel, timeout)
        self.controller = AutoCodec(self.planner, config)
        logger.info("zmq backend: codec auto (%s policy, error budget %g) for float all_reduce SUM/AVG >= %d bytes",
                    config.mode, config.error_budget, min_bytes)

    def applies(self, op: ReduceOp, tensor: torch.Tensor, factor: object) -> bool:
        return (op in (ReduceOp.SUM, ReduceOp.AVG) and factor is None and tensor.dtype.is_floating_point
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def issue(self, flat: torch.Tensor) -> Any:
        """In the issuing thread: numbers the call and records the bucket's arrival."""
        return self.controller.issue(flat)

    def run(self, comm: OpComm, flat: torch.Tensor, op: ReduceOp, ticket: Any) -> None:
        """On the executor: the controller's plan for this bucket, executed."""
        self.controller.run(comm, flat, op, ticket)

    def close(self) -> None:
        if self._owns:
            self.planner.close()
