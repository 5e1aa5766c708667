"""Local SGD / DiLoCo and one-step-stale sync over gloo, against single-process references."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from multiproc import run_world

WORLD = 3
LR = 0.1
STEPS = 10


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    return x, x @ torch.arange(1.0, 9.0, dtype=torch.float64).unsqueeze(1) + torch.randn(16, 1, generator=g, dtype=torch.float64)


def _init() -> torch.Tensor:
    return torch.randn(8, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _grad(w: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    x, y = _data(rank, step)
    return 2 * x.T @ (x @ w - y) / x.shape[0]  # d/dw of mean squared error


def _worker(rank: int, world: int) -> dict:
    from commlayer.sync import PeriodicAverager, StaleGradientSync, diloco, local_sgd

    dist.init_process_group("gloo")
    out = {}
    for name in ("local_sgd", "diloco", "outer_sgd"):
        w = torch.nn.Parameter(_init() + rank)  # unequal on purpose: broadcast_init must fix it
        opt = torch.optim.SGD([w], lr=LR)
        avg = {
            "local_sgd": lambda: local_sgd([w], period=3),
            "diloco": lambda: diloco([w], period=3),
            "outer_sgd": lambda: PeriodicAverager([w], period=4, outer_lr=0.5),
        }[name]()
        synced = []
        for step in range(STEPS):
            x, y = _data(rank, step)
            ((x @ w - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            synced.append(avg.step())
        out[name] = (w.detach().numpy().copy(), synced)  # numpy: tensors would travel by shared memory
    w = torch.nn.Parameter(_init())
    opt = torch.optim.SGD([w], lr=LR)
    sync = StaleGradientSync([w])
    applied = []
    for step in range(STEPS):
        x, y = _data(rank, step)
        ((x @ w - y) ** 2).mean().backward()
        applied.append(sync.step())
        if applied[-1]:
            opt.step()
        opt.zero_grad()
    if sync.flush():
        opt.step()
    out["stale"] = (w.detach().numpy().copy(), applied)
    dist.destroy_process_group()
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_world(_worker, WORLD, timeout=120)


def _reference_periodic(period: int, outer_lr: float, momentum: float, nesterov: bool) -> list[torch.Tensor]:
    glob = _init()
    ws = [glob.clone() for _ in range(WORLD)]
    buf = None
    for step in range(STEPS):
        ws = [w - LR * _grad(w, r, step) for r, w in enumerate(ws)]
        if (step + 1) % period == 0:
            delta = glob - sum(ws) / WORLD  # outer pseudo-gradient
            buf = delta.clone() if buf is None else momentum * buf + delta
            update = delta + momentum * buf if nesterov else (buf if momentum else delta)
            glob = glob - outer_lr * update
            ws = [glob.clone() for _ in range(WORLD)]
    return ws


@pytest.mark.parametrize(
    "name,period,lr,mom,nesterov",
    [("local_sgd", 3, 1.0, 0.0, False), ("diloco", 3, 0.7, 0.9, True), ("outer_sgd", 4, 0.5, 0.0, False)],
)
def test_periodic_averaging_matches_reference(results: list[dict], name: str, period: int, lr: float, mom: float, nesterov: bool) -> None:
    ref = _reference_periodic(period, lr, mom, nesterov)
    for rank in range(WORLD):
        w, synced = results[rank][name]
        torch.testing.assert_close(torch.from_numpy(w), ref[rank], rtol=1e-10, atol=1e-10)
        assert synced == [(s + 1) % period == 0 for s in range(STEPS)]


def test_one_step_stale_matches_reference(results: list[dict]) -> None:
    w = _init()
    pending = None
    for step in range(STEPS):
        avg = sum(_grad(w, r, step) for r in range(WORLD)) / WORLD
        if pending is not None:
            w = w - LR * pending  # step t applies the average of step t-1
        pending = avg
    w = w - LR * pending  # flush
    for rank in range(WORLD):
        got, applied = results[rank]["stale"]
        torch.testing.assert_close(torch.from_numpy(got), w, rtol=1e-10, atol=1e-10)
        assert applied == [False] + [True] * (STEPS - 1)
