"""The codec aggregation protocol (commlayer.codecs.aggregate): every mode against numpy, sparse
payloads summed with index_add_ against dense decodes, and the torch.distributed implementation
(TorchExchange in the DDP hook) returning its future before the collective completes (gloo)."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pytest
import torch

from commlayer.codecs import Codec, CodecContext, Encoded, from_spec
from commlayer.codecs.base import as_array, from_buffer
from commlayer.codecs.aggregate import acc_dtype, aggregate, average_payloads, sum_decoded, valid_aggregations
from commlayer.codecs.base import torch_generator
from multiproc import run_world


class _Rendezvous:
    """p in-process ranks: a collective completes when the last rank has contributed (rank order sums).

    The real exchanges (topologies, torch.distributed, the PS server) are tested over real sockets
    elsewhere; this one lets one process run p ranks of the protocol and see it never block.
    """

    def __init__(self, p: int) -> None:
        self.p = p
        self.calls: dict[tuple[str, int], dict[int, object]] = {}
        self.futs: dict[tuple[str, int], dict[int, torch.futures.Future]] = {}

    def exchange(self, rank: int) -> "_Exchange":
        return _Exchange(self, rank)

    def contribute(self, kind: str, n: int, rank: int, value: object) -> torch.futures.Future:
        key = (kind, n)
        fut: torch.futures.Future = torch.futures.Future()
        self.calls.setdefault(key, {})[rank] = value
        self.futs.setdefault(key, {})[rank] = fut
        if len(self.calls[key]) == self.p:
            vals = [self.calls[key][r] for r in range(self.p)]
            if kind == "sum":
                total = vals[0].clone()  # type: ignore[union-attr]
                for v in vals[1:]:
                    total += v  # type: ignore[operator]
                out = [total.clone() for _ in range(self.p)]
            else:
                out = [list(vals) for _ in range(self.p)]
            for r in range(self.p):
                self.futs[key][r].set_result(out[r])
        return fut


class _Exchange:
    def __init__(self, rv: _Rendezvous, rank: int) -> None:
        self.rv, self.rank, self.size = rv, rank, rv.p
        self._n = 0

    def allreduce(self, t: torch.Tensor) -> torch.futures.Future:
        self._n += 1
        return self.rv.contribute("sum", self._n, self.rank, t)

    def allgather(self, enc: Encoded) -> torch.futures.Future:
        self._n += 1
        return self.rv.contribute("gather", self._n, self.rank, enc)


def _inputs(p: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for _ in range(p)]


def _run(spec: "str | Callable[[], Codec]", xs: list[torch.Tensor], mode: str | None = None, average: bool = True,
         shape: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    p = len(xs)
    rv = _Rendezvous(p)
    futs, flats = [], []
    for r, x in enumerate(xs):
        codec = from_spec(spec) if isinstance(spec, str) else spec()  # each rank its own instance (its own state)
        flat = x.reshape(-1).clone()
        ctx = CodecContext(shape or (flat.numel(),), torch.float32, "k", 3, 11)
        futs.append(aggregate(codec, flat, ctx, rv.exchange(r), mode, average))
        flats.append(flat)
        if r < p - 1 and p > 1:
            assert not futs[-1].done(), "the protocol must return before the exchange completes"
    assert all(f.done() for f in futs)
    return [f.value() for f in futs]


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("average", [True, False])
def test_allreduce_mode_matches_numpy(p: int, average: bool) -> None:
    xs = _inputs(p, (300,))
    ref = np.stack([x.numpy().astype(np.float64) for x in xs]).sum(0) / (p if average else 1)
    for spec, tol in (("identity", 1e-5), ("fp16", 5e-3)):
        outs = _run(spec, xs, "allreduce", average)
        for out in outs:
            assert torch.equal(out, outs[0])
            np.testing.assert_allclose(out.numpy(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_randomk_allreduce_keeps_the_shared_coordinates(p: int) -> None:
    xs = _inputs(p, (400,), 1)
    outs = _run("randomk:ratio=0.1", xs, "allreduce")
    kept = np.flatnonzero(outs[0].numpy())
    assert len(kept) == 40  # the 10 % coordinates every rank drew from the shared seed
    ref = np.stack([x.numpy() for x in xs]).astype(np.float64).mean(0)
    np.testing.assert_allclose(outs[0].numpy()[kept], ref[kept], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("average", [True, False])
def test_allgather_mode_matches_numpy_topk(p: int, average: bool) -> None:
    xs = _inputs(p, (257,), 2)
    k = 65  # ceil(0.25 * 257)
    ref = np.zeros(257)
    for x in xs:
        a = x.numpy()
        idx = np.argsort(-np.abs(a), kind="stable")[:k]
        ref[idx] += a[idx]
    ref /= p if average else 1
    for out in _run("topk:ratio=0.25", xs, "allgather", average):
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_majority_vote_matches_numpy(p: int) -> None:
    xs = _inputs(p, (500,), 3)
    ref = np.sign(np.sign(np.stack([x.numpy() for x in xs])).sum(0))
    for average in (True, False):
        for out in _run("sign:scale=none", xs, None, average):
            assert np.array_equal(out.numpy(), ref)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_powersgd_rounds_match_numpy(p: int) -> None:
    """PowerSGD's result is the rank-2 projection of the mean gradient on span(mean(M) Q0)."""
    n, m, r = 24, 10, 2
    xs = _inputs(p, (n, m), 4)
    ctx = CodecContext((n, m), torch.float32, "k", 3, 11)
    q0 = torch.randn(m, r, generator=torch_generator(ctx, "powersgd"), dtype=torch.float32).numpy().astype(np.float64)
    mean = np.stack([x.numpy().astype(np.float64) for x in xs]).mean(0)
    basis, _ = np.linalg.qr(mean @ q0)
    ref = basis @ basis.T @ mean
    for average in (True, False):
        outs = _run("powersgd:rank=2", xs, "powersgd", average, shape=(n, m))
        for out in outs:
            np.testing.assert_allclose(out.numpy().reshape(n, m), ref * (1 if average else p), rtol=1e-4, atol=1e-4)


