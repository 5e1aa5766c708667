"""Streaming, compressed DiLoCo over real processes (gloo and zmq) against a single-process reference.

The reference below re-implements the algorithm of ``commlayer.training.streaming`` in one
process with plain tensors: every worker's local model, the per-fragment global copies, the
outer Nesterov SGD, the delayed application and the mixing; with a codec, every worker has its
own error-feedback codec and the average is :func:`commlayer.codecs.average_payloads` (the
reference aggregation written with dense decodes).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from commlayer.codecs import CodecContext, average_payloads, from_spec
from commlayer.training.streaming_parts import StreamingConfig, fragment_bounds
from commlayer.training.sync_period import PeriodRule
from multiproc import run_world

WORLD = 3
LR = 0.05
STEPS = 13
SHAPES = [(4, 1), (3, 1), (1,)]  # w1 on x[:, :4], w2 on x[:, 4:7], bias
CASES = {  # name: (period, fragments, delay, mixing, codec)
    "diloco_blocking": (3, 1, 0, 0.0, ""),
    "exact_two_fragments": (4, 2, None, 0.5, ""),
    "int8_ef": (4, 2, 1, 0.5, "int8+ef"),
    "qsgd4bit_ef": (6, 3, 2, 0.25, "qsgd:levels=7+ef"),
    "topk_ef_full_delay": (3, 1, 3, 0.5, "topk:ratio=0.3+ef"),
}


def _data(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(16, 7, generator=g, dtype=torch.float64)
    return x, x @ torch.arange(1.0, 8.0, dtype=torch.float64).unsqueeze(1) - 2.0 + torch.randn(16, 1, generator=g, dtype=torch.float64)


def _init() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _loss(ws: list[torch.Tensor], rank: int, step: int) -> torch.Tensor:
    x, y = _data(rank, step)
    return ((x[:, :4] @ ws[0] + x[:, 4:] @ ws[1] + ws[2] - y) ** 2).mean()


def _grads(ws: list[torch.Tensor], rank: int, step: int) -> list[torch.Tensor]:
    leaves = [w.clone().requires_grad_(True) for w in ws]
    _loss(leaves, rank, step).backward()
    return [w.grad for w in leaves]  # type: ignore[misc]


def _config(name: str) -> StreamingConfig:
    period, fragments, delay, mixing, codec = CASES[name]
    return StreamingConfig(period=period, fragments=fragments, delay=delay, mixing=mixing, codec=codec, seed=7)


def _worker(rank: int, world: int, backend: str) -> dict:
    from commlayer.sync import StreamingDiLoCo

    dist.init_process_group(backend)
    out = {}
    for name in CASES:
        ws = [torch.nn.Parameter(w + rank) for w in _init()]  # unequal on purpose: broadcast_init fixes it
        opt = torch.optim.SGD(ws, lr=LR)
        sync = StreamingDiLoCo(ws, _config(name))
        sent, in_flight = [], []
        for step in range(STEPS):
            _loss(list(ws), rank, step).backward()
            opt.step()
            opt.zero_grad()
            sent.append(sync.step())
            in_flight.append(sync.in_flight())
        final_in_flight = sync.in_flight()
        mem = sync.memory()
        out[name] = {"w": [w.detach().numpy().copy() for w in ws], "sent": sent, "in_flight": in_flight,
                     "final_in_flight": final_in_flight, "bytes": sync.bytes_sent, "syncs": sync.syncs,
                     "residual_bytes": mem["codec"]["residual_bytes"], "grad_bytes": mem["grad_bytes"]}
    dist.destroy_process_group()
    return out


def reference(name: str) -> tuple[list[list[torch.Tensor]], list[bool], int]:
    """(every worker's parameters after STEPS, sent-per-step flags, applied syncs) for case ``name``."""
    period, frags, delay, alpha, spec = CASES[name]
    d = period // frags if delay is None else delay
    cfg = _config(name)
    bounds = fragment_bounds([w.numel() for w in _init()], frags)
    local = [_init() for _ in range(WORLD)]

    def flat(ws: list[torch.Tensor], f: int) -> torch.Tensor:
        return torch.cat([w.reshape(-1) for w in ws[bounds[f][0]:bounds[f][1]]])

    glob = [flat(local[0], f).clone() for f in range(frags)]
    bufs: list[torch.Tensor | None] = [None] * frags
    codecs = [from_spec(spec) for _ in range(WORLD)] if spec else []
    rounds, next_send = [0] * frags, [(f + 1) * (period // frags) for f in range(frags)]
    pending: dict[int, tuple[int, torch.Tensor]] = {}
    sent, applied = [], 0

    def apply(f: int) -> None:
        nonlocal applied
        _, avg = pending.pop(f)
        bufs[f] = avg.clone() if bufs[f] is None else cfg.outer_momentum * bufs[f] + avg
        glob[f] = glob[f] - cfg.outer_lr * (avg + cfg.outer_momentum * bufs[f])
        for ws in local:
            off = 0
            for i in range(*bounds[f]):
                g = glob[f][off:off + ws[i].numel()].view_as(ws[i])
                ws[i] = alpha * ws[i] + (1 - alpha) * g
                off += ws[i].numel()
        applied += 1

    for t in range(1, STEPS + 1):
        local = [[w - LR * g for w, g in zip(ws, _grads(ws, r, t - 1))] for r, ws in enumerate(local)]
        for f in sorted(f for f, (at, _) in pending.items() if at <= t):
            apply(f)
        due = [f for f in range(frags) if next_send[f] == t]
        for f in due:
            deltas = [glob[f] - flat(ws, f) for ws in local]
            if spec:
                ctx = CodecContext((deltas[0].numel(),), torch.float64, f"outer/f{f}:{deltas[0].numel()}", rounds[f], cfg.seed)
                avg = average_payloads(codecs[0], [c.encode(dl, ctx) for c, dl in zip(codecs, deltas)], ctx)
            else:
                avg = sum(deltas) / WORLD
            pending[f] = (t + d, avg.reshape(-1))
            rounds[f] += 1
            next_send[f] = t + period
            if d == 0:
                apply(f)
        sent.append(bool(due))
    return local, sent, applied


@pytest.fixture(scope="module", params=["gloo", "zmq"])
def results(request: pytest.FixtureRequest) -> list[dict]:
    return run_world(_worker, WORLD, request.param, timeout=240)


@pytest.mark.parametrize("name", list(CASES))
def test_streaming_sync_matches_single_process_reference(results: list[dict], name: str) -> None:
    ref, sent, applied = reference(name)
    for rank in range(WORLD):
        got = results[rank][name]
        for w, r in zip(got["w"], ref[rank]):
            torch.testing.assert_close(torch.from_numpy(w), r, rtol=1e-9, atol=1e-9)
        assert got["sent"] == sent
        assert got["syncs"] == applied
    # The ranks ended unequal (local progress since the last merge), but all merged the same averages.
    period, _, delay, alpha, _ = CASES[name]
    if delay == 0 and alpha == 0.0 and STEPS % period == 0:
        torch.testing.assert_close(torch.from_numpy(results[0][name]["w"][0]), torch.from_numpy(results[1][name]["w"][0]))


def test_outer_all_reduce_stays_in_flight_between_steps(results: list[dict]) -> None:
    # delay >= 1: after a send step the result is not applied yet; delay 0: never in flight.
    got = results[0]
    assert max(got["diloco_blocking"]["in_flight"]) == 0
    for name in ("exact_two_fragments", "int8_ef", "topk_ef_full_delay"):
        flags, counts = got[name]["sent"], got[name]["in_flight"]
        assert all(c >= 1 for s, c in zip(flags, counts) if s), (name, flags, counts)


def test_compressed_pseudo_gradients_are_smaller_and_residuals_bounded(results: list[dict]) -> None:
    got = results[0]
    n = sum(torch.Size(s).numel() for s in SHAPES)
    syncs_exact, syncs_int8 = got["exact_two_fragments"]["syncs"], got["int8_ef"]["syncs"]
    exact_per_sync = got["exact_two_fragments"]["bytes"] / (syncs_exact + got["exact_two_fragments"]["final_in_flight"])
    int8_per_sync = got["int8_ef"]["bytes"] / (syncs_int8 + got["int8_ef"]["final_in_flight"])
    assert int8_per_sync < 0.6 * exact_per_sync  # 1 byte + a float32 scale per block instead of 8 bytes
    for name in ("int8_ef", "qsgd4bit_ef", "topk_ef_full_delay"):
        assert got[name]["residual_bytes"] == n * 8 == got[name]["grad_bytes"]  # one float64 residual per element
    assert got["exact_two_fragments"]["residual_bytes"] == 0


# --- configuration (one process) -----------------------------------------------------------------

@pytest.mark.unit
def test_fragments_are_contiguous_balanced_and_never_empty() -> None:
    assert fragment_bounds([4, 3, 1], 2) == [(0, 1), (1, 3)]
    assert fragment_bounds([10, 10, 10, 10], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert fragment_bounds([1, 1, 100], 3) == [(0, 1), (1, 2), (2, 3)]  # forced cuts keep one parameter each
    assert fragment_bounds([5, 5, 5], 1) == [(0, 3)]
    with pytest.raises(ValueError, match="at most 3 fragments"):
        fragment_bounds([1, 2, 3], 4)


@pytest.mark.unit
@pytest.mark.parametrize("kwargs,match", [
    ({"period": 2, "fragments": 4}, "period: expected >= fragments"),
    ({"period": "often"}, "expected an integer or 'auto'"),
    ({"period": 8, "delay": 9}, "0 <= delay <= period"),
    ({"mixing": 1.0}, "0 <= mixing < 1"),
    ({"codec": "int9+ef"}, "int9"),
    ({"memory_copies": 0.0}, "budget > 0"),
])
def test_bad_configuration_is_refused_with_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        StreamingConfig(**kwargs)


# --- period="auto" --------------------------------------------------------------------------------

@pytest.mark.unit
def test_period_rule_grows_with_the_all_reduce_time_and_respects_bounds() -> None:
    rule = PeriodRule(fragments=2, period_min=4, period_max=64, safety=1.5)
    step = 0.05
    periods = [rule.choose(comm, step, current=8) for comm in (0.001, 0.05, 0.2, 0.8, 5.0)]
    assert periods == [4, 4, 12, 48, 64]  # 2 * ceil(1.5 * comm / step), clamped to [4, 64]
    assert periods == sorted(periods)
    assert rule.choose(0.0, step, current=8) == 8  # not measured yet: keep the period
    assert PeriodRule(fragments=3, period_min=4, period_max=100).choose(1.0, 0.1, 4) == 45  # multiple of P
    with pytest.raises(ValueError, match="period_min >= fragments"):
        PeriodRule(fragments=4, period_min=2)


class _SlowLink:
    """An emulated slow link: completes each exchange ``delay_s`` after the real one (a timer thread)."""

    def __init__(self, inner: object, delay_s: float) -> None:
        self.inner, self.delay_s, self.size = inner, delay_s, inner.size  # type: ignore[attr-defined]

    def _later(self, fut: torch.futures.Future) -> torch.futures.Future:
        out: torch.futures.Future = torch.futures.Future()
        fut.add_done_callback(lambda f: threading.Timer(self.delay_s, out.set_result, (f.value(),)).start())
        return out

    def allreduce(self, tensor: torch.Tensor) -> torch.futures.Future:
        return self._later(self.inner.allreduce(tensor))  # type: ignore[attr-defined]

    def allgather(self, encoded: object) -> torch.futures.Future:
        return self._later(self.inner.allgather(encoded))  # type: ignore[attr-defined]


def _auto_worker(rank: int, world: int, backend: str) -> dict:
    import time

    from commlayer.sync import StreamingDiLoCo

    dist.init_process_group(backend)
    out = {}
    for link, delay_s in (("fast", 0.0), ("slow", 0.6)):
        ws = [torch.nn.Parameter(w) for w in _init()]
        opt = torch.optim.SGD(ws, lr=LR)
        sync = StreamingDiLoCo(ws, StreamingConfig(period="auto", fragments=1, codec="int8+ef", period_min=2, period_max=64))
        if delay_s:
            sync.exchange = _SlowLink(sync.exchange, delay_s)  # type: ignore[assignment]
        for step in range(40):
            time.sleep(0.03)  # the inner step's compute
            _loss(list(ws), rank, step).backward()
            opt.step()
            opt.zero_grad()
            sync.step()
        sync.flush()
        out[link] = {"decisions": sync.decisions, "period": sync.period}
    dist.destroy_process_group()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", "zmq"])
def test_auto_period_is_agreed_and_grows_on_a_slower_link(backend: str) -> None:
    res = run_world(_auto_worker, 2, backend, timeout=240)
    rule = StreamingConfig(period="auto", period_min=2, period_max=64).rule
    for link in ("fast", "slow"):
        assert res[0][link] == res[1][link]  # every rank adopted the same periods at the same steps
        prev = 2
        for d in res[0][link]["decisions"]:
            assert d["period"] == rule.choose(d["comm_s"], d["step_s"], prev)
            prev = d["period"]
    fast, slow = res[0]["fast"]["period"], res[0]["slow"]["period"]
    assert slow >= 2 * fast and slow >= 10, (fast, slow, res[0]["slow"]["decisions"])
