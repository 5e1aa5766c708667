"""Properties of each method, checked against numpy references and the papers' bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import commlayer.codecs as C
from commlayer.codecs import CodecContext, from_spec
from commlayer.testing.reference import majority_sign
from commlayer.codecs.bitpack import pack_lanes, pack_uint, unpack_lanes, unpack_uint

finite32 = st.floats(-1e4, 1e4, allow_nan=False, width=32)
vectors = arrays(np.float32, st.integers(0, 3000), elements=finite32)


def _ctx(x: torch.Tensor, step: int = 0, key: str = "k") -> CodecContext:
    return CodecContext.for_tensor(x, key=key, step=step, seed=5)


def _rt(spec: str, x: np.ndarray, step: int = 0) -> np.ndarray:
    t = torch.from_numpy(x)
    codec = from_spec(spec)
    return codec.decode(C.unpack(C.pack(codec.encode(t, _ctx(t, step)))), _ctx(t, step)).numpy()


# ---------------------------------------------------------------- bit packing
@settings(deadline=None)
@given(st.sampled_from([1, 2, 4, 8, 16]), st.integers(0, 500), st.integers(0, 2**31))
def test_pack_lanes_round_trip(width: int, n: int, seed: int) -> None:
    v = np.random.default_rng(seed).integers(0, 1 << width, n)
    packed = pack_lanes(v, width)
    assert packed.size == (n * width + 7) // 8
    assert np.array_equal(unpack_lanes(packed, width, n), v)


@settings(deadline=None)
@given(st.integers(1, 64), st.integers(0, 300), st.integers(0, 2**31))
def test_pack_uint_round_trip(width: int, n: int, seed: int) -> None:
    v = np.random.default_rng(seed).integers(0, 1 << min(width, 63), n, dtype=np.int64)
    packed = pack_uint(v, width, chunk=64)
    assert packed.size == (n * width + 7) // 8
    assert np.array_equal(unpack_uint(packed, width, n, chunk=64), v)
    # Reference: the little-endian bit stream built one bit at a time.
    bits = [(int(x) >> b) & 1 for x in v[:20] for b in range(width)]
    ref = np.packbits(np.array(bits, dtype=np.uint8), bitorder="little") if bits else np.zeros(0, np.uint8)
    assert np.array_equal(packed[: len(bits) // 8], ref[: len(bits) // 8])


# ---------------------------------------------------------------- deterministic codecs vs numpy
@settings(max_examples=40, deadline=None)
@given(vectors)
def test_fp16_bf16_match_numpy_casts(x: np.ndarray) -> None:
    assert np.array_equal(_rt("fp16", x), x.astype(np.float16).astype(np.float32))
    # bf16 = float32 with the low 16 mantissa bits rounded to nearest even
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    assert np.array_equal(_rt("bf16", x), r.astype(np.uint32).view(np.float32))


@settings(max_examples=40, deadline=None)
@given(vectors, st.sampled_from([1, 7, 64, 256]))
def test_int8_matches_numpy_reference(x: np.ndarray, block: int) -> None:
    y = _rt(f"int8:block={block}", x)
    pad = np.concatenate([x, np.zeros((-x.size) % block, np.float32)]).reshape(-1, block)
    scale = np.abs(pad).max(axis=1, keepdims=True) / np.float32(127)
    q = np.where(scale > 0, np.round(pad / np.where(scale > 0, scale, 1)), 0)
    ref = (q * scale).reshape(-1)[: x.size]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6 * (np.abs(x).max(initial=0) + 1))
    assert np.all(np.abs(y - x) <= np.repeat(scale[:, 0], block)[: x.size] / 2 * 1.0001 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(vectors)
def test_sign_matches_numpy(x: np.ndarray) -> None:
    y = _rt("sign", x)
    scale = np.float32(np.abs(x.astype(np.float64)).mean()) if x.size else 0
    np.testing.assert_allclose(y, np.where(np.signbit(x), -scale, scale), rtol=1e-4)  # scale accumulates in float32
    assert np.array_equal(_rt("sign:scale=none", x), np.where(np.signbit(x), -1.0, 1.0).astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 3000), elements=finite32, unique=True), st.sampled_from([0.001, 0.01, 0.3, 1.0]))
def test_topk_is_exact_against_numpy(x: np.ndarray, ratio: float) -> None:
    y = _rt(f"topk:ratio={ratio}", x)
    k = min(x.size, max(1, math.ceil(ratio * x.size - 1e-9)))
    order = np.argsort(-np.abs(x), kind="stable")
    ref = np.zeros_like(x)
    ref[order[:k]] = x[order[:k]]
    if np.abs(x)[order[k - 1]] in np.abs(x)[order[k:]]:
        return  # |x| ties at the boundary (e.g. +a and -a): any choice is a valid top-k
    assert np.array_equal(y, ref)


def test_topk_sampled_preselection_is_exact_on_large_tensors() -> None:
    x = np.random.default_rng(3).standard_normal(1 << 20).astype(np.float32)
    for ratio in (0.001, 0.01, 0.05):
        y = _rt(f"topk:ratio={ratio}", x)
        k = math.ceil(ratio * x.size)
        ref = np.zeros_like(x)
        idx = np.argpartition(-np.abs(x), k)[:k]
        ref[idx] = x[idx]
        assert np.array_equal(y, ref)


@settings(max_examples=30, deadline=None)
@given(vectors, st.floats(1e-3, 1e3))
def test_threshold_keeps_exactly_the_large_entries(x: np.ndarray, tau: float) -> None:
    y = _rt(f"threshold:tau={tau}", x)
    assert np.array_equal(y, np.where(np.abs(x) >= np.float32(tau), x, 0))


def test_randomk_ranks_agree_without_sending_indices() -> None:
    x1 = torch.randn(10_000)
    x2 = torch.randn(10_000)
    a, b = from_spec("randomk:ratio=0.01"), from_spec("randomk:ratio=0.01")
    ctx = _ctx(x1, step=4)
    e1, e2 = a.encode(x1, ctx), b.encode(x2, ctx)
    assert e1.nbytes == 100 * 4  # values only
    i1, i2 = a.decode(e1, ctx).nonzero(), b.decode(e2, ctx).nonzero()
    assert torch.equal(i1, i2) and i1.numel() == 100
    assert not torch.equal(a.decode(a.encode(x1, _ctx(x1, step=5)), _ctx(x1, step=5)).nonzero(), i1)


def test_randomness_does_not_touch_global_rng() -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    before = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.randn(5000)
    torch.manual_seed(0)
    np.random.seed(0)
    for spec in ("qsgd", "terngrad", "randomk", "dgc", "powersgd", "topk:ratio=0.001"):
        from_spec(spec).encode(x.view(50, 100), _ctx(x.view(50, 100)))
    assert (torch.rand(1), np.random.rand()) == before


# ---------------------------------------------------------------- unbiasedness (statistical)
N_TRIALS = 400


def _mean_of_trials(spec: str, x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x)
    codec = from_spec(spec)
    acc = np.zeros(x.size, np.float64)
    for step in range(N_TRIALS):
        ctx = _ctx(t, step)
        acc += codec.decode(codec.encode(t, ctx), ctx).numpy()
    return acc / N_TRIALS


X = np.random.default_rng(42).standard_normal(2048).astype(np.float32)


@pytest.mark.parametrize("levels,bucket", [(1, 2048), (7, 512), (3, 64)])
def test_qsgd_is_unbiased_within_the_lemma_3_1_variance_bound(levels: int, bucket: int) -> None:
    mean = _mean_of_trials(f"qsgd:levels={levels},bucket={bucket}", X)
    # Lemma 3.1 (Alistarh et al.): E||Q(v)-v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2 per bucket, so the
    # mean of N independent draws has E||mean - v||^2 <= that / N. Markov with factor 10.
    xb = X.astype(np.float64).reshape(-1, bucket)
    bound = sum(min(bucket / levels**2, math.sqrt(bucket) / levels) * float(v @ v) for v in xb) / N_TRIALS
    err = float(((mean - X) ** 2).sum())
    assert err <= 10 * bound
    # A biased rounding (nearest) would leave an error of order the squared step: far above.
    assert err < 0.1 * float(X.astype(np.float64) @ X)


def test_terngrad_is_unbiased_within_its_variance() -> None:
    mean = _mean_of_trials("terngrad", X)
    # Var(s*sign*b) per element = s|g| - g^2 (b ~ Bernoulli(|g|/s), s = max|g|)
    s = float(np.abs(X).max())
    var = float((s * np.abs(X.astype(np.float64)) - X.astype(np.float64) ** 2).sum()) / N_TRIALS
    assert float(((mean - X) ** 2).sum()) <= 10 * var


def test_scaled_randomk_is_unbiased_within_its_variance() -> None:
    mean = _mean_of_trials("randomk:ratio=0.25,scale=true", X)
    # Each element is kept with probability p = k/n and scaled by 1/p: Var = (1/p - 1) x^2.
    p = 512 / 2048
    var = (1 / p - 1) * float(X.astype(np.float64) @ X) / N_TRIALS
    assert float(((mean - X) ** 2).sum()) <= 10 * var


def test_biased_codecs_are_flagged_biased() -> None:
    for spec in ("int8", "sign", "topk", "fp16", "threshold", "dgc", "randomk", "terngrad:clip=2.5"):
        assert not from_spec(spec).unbiased, spec
    for spec in ("identity", "qsgd", "terngrad", "randomk:scale=true", "lz4"):
        assert from_spec(spec).unbiased, spec


# ---------------------------------------------------------------- sign majority vote
def test_majority_vote_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(1001).astype(np.float32) for _ in range(5)]
    codec = from_spec("sign:scale=none")
    ctx = _ctx(torch.from_numpy(xs[0]))
    encs = [codec.encode(torch.from_numpy(x), ctx) for x in xs]
    ref = majority_sign(xs)
    assert np.array_equal(codec.majority_vote(encs, ctx).numpy(), ref)
    assert np.array_equal(C.average_payloads(codec, encs, ctx).numpy(), ref)
    votes = sum(codec.votes(e, ctx).int() for e in encs)
    assert np.array_equal(np.sign(votes.numpy()), ref)


# ---------------------------------------------------------------- lossless stage / index codes
def test_delta_indices_with_lz4_beat_fixed_width_bits() -> None:
    x = torch.randn(1 << 20)
    ctx = _ctx(x)
    bits = from_spec("topk:ratio=0.01").encode(x, ctx).nbytes
    delta = from_spec("topk:ratio=0.01,index=delta|lz4").encode(x, ctx).nbytes
    assert delta < bits
    codec = from_spec("topk:ratio=0.01,index=delta|lz4")
    assert torch.equal(codec.decode(codec.encode(x, ctx), ctx), from_spec("topk:ratio=0.01").decode(from_spec("topk:ratio=0.01").encode(x, ctx), ctx))


def test_lz4_refuses_decompression_bombs() -> None:
    codec = from_spec("lz4")
    x = torch.zeros(1000)
    ctx = _ctx(x)
    enc = codec.encode(x, ctx)
    enc.header["z"][0][0] = 10**9
    with pytest.raises(ValueError, match="at most"):
        codec.decode(enc, ctx)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_blobs_raise_value_error_only(blob: bytes) -> None:
    codec = from_spec("topk:ratio=0.1|int8|lz4")
    ctx = CodecContext((100,))
    try:
        codec.decode(C.unpack(blob), ctx)
    except ValueError:
        pass
