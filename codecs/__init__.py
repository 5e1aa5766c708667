"""Gradient codecs (installed as ``commlayer.codecs``): pure tensor math, no communication.

Quick use::

    from commlayer.codecs import from_spec, CodecContext, pack, unpack
    codec = from_spec("topk:ratio=0.01|int8+ef")
    ctx = CodecContext.for_tensor(grad, key="layer1.weight", step=step, seed=job_seed)
    blob = pack(codec.encode(grad, ctx))          # send blob (or to_frames() for zero copy)
    approx = codec.decode(unpack(blob), ctx)

See docs/codecs.md for the spec grammar, every codec, its flags and its paper.
"""

from commlayer.codecs.base import Codec, CodecContext, Encoded
from commlayer.codecs.registry import available, codec_class, get_codec, register_codec
from commlayer.codecs.spec import SpecError, from_env, from_spec, to_spec
from commlayer.codecs.wire import from_frames, pack, to_frames, unpack

# Registration happens at import of each codec module.
from commlayer.codecs import cast, int8, qsgd, terngrad, sign, topk, randomk, threshold, dgc, powersgd, lz4stage  # noqa: E402,F401,I001
from commlayer.codecs.aggregate import MODES, aggregation_mode, average_payloads, valid_aggregations  # noqa: E402
from commlayer.codecs.ef import ErrorFeedback  # noqa: E402
from commlayer.codecs.pipeline import Pipeline  # noqa: E402
from commlayer.codecs.powersgd import PowerSGD, powersgd_allreduce  # noqa: E402

__all__ = [
    "Codec",
    "CodecContext",
    "Encoded",
    "ErrorFeedback",
    "MODES",
    "Pipeline",
    "PowerSGD",
    "SpecError",
    "aggregation_mode",
    "available",
    "average_payloads",
    "codec_class",
    "from_env",
    "from_frames",
    "from_spec",
    "get_codec",
    "pack",
    "powersgd_allreduce",
    "register_codec",
    "to_frames",
    "to_spec",
    "unpack",
    "valid_aggregations",
]
