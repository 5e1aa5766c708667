"""Runtime type checks of the frozen-dataclass codec configurations."""

from __future__ import annotations

import dataclasses
from typing import Any


def validate_config_types(config: Any) -> None:
    """Checks the runtime types of a config dataclass against its annotations."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(f.type))
        if expected is None:
            continue
        bad = not isinstance(value, expected) or (f.type in ("int", "float") and isinstance(value, bool))
        if bad:
            raise TypeError(f"Expected {f.name} of type {f.type}, got {value!r}")
