"""Options of the zmq process group (``pg_options=`` of init_process_group / new_group, or env vars)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from commlayer import settings
from commlayer.topologies import registry


@dataclass(frozen=True)
class ZmqOptions:
    """Per-group settings.

    Attributes:
        algo: all-reduce algorithm: "auto" (by size) or a name of :mod:`commlayer.topologies.registry`
            ("ring", "tree", "chain", "ps"); exact and compressed all-reduces both use it. ``COMMLAYER_ALGO``.
        chunk_bytes: pipeline chunk of ring/chain algorithms. ``COMMLAYER_CHUNK_BYTES``.
        ring_order: optional ring order (a permutation of group ranks), e.g. to avoid slow links.
        codec: gradient codec spec for floating-point all_reduce SUM/AVG ("" = exact; "auto" = chosen per
            bucket by :mod:`commlayer.adapt.autocodec`). ``COMMLAYER_CODEC``.
        codec_min_bytes: tensors below this size stay exact. ``COMMLAYER_CODEC_MIN_BYTES``.
    """

    algo: str = "auto"
    chunk_bytes: int = 1 << 20
    ring_order: tuple[int, ...] | None = None
    codec: str = ""
    codec_min_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        registry.validate(self.algo, "COMMLAYER_ALGO / algo")
        if self.chunk_bytes < 1024:
            raise ValueError(f"chunk_bytes: expected >= 1024, got {self.chunk_bytes}")

    @classmethod
    def from_env(cls) -> "ZmqOptions":
        """The group rows of :mod:`commlayer.settings` (read once per group, by :meth:`resolve`)."""
        order = settings.get("COMMLAYER_RING_ORDER")
        return cls(
            algo=settings.get("COMMLAYER_ALGO"),
            chunk_bytes=settings.get("COMMLAYER_CHUNK_BYTES"),
            ring_order=tuple(int(x) for x in order.split(",")) if order else None,
            codec=settings.get("COMMLAYER_CODEC"),
            codec_min_bytes=settings.get("COMMLAYER_CODEC_MIN_BYTES"),
        )

    @classmethod
    def resolve(cls, given: Any) -> "ZmqOptions":
        """Env defaults, overridden by ``given`` (None, a ZmqOptions, or a mapping of field names)."""
        base = cls.from_env()
        if given is None:
            return base
        if isinstance(given, ZmqOptions):
            return given
        if isinstance(given, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ValueError(f"pg_options: unknown keys {unknown}; expected some of {sorted(known)}")
            return replace(base, **dict(given))
        raise TypeError(f"pg_options: expected commlayer.backend.ZmqOptions or a dict, got {type(given).__name__}")
