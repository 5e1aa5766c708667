"""Tools shared by the tests, benchmarks, demo, CLI and examples (never imported by the library).

* :func:`free_port` (:mod:`.ports`): the one free-port helper.
* :func:`run_world`, :class:`Ranks`, :func:`run_ranks` (:mod:`.launch`): the one multi-process
  launcher (functions in spawned processes, or command lines in their own sessions); its bounded
  wait loop and process stopping, shared by both front ends, are in :mod:`.supervise`.
* :mod:`.reference`: reference reductions (numpy / plain torch) results are compared against.
* :mod:`.reliability`: kill injection, frame fuzzing, soak and timeout runs
  (``benchmarks/reliability.py`` is its command line; ``tests/test_reliability*.py`` its CI-sized runs).
* :mod:`.liveness`: liveness runs on emulated links and real rank failures
  (``benchmarks/liveness.py`` is its command line; ``tests/test_liveness*.py`` its CI-sized runs).
* :mod:`.ps_failover`: SIGKILL of a parameter server mid-training, with or without a replica
  (``tests/test_fleet_ps.py`` checks it, ``benchmarks/fleet.py --parts ps`` times it).

Importing this package imports neither torch nor the WAN emulator.
"""

from __future__ import annotations

from commlayer.testing.launch import Ranks, RanksOutcome, run_ranks, run_world, torchrun_env
from commlayer.testing.ports import free_port

__all__ = ["Ranks", "RanksOutcome", "free_port", "run_ranks", "run_world", "torchrun_env"]
