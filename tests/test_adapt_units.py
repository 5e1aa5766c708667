"""Adaptation layer without processes: estimators, cost model, ring order, policies, metrics, CLI args."""

from __future__ import annotations

import json
import math

import pytest

from commlayer.adapt import policy as pol
from commlayer.adapt.cost import (CodecProfile, CostParams, allreduce_time, direct_allgather_time, gossip_time, ps_time,
                                  recursive_doubling_time, ring_allreduce_time)
from commlayer.adapt.estimator import Ewma, LinkMatrixSnapshot, LinkState, install_hooks
from commlayer.adapt.metrics import MetricsSink, prometheus_text, read_jsonl
from commlayer.adapt.planner import Plan
from commlayer.adapt.ringorder import best_ring_order, bottleneck

MB = 1e6 / 8  # bytes/s per Mbit/s
P = CostParams()


def _slow_pair(p: int = 4, fast: float = 40.0, slow: float = 4.0) -> LinkMatrixSnapshot:
    beta = [[math.inf if i == j else fast * MB for j in range(p)] for i in range(p)]
    beta[0][1] = beta[1][0] = slow * MB
    return LinkMatrixSnapshot.from_lists([[0.0 if i == j else 0.02 for j in range(p)] for i in range(p)], beta)


def test_ewma_follows_a_step_within_a_few_samples() -> None:
    e = Ewma(0.5)
    for _ in range(10):
        e.update(1.0)
    assert e.mean == 1.0 and e.std == 0.0
    e.update(10.0)
    e.update(10.0)
    assert e.mean > 7.0 and e.std > 0
    with pytest.raises(ValueError, match="Expected an EWMA weight"):
        Ewma(0.0)


def test_link_state_probe_and_passive_samples() -> None:
    s = LinkState(0, 3)
    s.set_probe(1, 0, rtt_s=0.05, bandwidth_Bps=20 * MB)
    e = s.estimate(1, 0)
    assert e.latency_s == pytest.approx(0.025) and e.bandwidth_Bps == pytest.approx(20 * MB) and e.source == "probe"
    s.on_recv(1, 1 << 20, 0.025 + (1 << 20) / (10 * MB))  # a 1 MiB message at 10 Mbit/s after the latency
    assert s.achieved_Bps(1, 0) == pytest.approx(10 * MB, rel=1e-6)
    s.on_send(2, 1000, 1e-5)
    c = {(x["src"], x["dst"]): x for x in s.counters()}
    assert c[(1, 0)]["bytes_recv"] == 1 << 20 and c[(0, 2)]["bytes_sent"] == 1000
    with pytest.raises(ValueError, match="Expected a link"):
        s.estimate(1, 1)


def test_install_hooks_chains_and_uninstalls() -> None:
    from commlayer.transport.engine import Transport

    seen = []
    t = Transport(0, 2)
    try:
        mine = lambda p, n, s: seen.append((p, n))  # noqa: E731
        t.add_observer(on_recv=mine)
        state = LinkState(0, 2)
        undo = install_hooks(t, state)
        for obs in t.recv_observers:
            obs(1, 10, 0.0)
        assert seen == [(1, 10)] and state.counters()[0]["bytes_recv"] == 10
        undo()
        assert t.send_observers == [] and t.recv_observers == [mine]
    finally:
        t.close()


def test_ring_is_bound_by_its_slowest_link() -> None:
    uni = LinkMatrixSnapshot.uniform(4, 0.02, 40 * MB)
    n = 8 << 20
    t_uni = ring_allreduce_time(uni, n, None, 1 << 20, P)
    # bandwidth term: 2(p-1)/p * n / bw, plus latency and pipeline fill
    assert t_uni == pytest.approx(1.5 * n / (40 * MB), rel=0.1)
    slow = _slow_pair()
    assert ring_allreduce_time(slow, n, [0, 1, 2, 3], 1 << 20, P) == pytest.approx(1.5 * n / (4 * MB), rel=0.1)
    assert ring_allreduce_time(slow, n, [0, 2, 1, 3], 1 << 20, P) == pytest.approx(t_uni, rel=0.01)


