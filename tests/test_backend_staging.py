"""Host staging (the path CUDA tensors take) on real processes, with a rule that stages CPU tensors."""

from __future__ import annotations

import pytest

import torch

from commlayer.backend import staging
from multiproc import run_world

import staging_worker


def test_staged_operations_complete_after_the_copy_back() -> None:
    results = run_world(staging_worker.run, 2, timeout=120)
    for rank, res in enumerate(results):
        assert res["allreduce"] == [3.0] * 5
        assert res["future_is_original"]
        assert res["allgather"] == [[0.0] * 3, [1.0] * 3]
    assert "sent 4 x float32" in results[1]["error"], results[1]["error"]
    assert results[1]["untouched"] == [-1.0] * 3


def test_only_off_host_tensors_are_staged() -> None:
    assert not staging.needs_staging(([torch.ones(2)], torch.zeros(1), 3))
    meta = torch.empty(2, device="meta")  # not host memory: would be staged
    assert staging.needs_staging(([torch.ones(2), meta],))


@pytest.mark.unit
def test_a_waited_work_has_a_complete_future() -> None:
    """Work completed from another thread: once wait() returns, the future asked for before is complete too
    (it was completed after the wait could return, so ``fut.value()`` raised a torch internal assert)."""
    import threading

    from commlayer.backend.work import ZmqWork

    for i in range(300):
        w = ZmqWork([], "op", 5.0)
        fut = w.get_future()
        out = [torch.full((2,), float(i))]
        t = threading.Thread(target=w.set_done, args=(out,))
        t.start()
        w.wait()
        assert fut.done() and fut.value()[0] is out[0]
        t.join(5)
