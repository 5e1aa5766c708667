"""The kernel's view of this process's TCP connections (``TCP_INFO``), found through /proc/self/fd.

ZeroMQ owns its sockets, so their descriptors are found in /proc/self/fd, duplicated, asked for
their addresses and ``TCP_INFO`` (read-only), and the duplicates closed. What liveness needs: how
long since the last byte and the last acknowledgement arrived, whether the kernel is
retransmitting without success, and its smoothed RTT (which includes queueing delay).
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_HEAD = struct.Struct("8B24I")  # tcpi_state .. tcpi_total_retrans (104 bytes, stable since Linux 2.6)


@dataclass(frozen=True)
class TcpConn:
    """One established TCP connection (times in seconds).

    Attributes:
        local: (address, port) of this end.
        remote: (address, port) of the other end.
        retransmits: RTO expiries in a row without an acknowledgement (``tcpi_retransmits``).
        probes: unanswered zero-window / keepalive probes (``tcpi_probes``).
        unacked: segments sent and not yet acknowledged.
        last_data_recv: seconds since the last data segment arrived.
        last_ack_recv: seconds since the last acknowledgement arrived.
        srtt: the kernel's smoothed RTT.
        rttvar: its RTT variation.
    """

    local: tuple[str, int]
    remote: tuple[str, int]
    retransmits: int
    probes: int
    unacked: int
    last_data_recv: float
    last_ack_recv: float
    srtt: float
    rttvar: float


def _parse(local: tuple, remote: tuple, raw: bytes) -> TcpConn | None:
    if len(raw) < _HEAD.size:
        return None
    f = _HEAD.unpack_from(raw)
    if f[0] != 1:  # TCP_ESTABLISHED
        return None
    u = f[8:]
    return TcpConn((str(local[0]), int(local[1])), (str(remote[0]), int(remote[1])), f[2], f[3], u[4],
                   u[11] / 1000.0, u[12] / 1000.0, u[15] / 1e6, u[16] / 1e6)


def scan() -> list[TcpConn]:
    """Every established IPv4/IPv6 TCP connection this process holds (empty where /proc is absent)."""
    out: list[TcpConn] = []
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return out
    for name in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except (OSError, ValueError):
            continue  # closed meanwhile
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                conn = _parse(s.getsockname(), s.getpeername(), s.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 232))
                if conn is not None:
                    out.append(conn)
        except OSError:
            pass  # a listening or unconnected socket
        finally:
            s.close()  # closes only the duplicate
    return out


class TcpView:
    """A snapshot of :func:`scan`, answering "which connections go to this peer?".

    Args:
        listen_port: the port this rank's own ROUTER listens on (incoming connections arrive there).
        shared_hosts: peer addresses used by more than one peer (incoming connections from them
            cannot be told apart, so only outgoing ones count).
    """

    def __init__(self, listen_port: int, shared_hosts: set[str]) -> None:
        self.conns = scan()
        self.listen_port = listen_port
        self.shared_hosts = shared_hosts

    def connections(self, host: str, port: int) -> list[TcpConn]:
        """Connections to the peer listening on ``host:port``, and from it where unambiguous."""
        out = [c for c in self.conns if c.remote == (host, port)]
        if host not in self.shared_hosts:
            out += [c for c in self.conns if c.remote[0] == host and c.local[1] == self.listen_port]
        return out

    def rtt(self, host: str, port: int) -> tuple[float, float] | None:
        """The largest (srtt, rttvar) the kernel measured on the peer's connections."""
        conns = [c for c in self.connections(host, port) if c.srtt > 0]
        if not conns:
            return None
        c = max(conns, key=lambda c: c.srtt + 4 * c.rttvar)
        return c.srtt, c.rttvar

    def host_rtt(self) -> tuple[float, float] | None:
        """The largest (srtt, rttvar) on any of this process's connections.

        A full queue on this host's uplink (or on a busy peer's, which delays its acknowledgements)
        delays every connection through it, including those to peers that only exchange heartbeats
        and so never measured the queue themselves.
        """
        conns = [c for c in self.conns if c.srtt > 0]
        if not conns:
            return None
        c = max(conns, key=lambda c: c.srtt + 4 * c.rttvar)
        return c.srtt, c.rttvar
