"""Delayed synchronization: periodic averaging (local SGD, DiLoCo) and one-step-stale overlap."""

from commlayer.sync.local_sgd import PeriodicAverager, diloco, local_sgd
from commlayer.sync.stale import StaleGradientSync

__all__ = ["PeriodicAverager", "StaleGradientSync", "diloco", "local_sgd"]
