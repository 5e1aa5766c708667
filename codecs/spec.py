"""The one spec grammar used by the env var COMMLAYER_CODEC, backend options, CLI and hooks.

Grammar::

    spec     := pipeline [ "+ef" ]
    pipeline := stage ( "|" stage )*
    stage    := id [ ":" option ( "," option )* ]
    option   := key "=" value        # value coerced to the option's type (int, float, bool, str)

Examples: ``int8``, ``topk:ratio=0.01|int8``, ``sign+ef``, ``topk:ratio=0.01,index=delta|fp16|lz4+ef``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from commlayer import settings
from commlayer.codecs.base import Codec
from commlayer.codecs.ef import ErrorFeedback
from commlayer.codecs.pipeline import Pipeline
from commlayer.codecs.registry import codec_class

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
FORM = "id[:key=value,...][|id[:key=value,...]]...[+ef]"


class SpecError(ValueError):
    """A codec spec that does not parse; the message names the bad token and the expected form."""


def _coerce(codec_id: str, key: str, raw: str, ftype: str) -> Any:
    try:
        if ftype == "int":
            return int(raw)
        if ftype == "float":
            return float(raw)
        if ftype == "bool":
            low = raw.lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError(raw)
        return raw
    except ValueError:
        raise SpecError(f"Bad value in {codec_id}:{key}={raw}: expected {ftype}, got {raw!r}") from None


def parse_stage(token: str) -> Codec:
    """Parses one ``id:key=value,...`` token into a codec."""
    token = token.strip()
    if not token:
        raise SpecError(f"Empty stage in spec: expected the form {FORM}")
    cid, _, opts = token.partition(":")
    cid = cid.strip()
    try:
        cls = codec_class(cid)
    except KeyError as exc:
        raise SpecError(f"Bad stage {token!r}: {exc.args[0]}") from None
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls.Config)}
    options: dict[str, Any] = {}
    if opts.strip():
        for item in opts.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise SpecError(f"Bad option {item!r} in {token!r}: expected key=value")
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                raise SpecError(f"Unknown option {key!r} for codec {cid!r}: expected one of: {known}")
            options[key] = _coerce(cid, key, raw.strip(), fields[key])
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"Bad options in {token!r}: {exc}") from None


def from_spec(spec: str) -> Codec:
    """Builds a codec, pipeline or error-feedback wrapper from a spec string.

    Raises:
        SpecError: (a ValueError) naming the bad token and the expected form.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"Expected a codec spec of the form {FORM}, got {spec!r}")
    body = spec.strip()
    ef = False
    if "+" in body:
        body, _, suffix = body.rpartition("+")
        if suffix.strip() != "ef" or "+" in body:
            raise SpecError(f"Bad suffix '+{suffix}' in {spec!r}: expected a single trailing '+ef'")
        ef = True
    stages = [parse_stage(tok) for tok in body.split("|")]
    codec: Codec = stages[0] if len(stages) == 1 else Pipeline(stages)
    if len(stages) == 1:
        Pipeline.check_alone(codec)
    return ErrorFeedback(codec) if ef else codec


def to_spec(codec: Codec) -> str:
    """Spec string that :func:`from_spec` turns back into an equal codec (non-default options only)."""
    return codec.to_spec()


def from_env(var: str = "COMMLAYER_CODEC", default: str | None = None) -> Codec | None:
    """Codec from the spec in environment variable ``var`` (``default`` if unset; None if neither)."""
    spec = settings.get(var) if settings.is_set(var) else default
    return from_spec(spec) if spec else None
