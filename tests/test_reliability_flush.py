"""A collective that waits for its zero-copy sends to flush must fail when the receiver dies.

Shows a bug in ``topologies/comm.py`` (``OpComm.finish`` waits the full group timeout on the
send trackers of a dead peer); see docs/reliability.md. It guards the fix.
"""

from __future__ import annotations

import pytest

from commlayer.testing import reliability as R


def test_broadcast_to_dead_receiver_fails_at_detection() -> None:
    res = R.dead_receiver_of_large_send(nbytes=64 << 20, timeout=20.0)
    assert res["error"] is not None and res["error"].startswith("PeerFailure"), res
    assert res["after_kill_s"] < 3.0, res
