"""Runs torch's own distributed test suite (shipped in the wheel) against a backend.

    python tests/torch_suite/run_torch_suite.py                  # BACKEND=zmq, WORLD_SIZE=3, all tests
    BACKEND=gloo python tests/torch_suite/run_torch_suite.py     # the same suite on gloo, for comparison
    python tests/torch_suite/run_torch_suite.py -k test_all_reduce -v

The upstream launcher (test/distributed/test_distributed_spawn.py) is not in the wheel and only
accepts gloo/nccl/ucc, so this file does its job: register the backend at module level (spawned
ranks re-import __main__), declare it in ``DistTestCases.backend_feature`` before importing the
suite, and spawn one process per rank for each test. See docs/torch-backend.md §12.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("BACKEND", "zmq")
os.environ.setdefault("WORLD_SIZE", "3")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("COMMLAYER_LINGER", "0.5")

import commlayer  # noqa: E402,F401 - registers the zmq backend in this process and in every spawned rank
from torch.testing._internal.common_distributed import DistTestCases  # noqa: E402

BACKEND = os.environ["BACKEND"]
if BACKEND not in ("gloo", "nccl", "ucc", "mpi"):
    # "plugin" makes the suite treat it as available; "ddp" and "subgroup" unlock the CPU DDP and
    # subgroup tests that gloo runs. ("gpu"/"cuda" would unlock CUDA-only tests: not on CPU.)
    for feature in ("plugin", "ddp", "subgroup"):
        DistTestCases.backend_feature[feature].add(BACKEND)

from torch.testing._internal.common_utils import run_tests  # noqa: E402
from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend  # noqa: E402


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    def setUp(self) -> None:
        super().setUp()
        self._spawn_processes()


if __name__ == "__main__":
    run_tests()
