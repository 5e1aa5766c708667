"""Error feedback: sent + residual = sum of inputs; state_dict round trip; DGC state."""

from __future__ import annotations

import pytest
import torch

import commlayer.codecs as C
from commlayer.codecs import CodecContext, ErrorFeedback, from_spec
from commlayer.codecs.memory import CodecMemoryError, check_state, limit_state, report


def _grads(n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("spec", ["topk:ratio=0.01+ef", "sign+ef", "int8+ef", "qsgd:levels=1+ef", "threshold:tau=1.0+ef", "randomk:ratio=0.05|fp16+ef", "topk:ratio=0.05|int8|lz4+ef", "powersgd:rank=1+ef"])
def test_sent_plus_residual_equals_sum_of_inputs(spec: str) -> None:
    codec = from_spec(spec)
    sent = torch.zeros(40, 30, dtype=torch.float64)
    total = torch.zeros_like(sent)
    for step, g in enumerate(_grads(25, (40, 30))):
        ctx = CodecContext.for_tensor(g, key="w", step=step)
        sent += codec.decode(C.unpack(C.pack(codec.encode(g, ctx))), ctx)
        total += g
    torch.testing.assert_close(sent + codec.residuals["w"], total, rtol=0, atol=1e-9)
    assert codec.state_bytes() == 40 * 30 * 8


def test_residual_of_half_inputs_is_one_copy_unless_float32_is_asked_for() -> None:
    g = torch.randn(100).half()
    codec = from_spec("topk:ratio=0.1+ef")  # auto: a half gradient keeps a half residual (one copy)
    codec.encode(g, CodecContext.for_tensor(g, key="h"))
    assert codec.residuals["h"].dtype == torch.float16 and codec.state_bytes() == 200
    refused = ErrorFeedback(from_spec("topk:ratio=0.1"), residual_dtype="fp32")  # two copies: refused by default
    with pytest.raises(CodecMemoryError, match=r"2.00 copies of the 200 bytes of gradients.*at most 1"):
        refused.encode(g, CodecContext.for_tensor(g, key="h"))
    assert refused.residuals == {}  # nothing was stored
    asked = ErrorFeedback(from_spec("topk:ratio=0.1"), residual_dtype="fp32", max_copies=2)
    asked.encode(g, CodecContext.for_tensor(g, key="h"))
    assert asked.residuals["h"].dtype == torch.float32 and asked.state_bytes() == 400


def test_bf16_residuals_halve_the_memory_and_keep_the_invariant_up_to_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMMLAYER_EF_DTYPE", "bf16")
    codec = from_spec("topk:ratio=0.05+ef")
    monkeypatch.delenv("COMMLAYER_EF_DTYPE")
    full = from_spec("topk:ratio=0.05+ef")
    sent = torch.zeros(2000, dtype=torch.float64)
    total = torch.zeros_like(sent)
    for step, g in enumerate(_grads(30, (2000,), torch.float32)):
        ctx = CodecContext.for_tensor(g, key="k", step=step)
        sent += codec.decode(codec.encode(g, ctx), ctx).double()
        full.encode(g, ctx)
        total += g.double()
    assert codec.residuals["k"].dtype == torch.bfloat16 and full.residuals["k"].dtype == torch.float32
    assert codec.state_bytes() * 2 == full.state_bytes() == 2000 * 4
    err = float((sent + codec.residuals["k"].double() - total).norm() / total.norm())
    assert 0 < err < 0.02  # each step rounds e to bf16 (8 bits of mantissa) instead of being exact
    assert report(codec)["residual_dtype"] == "bfloat16" and report(codec)["copies"] == 0.5


def test_absolute_budget_catches_residuals_of_keys_no_longer_used() -> None:
    codec = from_spec("int8+ef")
    assert limit_state(codec, grad_bytes=100 * 4) == 400  # one copy of a 100-element float32 model
    codec.encode(torch.ones(100), CodecContext((100,), key="bucket0:100"))
    with pytest.raises(CodecMemoryError, match="above its budget of 400 bytes.*reset"):
        codec.encode(torch.ones(100), CodecContext((100,), key="bucket0-rebuilt:100"))  # keys changed: a second copy
    codec.reset()
    codec.encode(torch.ones(100), CodecContext((100,), key="bucket0-rebuilt:100"))
    assert codec.state_bytes() == 400


def test_check_state_refuses_codecs_holding_two_copies() -> None:
    codec = from_spec("dgc:ratio=0.1,momentum=0.9")  # momentum + residual: two copies
    g = torch.randn(1000)
    codec.encode(g, CodecContext.for_tensor(g, key="k"))
    with pytest.raises(CodecMemoryError, match="2.00 copies of the 4000 bytes"):
        check_state(codec, grad_bytes=4000)
    check_state(codec, grad_bytes=4000, copies=2)  # asked for


def test_state_dict_round_trip_reproduces_the_next_payload() -> None:
    a = from_spec("sign+ef")
    grads = _grads(6, (500,), torch.float32)
    for step, g in enumerate(grads[:5]):
        a.encode(g, CodecContext.for_tensor(g, key="k", step=step))
    b = from_spec("sign+ef")
    b.load_state_dict(a.state_dict())
    ctx = CodecContext.for_tensor(grads[5], key="k", step=5)
    assert C.pack(a.encode(grads[5], ctx)) == C.pack(b.encode(grads[5], ctx))
    torch.testing.assert_close(a.residuals["k"], b.residuals["k"])
    with pytest.raises(ValueError):
        b.load_state_dict({"nope": 1})


def test_residuals_are_per_key_and_shape_checked() -> None:
    codec = from_spec("topk:ratio=0.5+ef")
    codec.encode(torch.ones(4), CodecContext((4,), key="a"))
    codec.encode(torch.ones(6), CodecContext((6,), key="b"))
    assert set(codec.residuals) == {"a", "b"}
    with pytest.raises(ValueError, match="Expected residual of shape"):
        codec.encode(torch.ones(5), CodecContext((5,), key="a"))


def test_ef_compensates_a_biased_codec() -> None:
    # With top-1% and error feedback every coordinate is eventually sent: the running sum of what
    # was sent tracks the running sum of inputs to within the (bounded) residual.
    codec, plain = from_spec("topk:ratio=0.01+ef"), from_spec("topk:ratio=0.01")
    total = sent_ef = sent_plain = torch.zeros(2000, dtype=torch.float64)
    for step, g in enumerate(_grads(200, (2000,))):
        g = g + 0.5  # a consistent direction that top-k alone mostly drops
        ctx = CodecContext.for_tensor(g, key="k", step=step)
        total = total + g
        sent_ef = sent_ef + codec.decode(codec.encode(g, ctx), ctx)
        sent_plain = sent_plain + plain.decode(plain.encode(g, ctx), ctx)
    err_ef = float((sent_ef - total).norm() / total.norm())
    err_plain = float((sent_plain - total).norm() / total.norm())
    assert err_ef < 0.5 * err_plain


def test_dgc_without_momentum_is_error_feedback() -> None:
    codec = from_spec("dgc:ratio=0.02,momentum=0.0,sample=0.5")
    sent = torch.zeros(3000, dtype=torch.float64)
    total = torch.zeros_like(sent)
    for step, g in enumerate(_grads(20, (3000,))):
        ctx = CodecContext.for_tensor(g, key="k", step=step)
        enc = codec.encode(g, ctx)
        assert enc.header["k"] <= 60
        sent += codec.decode(enc, ctx)
        total += g
    torch.testing.assert_close(sent + codec.state["k"]["v"], total, rtol=0, atol=1e-9)


def test_dgc_momentum_correction_and_masking() -> None:
    codec = from_spec("dgc:ratio=0.5,momentum=0.9,sample=1.0")
    g = torch.tensor([4.0, -3.0, 0.1, 0.2], dtype=torch.float64)
    ctx = CodecContext.for_tensor(g, key="k")
    out = codec.decode(codec.encode(g, ctx), ctx)
    assert out.tolist() == [4.0, -3.0, 0.0, 0.0]
    st = codec.state["k"]
    # u = g, v = g; then masked where sent (momentum factor masking)
    assert st["u"].tolist() == [0.0, 0.0, 0.1, 0.2] and st["v"].tolist() == [0.0, 0.0, 0.1, 0.2]
    out = codec.decode(codec.encode(g, ctx), ctx)
    # u = 0.9 u + g = [4, -3, 0.19, 0.38]; v = v + u = [4, -3, 0.29, 0.58]
    torch.testing.assert_close(out, torch.tensor([4.0, -3.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(codec.state["k"]["v"], torch.tensor([0.0, 0.0, 0.29, 0.58], dtype=torch.float64))
    b = from_spec("dgc:ratio=0.5,momentum=0.9,sample=1.0")
    b.load_state_dict(codec.state_dict())
    assert C.pack(b.encode(g, ctx)) == C.pack(codec.encode(g, ctx))
    assert codec.state_bytes() == 2 * 4 * 8


def test_dgc_local_gradient_clipping_scales_by_sqrt_world() -> None:
    codec = from_spec("dgc:ratio=1.0,momentum=0.0,clip=2.0,world=4")
    g = torch.full((100,), 1.0)  # norm 10 > 2 / sqrt(4) = 1
    out = codec.decode(codec.encode(g, CodecContext((100,), key="k")), CodecContext((100,), key="k"))
    torch.testing.assert_close(float(out.norm()), 1.0)


def test_ef_wrapper_rejects_double_wrapping() -> None:
    with pytest.raises(ValueError):
        ErrorFeedback(from_spec("sign+ef"))
