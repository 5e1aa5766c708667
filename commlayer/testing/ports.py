"""The one ``free_port`` of the repository (tests, benchmarks, examples, CLI and the emulator)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now.

    The port is released before it is returned, so another process may take it before the
    caller binds it; callers that must not race pass port 0 to the thing that binds instead.

    Args:
        host: the address to probe (default loopback).

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