SPARSE = ["topk:ratio=0.1", "topk:ratio=0.05,index=delta", "topk:ratio=0.05|int8|lz4", "randomk:ratio=0.2", "dgc:ratio=0.1",
          "threshold:tau=0.5", "topk:ratio=0.1+ef", "randomk:ratio=0.3|fp16"]


@pytest.mark.parametrize("spec", SPARSE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_index_add_sum_equals_dense_decodes(spec: str, dtype: torch.dtype) -> None:
    n, p = 1000, 5
    ctx = CodecContext((n,), dtype, "k", 1, 5)
    payloads = []
    for r in range(p):
        x = torch.from_numpy(np.random.default_rng(r).standard_normal(n)).to(dtype)
        payloads.append(from_spec(spec).encode(x, ctx))
    codec = from_spec(spec)
    assert codec.sparse_parts(payloads[0], ctx) is not None, "a sparse codec must expose (indices, values)"
    dense = torch.zeros(n, dtype=acc_dtype(dtype))
    for e in payloads:
        dense += codec.decode(e, ctx).to(dense.dtype)
    assert torch.equal(sum_decoded(codec, payloads, ctx), dense)


@pytest.mark.parametrize("spec", ["fp16", "int8", "qsgd", "sign", "identity"])
def test_dense_codecs_expose_no_sparse_parts(spec: str) -> None:
    ctx = CodecContext((64,), torch.float32)
    codec = from_spec(spec)
    assert codec.sparse_parts(codec.encode(torch.randn(64), ctx), ctx) is None


def test_reference_and_protocol_agree_on_every_valid_one_shot_mode() -> None:
    p, n = 3, 129
    xs = _inputs(p, (n,), 5)
    for spec in ("fp16", "int8", "topk:ratio=0.1|int8", "sign:scale=none", "qsgd:levels=15"):
        for mode in valid_aggregations(from_spec(spec)):
            scale = p if mode == "allreduce" else 1
            codec = from_spec(spec)
            ctx = CodecContext((n,), torch.float32, "k", 3, 11)
            ref = average_payloads(codec, [from_spec(spec).encode(x / scale, ctx) for x in xs], ctx, mode) * scale
            out = _run(spec, xs, mode)[0]
            tol = 2e-3 if "fp16" in spec else 1e-5
            assert torch.allclose(out, ref, rtol=tol, atol=tol), (spec, mode, float((out - ref).abs().max()))


class _MedianCodec(Codec):
    """A codec that brings its own aggregations, written in this one class: a one-shot coordinate-wise
    median of the gathered payloads, and a two-round "mean then re-centre" protocol."""

    codec_id = "test_median"

    def encode(self, tensor: torch.Tensor, ctx: CodecContext) -> Encoded:
        return Encoded({}, [as_array(tensor.detach().reshape(-1).to(torch.float32))])

    def decode(self, encoded: Encoded, ctx: CodecContext) -> torch.Tensor:
        return from_buffer(encoded.buffers[0], torch.float32, ctx.numel, "median").to(ctx.dtype).reshape(ctx.shape)

    def wire_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return 4 * numel

    def aggregations(self) -> tuple[str, ...]:
        return ("median", "twice", "allgather")

    def combine(self, mode: str, payloads: list[Encoded], ctx: CodecContext) -> torch.Tensor:
        if mode != "median":
            return super().combine(mode, payloads, ctx)
        return torch.stack([self.decode(e, ctx).reshape(-1) for e in payloads]).median(0).values

    def rounds(self, mode, tensors, ctxs, outer=None):  # type: ignore[no-untyped-def]
        if mode != "twice":
            return None

        def gen():  # type: ignore[no-untyped-def]
            mean = yield tensors[0].reshape(-1).to(torch.float32)
            spread = yield (tensors[0].reshape(-1) - mean).abs()  # mean absolute deviation, a second round
            return [mean + spread]
        return gen()


@pytest.mark.parametrize("p", [1, 3, 4])
def test_a_codec_with_its_own_aggregations_needs_no_other_edit(p: int) -> None:
    xs = _inputs(p, (40,), 7)
    stack = np.stack([x.numpy() for x in xs])
    for out in _run(_MedianCodec, xs, "median"):
        np.testing.assert_array_equal(out.numpy(), torch.from_numpy(stack).median(0).values.numpy())
    mean = stack.astype(np.float64).mean(0)
    for out in _run(_MedianCodec, xs, "twice"):
        np.testing.assert_allclose(out.numpy(), mean + np.abs(stack - mean).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not valid for codec.*valid: median, twice, allgather"):
        _run(_MedianCodec, xs, "majority_vote")


def test_invalid_mode_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="not valid for codec.*valid: allgather"):
        _run("topk:ratio=0.1", _inputs(2, (10,)), "allreduce")
    with pytest.raises(ValueError, match="Expected an aggregation mode in"):
        _run("fp16", _inputs(2, (10,)), "bogus")


# ---- torch.distributed futures: the DDP hook does not wait for its collectives ------------------
def _hook_worker(rank: int, world: int, spec: str) -> dict:
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commlayer.hooks import CodecHookState, codec_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # > 1 MB of parameters: DDP's rebuilt first bucket holds 1 MB, the rest go to further buckets.
    model = DDP(nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 4)), bucket_cap_mb=0.25)
    state = CodecHookState.from_spec(spec, seed=1, start_iter=0)
    record: list[dict] = []

    def hook(s, bucket):  # type: ignore[no-untyped-def]  # unannotated: DDP rejects string annotations
        before = bucket.buffer().clone()
        fut = codec_hook(s, bucket)
        entry = {"index": bucket.index(), "input": before.numpy(), "done_at_return": fut.done()}
        record.append(entry)

        def keep(f):  # type: ignore[no-untyped-def]
            entry["output"] = f.value().clone().numpy()
            return f.value()

        return fut.then(keep)

    model.register_comm_hook(state, hook)
    g = torch.Generator().manual_seed(rank)
    for it in range(2):  # DDP rebuilds its buckets after the first iteration: the second has several
        record.clear()
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)  # rank-specific: gradients differ
        loss = nn.functional.mse_loss(model(x), y)
        dist.barrier()
        if rank == 1:
            time.sleep(1.5)  # rank 0's hooks return while rank 1 has not joined any collective yet
        loss.backward()
    _KEEP.append(model)  # see tests/test_hooks.py::_KEEP: freeing it here can deadlock torch's gloo teardown
    dist.destroy_process_group()
    return {"record": record, "mode": state.resolved_mode}


