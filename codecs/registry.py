"""numcodecs-style registry: codec id -> class."""

from __future__ import annotations

import logging
from typing import Any

from commlayer.codecs.base import Codec

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Codec]] = {}
#: The reserved ids of the codecs that wrap others ("pipeline", "ef"); each registers itself on import.
_WRAPPERS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Registers a codec class under ``cls.codec_id`` (usable as a class decorator).

    Raises:
        ValueError: if the id is empty, malformed or already taken by another class.
    """
    cid = getattr(cls, "codec_id", "")
    if not cid or not cid.replace("_", "").isalnum() or cid != cid.lower():
        raise ValueError(f"Expected a lowercase alphanumeric codec_id, got {cid!r} on {cls.__name__}")
    if cid in ("pipeline", "ef"):
        raise ValueError(f"Expected a codec id other than the reserved {cid!r}")
    old = _REGISTRY.get(cid)
    if old is not None and old is not cls:
        raise ValueError(f"Codec id {cid!r} is already registered by {old.__module__}.{old.__name__}")
    _REGISTRY[cid] = cls
    return cls


def register_wrapper(cls: type[Codec]) -> type[Codec]:
    """Registers a wrapping codec (a pipeline, error feedback) under its reserved ``cls.codec_id``.

    :func:`get_codec` builds it with ``cls.from_config``; it is not a stage id (:func:`available`).

    Raises:
        ValueError: if the id is not one of the reserved ids or already taken by another class.
    """
    cid = getattr(cls, "codec_id", "")
    if cid not in ("pipeline", "ef"):
        raise ValueError(f"Expected a reserved wrapper id ('pipeline' or 'ef'), got {cid!r} on {cls.__name__}")
    old = _WRAPPERS.get(cid)
    if old is not None and old is not cls:
        raise ValueError(f"Codec id {cid!r} is already registered by {old.__module__}.{old.__name__}")
    _WRAPPERS[cid] = cls
    return cls


def available() -> list[str]:
    """Registered codec ids, sorted."""
    return sorted(_REGISTRY)


def codec_class(codec_id: str) -> type[Codec]:
    """Class registered under ``codec_id``.

    Raises:
        KeyError: for an unknown id; the message lists the known ids.
    """
    try:
        return _REGISTRY[codec_id]
    except KeyError:
        raise KeyError(f"Unknown codec id {codec_id!r}; expected one of: {', '.join(available())}") from None


def get_codec(config: dict[str, Any]) -> Codec:
    """Instantiates a codec (or pipeline / error-feedback wrapper) from a ``get_config()`` dict.

    Raises:
        KeyError: unknown id (message lists the known ids).
        ValueError: malformed config.
    """
    if not isinstance(config, dict) or "id" not in config:
        raise ValueError(f"Expected a dict with an 'id' key, got {config!r}")
    cid = config["id"]
    wrapper = _WRAPPERS.get(cid)
    if wrapper is not None:
        return wrapper.from_config(config)
    return codec_class(cid).from_config(config)
