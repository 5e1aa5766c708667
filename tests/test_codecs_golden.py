"""Golden encoded bytes: the wire format of every codec must not drift silently.

Each file ``tests/golden/<name>.bin`` holds ``commlayer.codecs.pack(encode(x))`` for a fixed input.
If a change to a codec's wire format is deliberate, regenerate them and commit the new files
(and say so in the commit message; peers must upgrade together)::

    COMMLAYER_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_codecs_golden.py
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import commlayer.codecs as C
from commlayer import settings

GOLDEN = Path(__file__).parent / "golden"
SPECS = C.available() + [
    "qsgd:levels=1,bucket=64",
    "qsgd:levels=127",
    "sign:scale=none",
    "topk:ratio=0.05,index=delta|lz4",
    "topk:ratio=0.05|int8",
    "randomk:ratio=0.1,scale=true|bf16",
    "threshold:tau=1.5|qsgd:levels=3",
    "int8:block=64|lz4",
]


def _name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


def _encode(spec: str) -> bytes:
    x = torch.from_numpy(np.random.default_rng(20240501).standard_normal((37, 29)).astype(np.float32))
    ctx = C.CodecContext.for_tensor(x, key="golden", step=3, seed=7)
    return C.pack(C.from_spec(spec).encode(x, ctx))


@pytest.mark.parametrize("spec", SPECS)
def test_golden_bytes(spec: str) -> None:
    path = GOLDEN / f"{_name(spec)}.bin"
    blob = _encode(spec)
    if settings.get("COMMLAYER_REGEN_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(blob)
    assert path.exists(), f"missing {path}; generate with COMMLAYER_REGEN_GOLDEN=1 (see module docstring)"
    assert blob == path.read_bytes(), f"wire format of {spec!r} changed; if deliberate, regenerate (see module docstring)"
    # And the committed bytes still decode.
    x = torch.zeros(37, 29)
    ctx = C.CodecContext.for_tensor(x, key="golden", step=3, seed=7)
    assert C.from_spec(spec).decode(C.unpack(path.read_bytes()), ctx).shape == (37, 29)
