from __future__ import annotations

import pytest

from multiproc import run_world


def _echo(rank: int, world_size: int, base: int) -> int:
    return base + rank * world_size


def _boom(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one fails")


def test_run_world_collects_results() -> None:
    assert run_world(_echo, 3, 10, timeout=60) == [10, 13, 16]


def test_run_world_reports_failure() -> None:
    with pytest.raises(AssertionError, match="rank one fails"):
        run_world(_boom, 2, timeout=60)
