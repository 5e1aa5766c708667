from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _env_of(rank: int, world_size: int) -> tuple[str, str, str]:
    import os

    return os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ.get("EXTRA", "")


def _exit_silently(rank: int, world_size: int) -> int:
    import os

    if rank == 1:
        os._exit(3)  # dies without reporting
    return rank


def _hang(rank: int, world_size: int) -> None:
    import time

    time.sleep(60)


def test_run_world_sets_torchrun_env_and_per_rank_env() -> None:
    out = run_world(_env_of, 2, env={"EXTRA": "all"}, envs=[{}, {"EXTRA": "one"}], timeout=60)
    assert out == [("0", "2", "all"), ("1", "2", "one")]


def test_run_world_reports_a_rank_that_died_without_reporting() -> None:
    out = run_world(_exit_silently, 2, timeout=60, allow_failures=True)
    assert out[0] == 0 and out[1] == "ERROR: process exited with code 3 without reporting"


def test_run_world_times_out_and_leaves_nothing_behind() -> None:
    with pytest.raises(TimeoutError, match="timed out after 3"):
        run_world(_hang, 2, timeout=3)


def test_run_ranks_stops_the_others_after_a_failure() -> None:
    import sys

    from commlayer.testing import run_ranks

    lines: list[tuple[int, str]] = []
    cmds = [[sys.executable, "-c", "print('hello'); raise SystemExit(5)"],
            [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"]]
    res = run_ranks(cmds, [{}, {}], lambda r, line: lines.append((r, line)), timeout_s=40, grace_s=0.5)
    assert res.first_failure == (0, 5) and not res.timed_out
    assert res.codes[0] == 5 and res.codes[1] is None  # still running when stopped, then killed by its group
    assert (0, "hello") in lines and (1, "waiting") in lines


def test_run_ranks_times_out() -> None:
    import sys

    from commlayer.testing import run_ranks

    res = run_ranks([[sys.executable, "-c", "import time; time.sleep(60)"]], [{}], lambda r, line: None, timeout_s=1.0)
    assert res.timed_out and res.codes == [None] and res.first_failure is None


def _env_get(rank: int, world_size: int, name: str) -> str | None:
    import os

    return os.environ.get(name)


def _run(context: str, fn: Any, world: int, *args: Any) -> list[Any]:
    """``fn`` on ``world`` ranks started by spawn (the default) or by the torch-preloaded forkserver."""
    from commlayer.testing.launch import Ranks, preloaded_context

    w = Ranks(fn, world, *args, context=preloaded_context() if context == "forkserver" else context, pass_events=False).start()
    try:
        got = w.wait_for("result", list(range(world)), 60)
    finally:
        w.close()
    assert all(k == "result" for k, _ in got.values()), got
    return [got[r][1] for r in range(world)]


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_ranks_see_the_parents_environment_at_start_not_the_forkservers(context: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked ranks come from a server started earlier; each must still get the parent's environment as it is now."""
    assert _run(context, _env_get, 1, "HOME")[0]  # the forkserver runs, with HOME set
    monkeypatch.setenv("COMMLAYER_TEST_LATE_VAR", "late")
    monkeypatch.delenv("HOME")
    assert _run(context, _env_get, 2, "COMMLAYER_TEST_LATE_VAR") == ["late", "late"]
    assert _run(context, _env_get, 1, "HOME") == [None]


def _leave_with_atexit(rank: int, world_size: int, path: str) -> int:
    import atexit
    from pathlib import Path

    atexit.register(lambda: Path(path).write_text(f"rank {rank} exited cleanly"))
    return rank


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_ranks_run_their_atexit_handlers(context: str, tmp_path: Path) -> None:
    """A rank leaves as a spawned interpreter would: its atexit handlers (e.g. commlayer closing live groups) run."""
    assert _run(context, _leave_with_atexit, 1, str(tmp_path / "flag")) == [0]
    assert (tmp_path / "flag").read_text() == "rank 0 exited cleanly"