_KEEP: list[nn.Module] = []


@pytest.mark.parametrize("spec", ["topk:ratio=0.25", "powersgd:rank=1", "sign:scale=none"])
def test_hook_returns_its_future_before_the_collective_completes(spec: str) -> None:
    res = run_world(_hook_worker, 2, spec, timeout=180)
    assert res[0]["mode"] != "allreduce"
    rec0 = res[0]["record"]
    assert len(rec0) >= 2, "the model must span several buckets"
    assert all(not e["done_at_return"] for e in rec0), [e["done_at_return"] for e in rec0]
    by_index = [{e["index"]: e for e in r["record"]} for r in res]
    for i, e0 in by_index[0].items():
        e1 = by_index[1][i]
        assert np.array_equal(e0["output"], e1["output"])  # every rank holds the same aggregate
        if spec.startswith("topk"):
            ref = np.zeros_like(e0["input"], dtype=np.float64)
            for e in (e0, e1):
                k = int(np.ceil(0.25 * e["input"].size - 1e-9))
                idx = np.argsort(-np.abs(e["input"]), kind="stable")[:k]
                ref[idx] += e["input"][idx]
            np.testing.assert_allclose(e0["output"], ref / 2, rtol=1e-6, atol=1e-7)
        elif spec.startswith("sign"):
            assert np.array_equal(e0["output"], np.sign(np.sign(e0["input"]) + np.sign(e1["input"])))


# ---- the parameter server's sync optimizer aggregates a clock through the same protocol ------------
def test_ps_sync_step_aggregates_payloads_like_numpy() -> None:
    from commlayer.topologies.ps_optimizer import Shard

    n = 50
    xs = _inputs(3, (n,), 6)
    ctx = CodecContext((n,), torch.float32, "grad/0", 0, 0)
    for spec, ref in (("sign:scale=none", np.sign(np.sign(np.stack([x.numpy() for x in xs])).sum(0))),
                      ("topk:ratio=0.2", None)):
        sh = Shard("sync")
        sh.init(torch.zeros(n), "sgd", 1.0, {})
        for w, x in enumerate(xs):
            sh.on_grad(w, 0, (spec, from_spec(spec), from_spec(spec).encode(x, ctx), ctx))
        sh.sync_steps([0, 1, 2])
        assert sh.version == 1
        if ref is None:  # mean of each worker's top-20 %
            ref = np.zeros(n)
            for x in xs:
                idx = np.argsort(-np.abs(x.numpy()), kind="stable")[:10]
                ref[idx] += x.numpy()[idx] / 3
        np.testing.assert_allclose(sh.params.detach().numpy(), -ref, rtol=1e-6, atol=1e-7)  # one SGD step, lr 1
