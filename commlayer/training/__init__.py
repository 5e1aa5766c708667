"""Training algorithms over commlayer (and over any torch.distributed backend), in one package.

* :mod:`codec_hook`: DDP communication hook applying any codec (:class:`CodecHookState`,
  :func:`codec_hook`); non-blocking, futures chained like torch's PowerSGD hook.
* :mod:`local_sgd`: delayed synchronization, periodic averaging (:func:`local_sgd`,
  :func:`diloco`, :class:`PeriodicAverager`); :mod:`stale`: one-step-stale gradient overlap
  (:class:`StaleGradientSync`); :mod:`streaming`: streaming, compressed DiLoCo whose outer
  all-reduce overlaps the next inner steps (:class:`StreamingDiLoCo`, :class:`StreamingConfig`,
  ``period="auto"`` by :class:`PeriodRule`).
* :class:`GossipAverager`: decentralized data parallel in the spirit of torch's
  ``PeriodicModelAverager``: every rank keeps its own model, steps its own optimizer, and mixes
  its parameters with its graph neighbours (D-PSGD, Lian et al., NeurIPS 2017; CHOCO-SGD with a
  codec, Koloskova et al. 2019).
* :class:`ParameterServerTrainer`: workers push gradients and pull parameters from a
  :class:`commlayer.topologies.ps.ParameterServer` that runs the optimizer (sync, or async with
  a staleness bound).

``commlayer.hooks`` and ``commlayer.sync`` re-export the hook and the delayed-sync names.
Names are imported lazily, so importing one algorithm does not import torch.distributed's others.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CodecHookState": "codec_hook", "TorchExchange": "codec_hook", "codec_hook": "codec_hook",
    "PeriodicAverager": "local_sgd", "diloco": "local_sgd", "local_sgd": "local_sgd",
    "StaleGradientSync": "stale", "StreamingDiLoCo": "streaming", "StreamingConfig": "streaming_parts",
    "PeriodRule": "sync_period", "GossipAverager": "gossip_trainer", "ParameterServerTrainer": "ps_trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"commlayer.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'commlayer.training' has no attribute {name!r}")