def test_tree_wins_small_ring_wins_large() -> None:
    s = LinkMatrixSnapshot.uniform(4, 0.025, 100 * MB)
    small, large = 16 << 10, 64 << 20
    assert recursive_doubling_time(s, small, P) < ring_allreduce_time(s, small, None, 1 << 20, P)
    assert ring_allreduce_time(s, large, None, 1 << 20, P) < recursive_doubling_time(s, large, P)
    assert recursive_doubling_time(LinkMatrixSnapshot.uniform(3, 0.01, 10 * MB), 1 << 20, P) > 0  # non power of two


def test_ps_and_gossip_costs() -> None:
    s = LinkMatrixSnapshot.uniform(4, 0.01, 10 * MB)
    n = 4 << 20
    assert ps_time(s, n, [0, 1], P) < ps_time(s, n, [0], P)  # more servers, smaller shards
    want = 0.01 + (n + P.msg_wire_bytes) / (10 * MB) + P.msg_overhead_s + n / P.reduce_Bps  # framing rides the link
    assert gossip_time(s, n, [(0, 1), (1, 2), (2, 3), (3, 0)], P) == pytest.approx(want)


def test_codec_cost_includes_encode_decode_and_wire_bytes() -> None:
    s = LinkMatrixSnapshot.uniform(4, 0.01, 10 * MB)
    n = 16 << 20
    fp16 = CodecProfile("fp16", 0.5, 1e9, 1e9, 1e-3, True)
    exact = allreduce_time(s, n, "ring", None, 1 << 20, P)
    assert allreduce_time(s, n, "ring", None, 1 << 20, P, fp16) == pytest.approx(exact / 2 + 2 * n / 1e9, rel=0.05)
    slow_cpu = CodecProfile("fp16", 0.5, 1e6, 1e6, 1e-3, True)
    assert allreduce_time(s, n, "ring", None, 1 << 20, P, slow_cpu) > exact
    gather = CodecProfile("int8", 0.26, 1e9, 1e9, 5e-3, False)
    assert allreduce_time(s, n, "ring", None, 1 << 20, P, gather) > 0
    # "tree" all-gathers non-linear payloads directly (as codec_allreduce does): priced, never an error.
    direct = allreduce_time(s, n, "tree", None, 1 << 20, P, gather)
    assert direct == pytest.approx(n / 1e9 + direct_allgather_time(s, n * 0.26, P) + 4 * n / 1e9)
    with pytest.raises(ValueError, match="Expected algo in .*'ring'.*got 'bogus'"):
        allreduce_time(s, n, "bogus", None, 1 << 20, P, gather)


@pytest.mark.parametrize("p", [4, 6, 10])
def test_ring_order_avoids_slow_links(p: int) -> None:
    s = _slow_pair(p)
    order = best_ring_order(s)
    assert sorted(order) == list(range(p)) and order[0] == 0
    assert bottleneck(s, order) == pytest.approx(40 * MB)
    assert best_ring_order(s) == order  # deterministic


def test_policies_choose_as_the_model_says() -> None:
    s = LinkMatrixSnapshot.uniform(4, 0.02, 10 * MB)
    codecs = [CodecProfile(""), CodecProfile("fp16", 0.5, 2e9, 2e9, 5e-4, True),
              CodecProfile("int8", 0.26, 1e9, 1e9, 4e-3, False)]
    n = 8 << 20
    cands = pol.candidates(s, n, codecs, (256 << 10, 1 << 20), P)
    best, why = pol.choose(cands, pol.Policy(), exact=True)
    assert best.codec.spec == "" and best.algo == "ring" and "fastest exact" in why
    assert best.seconds == min(c.seconds for c in cands if not c.codec.spec)
    best, _ = pol.choose(cands, pol.Policy("error_budget", 1e-3), exact=False)
    assert best.codec.spec == "fp16"
    best, _ = pol.choose(cands, pol.Policy("error_budget", 1e-2), exact=False)
    assert best.seconds == min(c.seconds for c in cands)  # int8 admitted; its all-gather (0.78 n) loses to fp16's ring (0.75 n)
    # hide: enough compute to hide fp16 but not exact -> fp16 (least error that fits)
    t_fp16 = min(c.seconds for c in cands if c.codec.spec == "fp16")
    best, why = pol.choose(cands, pol.Policy("hide", 1e-2, compute_s=t_fp16 * 1.01), exact=False)
    assert best.codec.spec == "fp16" and "hidden" in why
    small = pol.candidates(s, 4 << 10, [CodecProfile("")], (256 << 10,), P)
    assert pol.choose(small, pol.Policy(), exact=True)[0].algo == "tree"
    with pytest.raises(ValueError, match="Expected policy mode"):
        pol.Policy("fast")


