"""PowerSGD protocol: linearity through someone else's allreduce, exact recovery of low rank."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from commlayer.codecs import CodecContext, from_spec, powersgd_allreduce
from commlayer.codecs.base import torch_generator
from commlayer.codecs.powersgd import PowerSGD


def _fake_world(world: int, fn):  # type: ignore[no-untyped-def]
    """Runs fn(rank, allreduce) on ``world`` threads with an in-memory mean allreduce."""
    barrier = threading.Barrier(world)
    slots: list[torch.Tensor | None] = [None] * world
    results: list[object] = [None] * world
    calls = [0] * world

    def allreduce_for(rank: int):  # type: ignore[no-untyped-def]
        def allreduce(t: torch.Tensor) -> torch.Tensor:
            calls[rank] += 1
            slots[rank] = t.clone()
            barrier.wait()
            mean = torch.stack(slots).mean(0)  # type: ignore[arg-type]
            barrier.wait()
            return mean

        return allreduce

    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, fn(r, allreduce_for(r)))) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results, calls


def _numpy_power_step(m: np.ndarray, q: np.ndarray) -> np.ndarray:
    p = m @ q
    for i in range(p.shape[1]):  # Gram-Schmidt
        p[:, i] /= np.linalg.norm(p[:, i]) + 1e-8
        for j in range(i + 1, p.shape[1]):
            p[:, j] -= p[:, i] * (p[:, i] @ p[:, j])
    return p @ (m.T @ p).T


def test_protocol_equals_one_power_step_on_the_mean_matrix() -> None:
    world = 4
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((30, 20)) for _ in range(world)]
    vecs = [rng.standard_normal(7) for _ in range(world)]
    ctxs = [CodecContext((30, 20), torch.float64, key="w", step=0, seed=1), CodecContext((7,), torch.float64, key="b", step=0, seed=1)]

    def work(rank: int, allreduce):  # type: ignore[no-untyped-def]
        codec = from_spec("powersgd:rank=2")
        return powersgd_allreduce(codec, [torch.from_numpy(mats[rank]), torch.from_numpy(vecs[rank])], ctxs, allreduce)

    results, calls = _fake_world(world, work)
    assert calls == [2] * world
    q0 = torch.randn(20, 2, generator=torch_generator(ctxs[0], "powersgd"), dtype=torch.float64).numpy()
    ref = _numpy_power_step(np.mean(mats, axis=0), q0)
    for r in range(world):
        np.testing.assert_allclose(results[r][0].numpy(), ref, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(results[r][1].numpy(), np.mean(vecs, axis=0), rtol=1e-12)


def test_low_rank_mean_is_recovered_exactly_and_warm_start_is_kept() -> None:
    rng = np.random.default_rng(1)
    u, v = rng.standard_normal((50, 2)), rng.standard_normal((2, 40))
    mats = [u @ np.diag(rng.uniform(1, 2, 2)) @ v for _ in range(3)]
    ctx = CodecContext((50, 40), torch.float64, key="w", seed=9)
    codecs = [PowerSGD(rank=2) for _ in range(3)]

    def work(rank: int, allreduce):  # type: ignore[no-untyped-def]
        return powersgd_allreduce(codecs[rank], [torch.from_numpy(mats[rank])], [ctx], allreduce)[0]

    results, _ = _fake_world(3, work)
    np.testing.assert_allclose(results[0].numpy(), np.mean(mats, axis=0), atol=1e-8)
    assert all(torch.equal(c.q["w"], codecs[0].q["w"]) for c in codecs)  # same warm start everywhere


def test_error_feedback_uses_the_aggregated_approximation() -> None:
    rng = np.random.default_rng(2)
    mats = [rng.standard_normal((16, 16)) for _ in range(2)]
    ctx = CodecContext((16, 16), torch.float64, key="w")
    codecs = [from_spec("powersgd:rank=1+ef") for _ in range(2)]

    def work(rank: int, allreduce):  # type: ignore[no-untyped-def]
        return powersgd_allreduce(codecs[rank], [torch.from_numpy(mats[rank])], [ctx], allreduce)[0]

    results, _ = _fake_world(2, work)
    for r in range(2):
        torch.testing.assert_close(codecs[r].residuals["w"], torch.from_numpy(mats[r]) - results[r])
    assert codecs[0].state_bytes() == 16 * 16 * 8


def test_only_shrinking_shapes_are_compressed() -> None:
    ps = PowerSGD(rank=4)
    assert ps.matrix_shape((10,)) is None
    assert ps.matrix_shape((4, 4)) is None
    assert ps.matrix_shape((64, 3, 3, 3)) == (64, 27, 4)
    assert ps.matrix_wire_bytes((64, 3, 3, 3)) == 4 * (64 + 27) * 4


@pytest.mark.parametrize("rank", [2, 4])
def test_rank_deficient_gradient_is_recovered(rank: int) -> None:
    """A rank-1 matrix at rank r > 1: one-pass Gram-Schmidt left P^ non-orthonormal (68 % error at r=2)."""
    m = np.outer(np.arange(1, 65, dtype=np.float32), np.linspace(-1, 1, 128, dtype=np.float32))
    codec = from_spec(f"powersgd:rank={rank}")
    ctx = CodecContext(shape=(64, 128), dtype=torch.float32, key="m", step=0, seed=0)
    out = powersgd_allreduce(codec, [torch.from_numpy(m.copy())], [ctx], lambda t: t)[0].numpy()
    assert np.linalg.norm(out - m) / np.linalg.norm(m) < 1e-5
