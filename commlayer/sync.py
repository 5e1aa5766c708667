"""Delayed synchronization: periodic averaging (local SGD, DiLoCo) and one-step-stale overlap.

A re-export of :mod:`commlayer.training.local_sgd` and :mod:`commlayer.training.stale`;
``from commlayer.sync import diloco, local_sgd, StaleGradientSync`` keeps working.
"""

from commlayer.training.local_sgd import PeriodicAverager, diloco, local_sgd
from commlayer.training.stale import StaleGradientSync

__all__ = ["PeriodicAverager", "StaleGradientSync", "diloco", "local_sgd"]