def test_plan_tag_changes_with_any_field() -> None:
    a = Plan(1, "ring", 1 << 20, None, "", 1, 0.1, "x")
    assert a.tag == Plan(1, "ring", 1 << 20, None, "", 1, 0.5, "y").tag  # prediction/reason do not matter
    for b in (Plan(2, "ring", 1 << 20, None, "", 1, 0.1), Plan(1, "tree", 1 << 20, None, "", 1, 0.1),
              Plan(1, "ring", 1 << 16, None, "", 1, 0.1), Plan(1, "ring", 1 << 20, (0, 2, 1), "", 1, 0.1),
              Plan(1, "ring", 1 << 20, None, "fp16", 1, 0.1)):
        assert b.tag != a.tag


def test_metrics_jsonl_and_prometheus(tmp_path) -> None:
    path = str(tmp_path / "m-{rank}.jsonl")
    sink = MetricsSink(path, rank=3)
    sink.emit("plan", algo="ring", predicted_s=math.inf)
    sink.close()
    ev = read_jsonl(str(tmp_path / "m-3.jsonl"))
    assert ev[0]["event"] == "plan" and ev[0]["rank"] == 3 and ev[0]["predicted_s"] is None
    s = LinkState(0, 2)
    s.set_probe(0, 1, 0.05, 20 * MB)
    text = prometheus_text([e.as_dict() for e in s.estimates()], [], rank=0)
    assert 'commlayer_link_bandwidth_bytes{rank="0",src="0",dst="1"} 2.5e+06' in text
    json.dumps(s.estimates()[0].as_dict())


def test_cli_probe_rejects_one_rank(capsys) -> None:
    from commlayer.cli import main

    assert main(["probe", "--nproc", "1"]) == 2
    assert "--nproc: expected >= 2" in capsys.readouterr().err


# ---- chunk size: the per-message framing decides where pipelining buys nothing (issue 11) ----------------------
def _ring_reference(s: LinkMatrixSnapshot, nbytes: int, chunk: int, params: CostParams) -> float:
    """The pipelined ring all-reduce priced message by message (no merging of chunks, ragged last chunk), pulled
    through its dependency graph: a message leaves when its data was reduced and its link is free (FIFO by
    step, then chunk); a rank handles what it receives in the same order."""
    import functools

    p = s.size
    S, R = 2 * (p - 1), p - 1
    block = nbytes // p
    K = max(1, math.ceil(block / chunk))
    size = [min(chunk, block - j * chunk) for j in range(K)]

    @functools.lru_cache(maxsize=None)
    def sent(k: int, t: int, j: int) -> float:  # rank k's message of step t, chunk j, fully on its link
        ready = 0.0 if t == 0 else done(k, t, j)
        before = sent(k, t, j - 1) if j else (sent(k, t - 1, K - 1) if t else 0.0)
        return max(before, ready) + (size[j] + params.msg_wire_bytes) / s.beta[k][(k + 1) % p]

    @functools.lru_cache(maxsize=None)
    def done(k: int, t: int, j: int) -> float:  # rank k has handled what it received in step t, chunk j
        arrive = sent((k - 1) % p, t - 1, j) + s.alpha[(k - 1) % p][k]
        before = done(k, t, j - 1) if j else (done(k, t - 1, K - 1) if t > 1 else 0.0)
        work = size[j] / params.reduce_Bps if t <= R else size[j] / params.copy_Bps
        return max(before, arrive) + params.msg_overhead_s + work

    for t in range(S + 1):  # fill the caches in time order, so the recursion stays shallow
        for k in range(p):
            for j in range(K):
                done(k, t, j) if t else sent(k, t, j)
    return max(done(k, S, K - 1) for k in range(p))


