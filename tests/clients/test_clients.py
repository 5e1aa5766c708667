"""Real torch clients on ``zmq`` and on gloo, side by side: same results (2 ranks, a few steps)."""

from __future__ import annotations

from typing import Any

import pytest
import numpy as np

from commlayer.testing.launch import run_world

import clients

WORLD = 2


def _both(fn: Any, *args: Any, timeout: float = 240.0) -> tuple[list[Any], list[Any]]:
    zmq = run_world(fn, WORLD, "zmq", *args, timeout=timeout)
    gloo = run_world(fn, WORLD, "gloo", *args, timeout=timeout)
    return zmq, gloo


def _same(a: Any, b: Any, atol: float = 0.0, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], atol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, atol, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=path)
    else:
        assert a == b, path


def test_ddp_matches_gloo() -> None:
    zmq, gloo = _both(clients.ddp)
    _same(zmq, gloo)
    _same(zmq[0], zmq[1])


def test_fsdp2_dcp_and_full_state_broadcast(tmp_path: Any) -> None:
    zmq = run_world(clients.fsdp2, WORLD, "zmq", str(tmp_path / "zmq"), timeout=240)
    gloo = run_world(clients.fsdp2, WORLD, "gloo", str(tmp_path / "gloo"), timeout=240)
    assert zmq[0]["devices"] == ["cpu"]
    for r in range(WORLD):
        _same(zmq[r]["full"], gloo[r]["full"])
        _same(zmq[r]["resumed"], zmq[r]["full"])      # DCP save + load restores the trained model
        _same(zmq[r]["broadcast"], zmq[r]["full"])    # rank 0's full state reached every shard


def test_fsdp1_sharded_state_dict() -> None:
    zmq, gloo = _both(clients.fsdp1_sharded)
    _same(zmq, gloo)


def test_tensor_parallel_matches_gloo() -> None:
    zmq, gloo = _both(clients.tensor_parallel)
    _same(zmq, gloo, atol=1e-6)
    _same(zmq[0], zmq[1])


@pytest.mark.slow
def test_functional_collectives_under_compile() -> None:
    zmq, gloo = _both(clients.funcol_compile, timeout=280)
    _same(zmq, gloo)
    for r in zmq:
        _same(r["compiled"], r["eager"])


def test_lightning_ddp_matches_gloo(tmp_path: Any) -> None:
    zmq, gloo = _both(clients.lightning, str(tmp_path))
    _same(zmq, gloo)


def test_accelerate_matches_gloo() -> None:
    zmq, gloo = _both(clients.accelerate)
    _same(zmq, gloo)
    assert zmq[0][-1].tolist() == [0.0, 1.0]
