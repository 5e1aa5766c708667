"""The shared check every registered codec (and a few pipelines) must pass."""

from __future__ import annotations

import json

import msgpack
import pytest
import torch

import commlayer.codecs as C
from commlayer.codecs import CodecContext, Encoded, from_spec, get_codec, to_spec

PIPELINES = [
    "topk:ratio=0.05|int8",
    "topk:ratio=0.05,index=delta|fp16|lz4",
    "randomk:ratio=0.1|bf16",
    "threshold:tau=0.5|qsgd:levels=3",
    "dgc:ratio=0.05|sign",
    "int8|lz4",
    "sign+ef",
    "topk:ratio=0.1+ef",
    "powersgd:rank=1+ef",
]
SPECS = C.available() + PIPELINES
SHAPES = [(), (0,), (1,), (7,), (3, 5), (17, 31, 3), (1 << 17) + 3]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOSSLESS = {"identity", "lz4"}
# Large tensors in float32 only (keeps the suite fast).
CASES = [(s, d) for s in SHAPES for d in DTYPES if not isinstance(s, int) or d == torch.float32]


def _input(shape: tuple[int, ...] | int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _ctx(x: torch.Tensor, step: int = 1) -> CodecContext:
    return CodecContext.for_tensor(x, key="t", step=step, seed=11)


def test_registry_lists_every_codec() -> None:
    assert set(C.available()) >= {
        "identity", "fp16", "bf16", "int8", "qsgd", "terngrad", "sign", "topk", "randomk",
        "threshold", "dgc", "powersgd", "lz4",
    }


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape,dtype", CASES, ids=str)
def test_round_trip(spec: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    codec = from_spec(spec)
    x = _input(shape, dtype)
    ctx = _ctx(x)
    enc = codec.encode(x, ctx)
    # The wire contract: header is msgpack-able, buffers are contiguous bytes.
    header, frames = C.to_frames(enc)
    enc2 = C.from_frames(header, [bytes(f) for f in frames])
    y = codec.decode(enc2, ctx)
    assert y.shape == x.shape and y.dtype == x.dtype
    bound = codec.wire_bytes(x.numel(), dtype)
    if codec.fixed_size:
        assert enc.nbytes == bound
    else:
        assert enc.nbytes <= bound
    assert torch.isfinite(y.double()).all()
    if spec in LOSSLESS:
        assert torch.equal(y, x)
    # Decoding is deterministic and the packed blob decodes the same.
    assert torch.equal(codec.decode(C.unpack(C.pack(enc)), ctx), y)


@pytest.mark.parametrize("spec", SPECS)
def test_config_and_spec_round_trip(spec: str) -> None:
    codec = from_spec(spec)
    cfg = codec.get_config()
    json.dumps(cfg)  # plain data
    assert get_codec(cfg) == codec
    assert from_spec(to_spec(codec)) == codec
    assert get_codec(json.loads(json.dumps(cfg))).get_config() == cfg


@pytest.mark.parametrize("spec", SPECS)
def test_malformed_payloads_raise_value_error(spec: str) -> None:
    codec = from_spec(spec)
    x = _input((40, 50), torch.float32)
    ctx = _ctx(x)
    enc = codec.encode(x, ctx)
    # one buffer too few / too many
    with pytest.raises(ValueError):
        codec.decode(Encoded(enc.header, enc.buffers[:-1]), ctx)
    with pytest.raises(ValueError):
        codec.decode(Encoded(enc.header, list(enc.buffers) + [b"x"]), ctx)
    # a truncated buffer
    for i, b in enumerate(enc.buffers):
        raw = bytes(memoryview(b).cast("B"))
        if raw:
            bad = list(enc.buffers)
            bad[i] = raw[:-1]
            with pytest.raises(ValueError):
                codec.decode(Encoded(enc.header, bad), ctx)
    # a truncated blob
    blob = C.pack(enc)
    with pytest.raises(ValueError):
        C.unpack(blob[:-1])


def test_wire_header_is_validated() -> None:
    with pytest.raises(ValueError, match="msgpack"):
        C.from_frames(b"\xc1", [])
    with pytest.raises(ValueError, match="version"):
        C.from_frames(msgpack.packb({"v": 99, "h": {}, "n": []}), [])
    with pytest.raises(ValueError, match="expected 1 buffers"):
        C.from_frames(msgpack.packb({"v": 1, "h": {}, "n": [3]}), [])
    with pytest.raises(ValueError, match="expected 3 bytes"):
        C.from_frames(msgpack.packb({"v": 1, "h": {}, "n": [3]}), [b"ab"])


def test_spec_errors_name_the_bad_token() -> None:
    with pytest.raises(C.SpecError, match="nope.*identity"):
        from_spec("nope:ratio=1")
    with pytest.raises(C.SpecError, match="'radio'.*ratio"):
        from_spec("topk:radio=0.1")
    with pytest.raises(C.SpecError, match="key=value"):
        from_spec("topk:ratio")
    with pytest.raises(C.SpecError, match="expected float"):
        from_spec("topk:ratio=abc")
    with pytest.raises(C.SpecError, match=r"\+ef"):
        from_spec("sign+xf")
    with pytest.raises(C.SpecError, match="Empty stage"):
        from_spec("topk||int8")
    with pytest.raises(ValueError, match="cannot follow"):
        from_spec("int8|topk")
    with pytest.raises(ValueError, match="protocol"):
        from_spec("powersgd|lz4")
    with pytest.raises(ValueError, match="own residual"):
        from_spec("dgc+ef")
    with pytest.raises(KeyError, match="identity"):
        get_codec({"id": "nope"})


def test_pipeline_flags_are_derived() -> None:
    assert from_spec("randomk|fp16").linear
    assert not from_spec("randomk|fp16|lz4").linear
    assert from_spec("randomk:scale=true|identity").unbiased
    assert not from_spec("topk|qsgd").unbiased
    assert from_spec("randomk|int8").needs_shared_seed
    assert not from_spec("topk|lz4").fixed_size
    assert from_spec("dgc|int8").stateful
    assert from_spec("qsgd+ef").stateful and not from_spec("qsgd+ef").unbiased


def test_register_codec_rejects_duplicates() -> None:
    class Dup(C.codec_class("identity")):  # type: ignore[misc,valid-type]
        codec_id = "identity"

    with pytest.raises(ValueError, match="already registered"):
        C.register_codec(Dup)


def test_aggregation_mode() -> None:
    assert C.aggregation_mode(from_spec("fp16")) == "allreduce"
    assert C.aggregation_mode(from_spec("randomk+ef")) == "allreduce"
    assert C.aggregation_mode(from_spec("topk+ef")) == "allgather"
    assert C.aggregation_mode(from_spec("sign:scale=none")) == "majority_vote"
    assert C.aggregation_mode(from_spec("powersgd+ef")) == "powersgd"
    for spec in ("topk", "int8", "qsgd", "sign+ef", "randomk|lz4", "powersgd"):
        with pytest.raises(ValueError, match="not linear"):
            C.aggregation_mode(from_spec(spec), "allreduce")
    with pytest.raises(ValueError, match="Expected an aggregation mode"):
        C.aggregation_mode(from_spec("fp16"), "sum")


@pytest.mark.parametrize("spec", ["identity", "fp16", "bf16", "randomk:ratio=0.2", "randomk:ratio=0.2|fp16", "randomk:scale=true+ef"])
def test_linear_payloads_sum_in_compressed_domain(spec: str) -> None:
    codec = from_spec(spec)
    xs = [_input((30, 20), torch.float32, seed=i) for i in range(4)]
    ctx = _ctx(xs[0])
    encs = [codec.encode(x, ctx) for x in xs]
    summed = codec.decode(codec.sum_encoded(encs, ctx), ctx)
    ref = sum(codec.decode(e, ctx).double() for e in encs)
    tol = 1e-5 if spec in ("identity",) or spec.startswith("randomk:ratio=0.2") and "fp16" not in spec else 1e-2
    torch.testing.assert_close(summed.double(), ref, atol=tol * 4, rtol=tol)
    mean = C.average_payloads(codec, encs, ctx)
    torch.testing.assert_close(mean.double(), ref / 4, atol=tol, rtol=tol)


def test_nonlinear_sum_raises() -> None:
    codec = from_spec("topk")
    x = _input((10,), torch.float32)
    with pytest.raises(TypeError, match="not linear|linear codec"):
        codec.sum_encoded([codec.encode(x, _ctx(x))], _ctx(x))


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COMMLAYER_CODEC", raising=False)
    assert C.from_env() is None
    assert C.from_env(default="fp16") == from_spec("fp16")
    monkeypatch.setenv("COMMLAYER_CODEC", "topk:ratio=0.01|int8+ef")
    assert to_spec(C.from_env()) == "topk|int8+ef"
