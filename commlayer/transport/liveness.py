"""Per-peer liveness: adaptive silence timeouts (RFC 6298 style) and the verdict on a silent peer.

Every message from a peer (data, or a heartbeat on its separate control connection) proves it
alive. A peer silent for longer than its adaptive timeout

    T = min(ceiling, max(floor, heartbeat + max(0.2 s, SRTT + 4 * RTTVAR)))

(one heartbeat interval, as the peer sends one every ``heartbeat`` s, plus an RTO-style margin on
its delivery with Linux's 200 ms minimum RTO; so T is never below the heartbeat)

is examined, not declared dead at once (SRTT/RTTVAR: the larger of the heartbeat round trips and
the kernel's own estimate on the worst of this rank's TCP connections, so queueing delay on a
bloated link counts even for a peer that only exchanges heartbeats behind that queue):

* a **remote** peer is dead only if the kernel saw no byte and no acknowledgement from it for
  ``T`` either, and has retransmitted to it without success (a silent link). A peer whose host still
  acknowledges (a stopped or busy process, a deep queue) is alive: operations wait for it up to the
  process-group timeout;
* a **co-located** peer is dead when its process is gone, a zombie, or stopped (SIGSTOP, a
  debugger) while silent; a running one is only busy. Its exit is seen at once through a pidfd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from commlayer.transport.tcpinfo import TcpView

#: Least margin for a heartbeat's delivery (Linux's minimum TCP RTO), seconds.
MIN_RTO = 0.2
#: Retransmission timeouts in a row, without any acknowledgement, that make a silent remote peer dead.
SILENT_RTOS = 3
#: Channel of the transport's own heartbeats (never delivered to operations).
LIVE_CHANNEL = "__live__"


@dataclass(frozen=True)
class LivenessConfig:
    """Liveness knobs (``COMMLAYER_HEARTBEAT``, ``COMMLAYER_LIVENESS_FLOOR``, ``COMMLAYER_LIVENESS_CEILING``).

    Attributes:
        heartbeat: seconds between heartbeats to each peer; also the least silence ever examined.
        floor: least adaptive timeout, seconds.
        ceiling: largest adaptive timeout, seconds.
    """

    heartbeat: float = 2.0
    floor: float = 1.0
    ceiling: float = 60.0

    def __post_init__(self) -> None:
        for name in ("heartbeat", "floor", "ceiling"):
            if not getattr(self, name) > 0:
                raise ValueError(f"liveness {name}: expected a positive number of seconds, got {getattr(self, name)}")
        if self.ceiling < max(self.floor, self.heartbeat):
            raise ValueError(f"COMMLAYER_LIVENESS_CEILING: expected >= max(floor, heartbeat) = "
                             f"{max(self.floor, self.heartbeat)} s, got {self.ceiling} s")


class RttEstimator:
    """Smoothed round-trip time and its variation (RFC 6298: alpha 1/8, beta 1/4)."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.25  # before any sample: RFC 6298's initial RTO of 1 s (0 + 4 x 0.25)
        self.samples = 0

    def add(self, rtt: float) -> None:
        """Adds one round-trip sample in seconds (negative or absurd samples are ignored)."""
        if not 0.0 <= rtt < 3600.0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.samples += 1

    def timeout(self, cfg: LivenessConfig, kernel: tuple[float, float] | None = None) -> float:
        """The adaptive silence timeout; ``kernel``: (srtt, rttvar) seen by TCP on the peer's connections."""
        srtt, var = (self.srtt or 0.0), self.rttvar
        if kernel is not None and kernel[0] + 4 * kernel[1] > srtt + 4 * var:
            srtt, var = kernel
        return min(cfg.ceiling, max(cfg.floor, cfg.heartbeat + max(MIN_RTO, srtt + 4 * var)))


@dataclass
class PeerLive:
    """Liveness state of one peer (owned by the transport's I/O thread, ``last_heard`` by any reader).

    Attributes:
        local: the peer runs on this machine (its pid is meaningful here).
        pid: its process id.
        host: address its endpoint listens on ("" for ipc), to find its TCP connections.
        port: TCP port it listens on (or of the relay this rank reaches it through).
        last_heard: ``time.monotonic()`` of its last message.
        pidfd: a pidfd on its process (co-located peers, Linux >= 5.3), else None.
        rtt: heartbeat round trips.
        kernel_rtt: last (srtt, rttvar) the kernel reported for its connections.
    """

    local: bool
    pid: int
    host: str
    port: int
    last_heard: float
    pidfd: int | None = None
    rtt: RttEstimator = field(default_factory=RttEstimator)
    kernel_rtt: tuple[float, float] | None = None
    next_ping: float = 0.0
    ping_seq: int = 0
    next_exam: float = 0.0
    stall_logged: bool = False

    def timeout(self, cfg: LivenessConfig) -> float:
        return self.rtt.timeout(cfg, self.kernel_rtt)


def open_pidfd(pid: int) -> int | None:
    """A pidfd that becomes readable when ``pid`` exits, or None (no support, no permission)."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def process_state(pid: int) -> str:
    """The state letter of ``pid`` from /proc (R, S, D, T, t, Z, X...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return "gone"
    end = data.rfind(b")")  # the command name may contain spaces and parentheses
    return data[end + 2:end + 3].decode() if end > 0 else "gone"


def verdict(live: PeerLive, silence: float, timeout: float, tcp: TcpView | None) -> str | None:
    """Why a peer silent for ``silence`` s (> ``timeout``) is dead, or None if it is alive.

    Args:
        live: the peer's state.
        silence: seconds since its last message.
        timeout: its adaptive timeout.
        tcp: the kernel's view of this process's TCP connections (remote peers).
    """
    if live.local:
        state = process_state(live.pid)
        if state in ("gone", "Z", "X", "x"):
            return f"its process (pid {live.pid}) exited"
        if state in ("T", "t"):
            return (f"its process (pid {live.pid}) is stopped (SIGSTOP or a debugger) and sent nothing for "
                    f"{silence:.1f} s (liveness timeout {timeout:.1f} s)")
        return None  # running or sleeping: busy, not dead
    if tcp is None:
        return None
    conns = tcp.connections(live.host, live.port)
    if not conns:
        return None  # nothing to judge by: a dropped connection is reported by its own event
    heard = min(min(c.last_data_recv, c.last_ack_recv) for c in conns)
    # A bloated or lossy link drops segments and delays acknowledgements by seconds, so one expired
    # retransmission timer is routine; a dead host or a cut cable leaves the kernel backing off with
    # nothing answered: SILENT_RTOS expiries in a row (>= 0.2 + 0.4 + 0.8 s, growing with the link's RTO).
    retrying = max(max(c.retransmits, c.probes) for c in conns)
    if heard > timeout and retrying >= SILENT_RTOS:
        return (f"no message, byte or TCP acknowledgement from it for {min(silence, heard):.1f} s while this rank "
                f"retransmits to it unanswered {retrying} times in a row (adaptive timeout {timeout:.1f} s): its host "
                "or the network failed")
    return None
