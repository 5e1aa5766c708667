"""Configuration, fragment partition and memory report of :mod:`commlayer.training.streaming`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from commlayer import settings
from commlayer.codecs import from_spec
from commlayer.codecs.memory import max_copies, report
from commlayer.training.sync_period import PeriodRule


@dataclass(frozen=True)
class StreamingConfig:
    """Options of :class:`~commlayer.training.streaming.StreamingDiLoCo`.

    Attributes:
        period: ``H``, inner steps between two syncs of the same fragment, or ``"auto"``
            (chosen from the measured all-reduce and inner step times, :mod:`~commlayer.training.sync_period`).
        fragments: ``P``, parameter fragments synchronized in turn (1 = the whole model at once).
        delay: inner steps between sending a fragment and applying its average; None = ``H // P``
            (the longest that keeps one fragment in flight at a time); 0 = blocking (plain DiLoCo).
        outer_lr: outer learning rate (DiLoCo: 0.7).
        outer_momentum: outer momentum (DiLoCo: 0.9).
        nesterov: Nesterov outer momentum (DiLoCo: True).
        mixing: alpha of the merge ``local = alpha * local + (1 - alpha) * global`` (0: take the global copy).
        codec: codec spec of the pseudo-gradients (``""``: exact), e.g. ``int8+ef``, ``qsgd:levels=7+ef``.
        seed: job seed shared by all ranks (stochastic codecs).
        period_min: ``period="auto"``: smallest ``H``, and the one used until the first measurement.
        period_max: ``period="auto"``: largest ``H`` (None: ``COMMLAYER_SYNC_PERIOD_MAX``).
        safety: ``period="auto"``: headroom factor (None: ``COMMLAYER_SYNC_SAFETY``).
        memory_copies: codec state budget in copies of the parameters' bytes (None: ``COMMLAYER_CODEC_MEMORY_COPIES``).
        timeout_s: longest wait for an outer all-reduce before raising ``TimeoutError``.
    """

    period: int | str = 16
    fragments: int = 1
    delay: int | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    mixing: float = 0.5
    codec: str = ""
    seed: int = 0
    period_min: int = 4
    period_max: int | None = None
    safety: float | None = None
    memory_copies: float | None = None
    timeout_s: float = 600.0
    rule: PeriodRule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.fragments < 1:
            raise ValueError(f"StreamingConfig.fragments: expected >= 1, got {self.fragments}")
        if isinstance(self.period, bool) or not (self.period == "auto" or isinstance(self.period, int)):
            raise ValueError(f"StreamingConfig.period: expected an integer or 'auto', got {self.period!r}")
        if isinstance(self.period, int) and self.period < self.fragments:
            raise ValueError(f"StreamingConfig.period: expected >= fragments ({self.fragments}), got {self.period}")
        if self.delay is not None:
            top = self.period if isinstance(self.period, int) else self.period_min
            if not 0 <= self.delay <= top:
                raise ValueError(f"StreamingConfig.delay: expected 0 <= delay <= period ({top}), got {self.delay}")
        if not 0.0 <= self.mixing < 1.0:
            raise ValueError(f"StreamingConfig.mixing: expected 0 <= mixing < 1, got {self.mixing}")
        if not self.timeout_s > 0:
            raise ValueError(f"StreamingConfig.timeout_s: expected > 0, got {self.timeout_s}")
        from_spec(self.codec or "identity")  # a SpecError names the bad token now, not at the first sync
        max_copies(self.memory_copies)
        hi = self.period_max if self.period_max is not None else int(settings.get("COMMLAYER_SYNC_PERIOD_MAX"))
        safety = self.safety if self.safety is not None else float(settings.get("COMMLAYER_SYNC_SAFETY"))
        object.__setattr__(self, "rule", PeriodRule(self.fragments, self.period_min, hi, safety))


def fragment_bounds(numels: list[int], fragments: int) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` parameter index ranges of about equal element counts, one per fragment.

    Fragment ``k`` ends at the first parameter whose running element count reaches ``(k + 1) / P``
    of the total (each fragment keeps at least one parameter).

    Raises:
        ValueError: fewer parameters than fragments.
    """
    if fragments > len(numels):
        raise ValueError(f"Expected at most {len(numels)} fragments (one parameter each at least), got {fragments}")
    total = sum(numels)
    bounds: list[tuple[int, int]] = []
    lo = run = 0
    for i, n in enumerate(numels):
        run += n
        k = len(bounds)
        left_params, left_frags = len(numels) - (i + 1), fragments - (k + 1)
        if k < fragments - 1 and (run * fragments >= (k + 1) * total or left_params == left_frags):
            bounds.append((lo, i + 1))
            lo = i + 1
    bounds.append((lo, len(numels)))
    return bounds


def memory_report(sync: Any) -> dict[str, Any]:
    """A :class:`StreamingDiLoCo`'s memory on this rank, in bytes (see its ``memory()``)."""
    grad_bytes = sum(p.numel() * p.element_size() for p in sync.params)
    codec = report(sync.codec_state.codec)
    momentum = sum(t.numel() * t.element_size() for st in sync.outer.state.values() for t in st.values() if hasattr(t, "numel"))
    return {"grad_bytes": grad_bytes, "codec": codec, "codec_state_bytes": codec["state_bytes"],
            "codec_copies": codec["state_bytes"] / grad_bytes if grad_bytes else 0.0,
            "global_copy_bytes": sum(g.numel() * g.element_size() for g in sync.global_flat),
            "outer_momentum_bytes": momentum,
            "in_flight_bytes": sum(p.flat.numel() * p.flat.element_size() for p in sync._pending.values())}
