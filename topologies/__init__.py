"""Communication topologies over the commlayer transport (installed as ``commlayer.topologies``).

Exports (imported lazily, so the backend's imports stay light): :class:`World`, :class:`Topology`,
:class:`Guarantee`, :class:`Collective` (ring / tree), :class:`ParameterServer`, :class:`Gossip`,
:func:`codec_allreduce`, :mod:`graphs`; :mod:`registry` is the table of all-reduce algorithms. See
docs/topologies.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "World": "world", "Topology": "base", "Guarantee": "base", "Collective": "base",
    "ParameterServer": "ps", "ps_allreduce": "ps_collective", "Gossip": "gossip", "codec_allreduce": "codec_allreduce",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"commlayer.topologies.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'commlayer.topologies' has no attribute {name!r}")
