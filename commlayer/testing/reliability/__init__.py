"""Reliability runs of the zmq backend: kill injection, frame fuzzing, soak and timeouts (issue 7).

Every part runs real processes over real loopback sockets and is bounded in time. The CI-sized
runs are ``tests/test_reliability*.py``; ``benchmarks/reliability.py`` is the command line of the
full-size runs. Randomness comes from private generators seeded from the caller's seed; every rank
derives the same operation sequence from it.

Modules: :mod:`.harness` (forkserver world, /proc census), :mod:`.ops` (random checked
collectives), :mod:`.kill`, :mod:`.flush`, :mod:`.fuzz` (decoder), :mod:`.fuzz_socket` (live
socket), :mod:`.soak`, :mod:`.timeouts`, :mod:`.report` (the table).
"""

from __future__ import annotations

from commlayer.testing.reliability.flush import dead_receiver_of_large_send, flush_worker
from commlayer.testing.reliability.fuzz import DEEP_DEPTHS, deep_header, fuzz_decoder, fuzz_message, mutate_header, valid_message
from commlayer.testing.reliability.fuzz_socket import fuzz_serve_worker, fuzz_socket
from commlayer.testing.reliability.harness import World, census, commlayer_threads, context
from commlayer.testing.reliability.kill import DETECT_SLACK, KILL_MODES, KillRun, kill_once, kill_worker, names_rank, run_kill
from commlayer.testing.reliability.ops import OPS, OpSpec, issue_op, make_input, random_op, run_ops
from commlayer.testing.reliability.report import table
from commlayer.testing.reliability.soak import run_soak, soak_worker
from commlayer.testing.reliability.timeouts import PER_CALL_KINDS, TIMEOUT_KINDS, run_timeouts, timeout_worker

__all__ = [
    "DEEP_DEPTHS", "DETECT_SLACK", "KILL_MODES", "OPS", "PER_CALL_KINDS", "TIMEOUT_KINDS", "KillRun", "OpSpec", "World",
    "census", "commlayer_threads", "context", "dead_receiver_of_large_send", "deep_header", "flush_worker",
    "fuzz_decoder", "fuzz_message", "fuzz_serve_worker", "fuzz_socket", "issue_op", "kill_once", "kill_worker",
    "make_input", "mutate_header", "names_rank", "random_op", "run_kill", "run_ops", "run_soak", "run_timeouts",
    "soak_worker", "table", "timeout_worker", "valid_message",
]
