"""How many inner steps between outer synchronizations: the ``period="auto"`` rule.

Streaming DiLoCo (:mod:`commlayer.training.streaming`) sends fragment ``p`` of ``P`` every ``H``
inner steps and applies its averaged pseudo-gradient ``delay = H // P`` inner steps later, so the
fragments' all-reduces follow each other on the link and each one has ``H / P`` inner steps of
compute to hide behind. Communication is hidden when one fragment's all-reduce takes no longer
than those steps::

    T_comm(fragment) <= (H / P) * T_step     <=>     H >= P * T_comm / T_step

The rule picks the smallest such ``H`` with a headroom factor ``safety`` (default 1.5, for jitter
and for the compute the all-reduce itself steals on a loaded machine), rounded up to a multiple of
``P`` and clamped to ``[period_min, period_max]``:

    ``H = clamp(P * ceil(safety * T_comm / T_step), period_min, period_max)``

``T_comm`` is the all-reduce's own measured time (from the moment its first collective is issued
until its result is complete, encode and decode included), ``T_step`` the measured compute time of
one inner step (time between two ``step()`` calls, outside the sync). Both are medians of the last
measurements on each rank, then the maximum over ranks, so every rank computes the same ``H``.
A slower link (larger ``T_comm``) gives a larger ``H``; a faster one a smaller ``H``, never below
``period_min``.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class PeriodRule:
    """Bounds and headroom of the automatic period.

    Attributes:
        fragments: ``P``, fragments synchronized in turn (``H`` is a multiple of it).
        period_min: smallest ``H``.
        period_max: largest ``H``.
        safety: headroom factor on the measured ratio (>= 1).
    """

    fragments: int = 1
    period_min: int = 4
    period_max: int = 512
    safety: float = 1.5

    def __post_init__(self) -> None:
        if self.fragments < 1:
            raise ValueError(f"Expected fragments >= 1, got {self.fragments}")
        if self.period_min < self.fragments:
            raise ValueError(f"Expected period_min >= fragments ({self.fragments}), got {self.period_min}")
        if self.period_max < self.period_min:
            raise ValueError(f"Expected period_max >= period_min ({self.period_min}), got {self.period_max}")
        if not self.safety >= 1.0:
            raise ValueError(f"Expected safety >= 1, got {self.safety}")

    def choose(self, comm_s: float, step_s: float, current: int) -> int:
        """The period for a fragment all-reduce of ``comm_s`` seconds and inner steps of ``step_s``.

        Args:
            comm_s: measured seconds of one fragment's outer all-reduce (max over ranks).
            step_s: measured compute seconds of one inner step (max over ranks).
            current: the period in use, kept when a measurement is missing (<= 0).

        Returns:
            ``P * ceil(safety * comm_s / step_s)`` clamped to ``[period_min, period_max]``
            (bounds rounded to multiples of ``P``).
        """
        p = self.fragments
        lo = p * math.ceil(self.period_min / p)
        hi = max(lo, p * (self.period_max // p))
        if not (comm_s > 0 and step_s > 0 and math.isfinite(comm_s) and math.isfinite(step_s)):
            return current
        per_fragment = max(1, math.ceil(self.safety * comm_s / step_s - 1e-9))
        return int(min(hi, max(lo, p * per_fragment)))


class Recent:
    """The last ``n`` measurements of one quantity (thread-safe appends), and their median."""

    def __init__(self, n: int = 16) -> None:
        self._values: deque[float] = deque(maxlen=n)

    def add(self, value: float) -> None:
        self._values.append(float(value))

    def median(self) -> float:
        """Median of the kept values; 0.0 when there are none (read as "not measured")."""
        values = list(self._values)
        return statistics.median(values) if values else 0.0

    def __len__(self) -> int:
        return len(self._values)
