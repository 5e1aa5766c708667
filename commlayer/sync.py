"""Delayed synchronization: periodic averaging (local SGD, DiLoCo) and one-step-stale overlap.

A re-export of :mod:`commlayer.training.local_sgd`, :mod:`commlayer.training.stale` and
:mod:`commlayer.training.streaming` (streaming, compressed DiLoCo whose outer all-reduce overlaps
the next inner steps); ``from commlayer.sync import diloco, local_sgd, StaleGradientSync`` keeps working.
"""

from commlayer.training.local_sgd import PeriodicAverager, diloco, local_sgd
from commlayer.training.stale import StaleGradientSync
from commlayer.training.streaming import StreamingConfig, StreamingDiLoCo
from commlayer.training.sync_period import PeriodRule

__all__ = ["PeriodRule", "PeriodicAverager", "StaleGradientSync", "StreamingConfig", "StreamingDiLoCo", "diloco", "local_sgd"]
