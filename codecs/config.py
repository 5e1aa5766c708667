"""Runtime type checks of the frozen-dataclass codec configurations, and their spec tokens."""

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


def spec_token(config: dict[str, Any], config_cls: type) -> str:
    """``id[:key=value,...]`` for one stage's ``get_config()`` dict: the options that differ from ``config_cls``'s defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    opts = [f"{k}={_spec_value(v)}" for k, v in config.items() if k != "id" and v != defaults.get(k)]
    return config["id"] + (":" + ",".join(opts) if opts else "")


def _spec_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)
