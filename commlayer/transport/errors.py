"""Exceptions raised by the transport and everything built on it."""

from __future__ import annotations


class CommError(RuntimeError):
    """Base class for every communication failure commlayer reports."""


class CommTimeout(CommError, TimeoutError):
    """A wait exceeded its timeout (the process-group timeout or a per-call one)."""


class PeerFailure(CommError):
    """A peer died, disconnected or left while an operation still needed it."""

    def __init__(self, message: str, peer: int | None = None) -> None:
        super().__init__(message)
        self.peer = peer


class WireError(CommError, ValueError):
    """A malformed, unexpected or oversized message arrived; it was rejected."""


class CollectiveMismatch(CommError):
    """Ranks called different collectives (kind, root, size, dtype, reduce op or shapes) at the same point.

    Attributes:
        ranks: the global ranks whose calls disagree.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ranks = ranks


class TransportClosed(CommError):
    """The transport (or the process group over it) was shut down."""


def rewrap(error: BaseException, message: str) -> BaseException:
    """The same kind of error with ``message``, keeping its attributes (e.g. ``PeerFailure.peer``)."""
    try:
        new = type(error)(message)
    except Exception:  # an exception type with another constructor keeps its own message
        return error
    new.__dict__.update(error.__dict__)
    new.__cause__ = error.__cause__
    return new