CHUNKS = (64 << 10, 256 << 10, 1 << 20, 4 << 20)
SCENARIOS = {  # name: (snapshot, all_reduce bytes)
    "bloat2m 2 MiB": (LinkMatrixSnapshot.uniform(4, 0.002, 2 * MB), 2 << 20),
    "bloat2m 8 MiB": (LinkMatrixSnapshot.uniform(4, 0.002, 2 * MB), 8 << 20),
    "2 Mbit/s, 3 s latency": (LinkMatrixSnapshot.uniform(4, 3.0, 2 * MB), 2 << 20),
    "slow pair": (_slow_pair(), 8 << 20),
    "fast LAN": (LinkMatrixSnapshot.uniform(4, 5e-5, 10e3 * MB), 8 << 20),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ring_cost_matches_the_message_by_message_reference(name: str) -> None:
    s, n = SCENARIOS[name]
    for c in CHUNKS:
        if math.ceil(n / 4 / c) <= P.max_sim_chunks:  # merged chunks are an approximation, checked below
            assert ring_allreduce_time(s, n, None, c, P) == pytest.approx(_ring_reference(s, n, c, P), rel=1e-9), c
    assert ring_allreduce_time(s, 64 << 20, None, 64 << 10, P) == pytest.approx(_ring_reference(s, 64 << 20, 64 << 10, P), rel=0.02)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_planner_chunk_is_the_reference_optimum(name: str) -> None:
    """The plan's chunk is the one the message-by-message reference finds fastest among the sizes the planner
    may use (a brute force over them), to 0.01 %."""
    s, n = SCENARIOS[name]
    cands = [c for c in pol.candidates(s, n, [CodecProfile("")], CHUNKS, P) if c.algo == "ring" and c.order is None]
    best, _ = pol.choose(cands, pol.Policy(), exact=True)
    ref = {c: _ring_reference(s, n, c, P) for c in CHUNKS}
    fastest = min(ref.values())
    assert ref[best.chunk_bytes] <= fastest * (1 + 1e-4), (best.chunk_bytes, ref)


def test_bigger_chunks_win_where_pipelining_buys_nothing_and_smaller_where_links_wait() -> None:
    bloat, n = SCENARIOS["bloat2m 2 MiB"]
    # a bandwidth-bound ring keeps every link busy: the time is S x K messages of framing + payload, in closed form
    S, block = 6, n / 4
    for c in (64 << 10, 256 << 10):
        k = block / c
        closed = S * k * (c + P.msg_wire_bytes) / bloat.beta[0][1] + bloat.alpha[0][1] + P.msg_overhead_s + c / P.copy_Bps
        assert ring_allreduce_time(bloat, n, None, c, P) == pytest.approx(closed, rel=1e-9)
    plan = {name: pol.choose(pol.candidates(s, m, [CodecProfile("")], CHUNKS, P), pol.Policy(), exact=True)[0]
            for name, (s, m) in SCENARIOS.items()}
    assert plan["bloat2m 2 MiB"].algo == "ring" and plan["bloat2m 2 MiB"].chunk_bytes > 64 << 10
    assert plan["bloat2m 8 MiB"].chunk_bytes > 64 << 10
    assert plan["2 Mbit/s, 3 s latency"].chunk_bytes == 64 << 10  # each step waits 3 s: small chunks fill it
    # without the framing only the last chunk's copy (64 us) tells 64 KiB from 256 KiB, and the most messages won
    bare = CostParams(msg_wire_bytes=0.0)
    t64, t256 = (ring_allreduce_time(bloat, n, None, c, bare) for c in (64 << 10, 256 << 10))
    assert t64 < t256 < t64 * (1 + 1e-5)


def test_msg_wire_bytes_covers_a_ring_chunk_header() -> None:
    from commlayer.transport import envelope
    from commlayer.transport.wire import Call

    h = envelope.collective("allreduce/ring/v12-1a2b3c4d", "pg0", 123456, 3, Call(-1, 1 << 24, "float32", "sum"), step=5,
                            chunk=31, dtype="float32", shape=(1 << 14,), nbytes=(1 << 16,))
    zmtp = 2 + 9  # short frame header of the msgpack header, long frame header of the payload
    assert len(h.pack()) + zmtp <= P.msg_wire_bytes <= 2 * (len(h.pack()) + zmtp)
