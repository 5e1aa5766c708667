"""A compressed all-reduce sends what the simulator replays for it (``collective_steps``).

4 real ranks over real sockets run the plan executor (:func:`commlayer.adapt.execute.run_allreduce`,
what the backend runs) with a codec for every registered algorithm; each rank records its sends
with the transport's send observer. The simulator's description of the same configuration
(:func:`commlayer.sim.scenario.collective_steps`: a linear codec rides the algorithm's own schedule
on its wire bytes, a non-linear one is all-gathered as the algorithm declares) must list the same
destinations in the same order per rank, with the same bytes up to the payload's frame header.
Results are checked against the numpy mean of what the codec would give a single process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from commlayer.topologies import registry
from commlayer.topologies.schedule import sends_by_rank
from multiproc import run_world

WORLD, NUMEL, CHUNK = 4, 4000, 4096   # 4 000 floats: fp16 blocks of 2 000 B split into 2 chunks of the ring
ORDER = [2, 0, 3, 1]
CODECS = ("fp16", "int8+ef", "topk:ratio=0.05+ef")
HEADER_SLACK = 64                     # bytes of a payload's frame header beyond its codec wire bytes


def _record(rank: int, world: int) -> dict[str, Any]:
    import torch

    from commlayer.adapt.execute import CodecCache, run_allreduce
    from commlayer.adapt.planner import Plan
    from commlayer.topologies import World
    from commlayer.topologies.reduce_ops import ReduceOp

    torch.set_num_threads(1)
    w = World.from_env(timeout=60)
    sent: list[tuple[int, int]] = []

    def on_send(peer: int, nbytes: int, _s: float) -> None:
        sent.append((peer, nbytes))

    out: dict[str, Any] = {}
    codecs = CodecCache()
    try:
        group = w.group("csched")
        for algo in registry.names():
            for spec in CODECS:
                order = tuple(ORDER) if registry.get(algo).uses_order else None
                x = torch.linspace(-1.0, 1.0, NUMEL) * (rank + 1)
                w.barrier()
                sent.clear()
                w.transport.add_observer(on_send=on_send)
                run_allreduce(group, x, ReduceOp.AVG, Plan(0, algo, CHUNK, order, spec, 1, 0.0), codecs, key=f"{algo}|{spec}")
                w.transport.remove_observer(on_send=on_send)
                out[f"{algo}|{spec}"] = {"sent": list(sent), "result": x.numpy().tolist()}
        w.barrier()
    finally:
        w.close()
    return out


def _single_process_mean(spec: str) -> np.ndarray:
    import torch

    from commlayer.codecs import CodecContext, from_spec

    ctx = CodecContext((NUMEL,), torch.float32, key="ref")
    outs = []
    for r in range(WORLD):
        c = from_spec(spec)  # a first call: no error-feedback residual yet, as in the real run
        x = torch.linspace(-1.0, 1.0, NUMEL) * (r + 1)
        outs.append(c.decode(c.encode(x / WORLD if c.aggregations()[0] == "allreduce" else x, ctx), ctx).double().numpy())
    mean = np.sum(outs, axis=0)
    return mean if from_spec(spec).aggregations()[0] == "allreduce" else mean / WORLD


def test_compressed_allreduce_sends_match_the_simulated_steps() -> None:
    from commlayer.adapt.execute import measure_codec
    from commlayer.sim.scenario import Scenario, collective_steps

    got = run_world(_record, WORLD, timeout=200, env={"COMMLAYER_PS_SERVERS": "1"})
    checked = 0
    for algo in registry.names():
        for spec in CODECS:
            prof = measure_codec(spec, numel=NUMEL, repeats=1)
            order = ORDER if registry.get(algo).uses_order else None
            steps, _ = collective_steps(Scenario(algo, NUMEL * 4, prof, chunk_bytes=CHUNK), WORLD, order)
            want = sends_by_rank(list(steps), WORLD)
            for r in range(WORLD):
                real = got[r][f"{algo}|{spec}"]["sent"]
                where = f"{algo} {spec} rank {r}: sent {real[:6]}..., simulated {want[r][:6]}..."
                assert [d for d, _ in real] == [d for d, _ in want[r]], where
                for (_, n_real), (_, n_sim) in zip(real, want[r]):
                    assert 0 <= n_real - n_sim <= (HEADER_SLACK if not prof.linear else 0), where
                checked += len(real)
                # every rank holds what one process gets by decoding every rank's payload and averaging
                res = np.array(got[r][f"{algo}|{spec}"]["result"])
                np.testing.assert_allclose(res, _single_process_mean(spec), rtol=2e-3, atol=2e-3, err_msg=f"{algo} {spec}")
                np.testing.assert_array_equal(res, got[0][f"{algo}|{spec}"]["result"])  # bitwise identical on every rank
    assert checked > 0


@pytest.mark.parametrize("spec", CODECS)
def test_the_profile_says_which_codecs_ride_the_algorithm(spec: str) -> None:
    from commlayer.adapt.execute import measure_codec
    from commlayer.codecs import aggregation_mode, from_spec

    assert measure_codec(spec, numel=NUMEL, repeats=1).linear == (aggregation_mode(from_spec(spec)) == "allreduce")


@pytest.mark.parametrize("spec", CODECS)
def test_the_validation_prices_codecs_as_the_operation_runs_them(spec: str) -> None:
    import torch

    from commlayer.codecs import aggregation_mode, from_spec
    from commlayer.sim.validate import op_codec_profile

    prof = op_codec_profile(spec, NUMEL, WORLD, reps=2)
    codec = from_spec(spec)
    assert prof.ratio == codec.wire_bytes(NUMEL, torch.float32) / (NUMEL * 4)
    assert prof.linear == (aggregation_mode(codec) == "allreduce")
    assert 0 < prof.encode_Bps < float("inf") and 0 < prof.decode_Bps < float("inf")
