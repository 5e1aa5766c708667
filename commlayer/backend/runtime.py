"""The execution core of one zmq process group: numbering, running and failing operations.

Every collective family (``reductions``, ``gathers``, ``scatters``, ``p2p``) holds a
:class:`GroupRuntime` and issues its operations through :meth:`GroupRuntime.run`. The runtime
knows nothing about the torch ``ProcessGroup`` class, so no module imports the class that
composes them (no import cycle). The torch contract these modules follow is in
``docs/torch-backend.md``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Callable, Protocol

import torch

from commlayer.backend import adaptive
from commlayer.backend.adaptive import AdaptiveAllreduce, AutoCodecAllreduce
from commlayer.backend.compression import BackendCompression
from commlayer.backend.executor import Executor
from commlayer.backend.options import ZmqOptions
from commlayer.backend.work import ZmqWork, completed_work, timed_out_message
from commlayer.topologies.comm import Group, OpComm
from commlayer.transport.errors import CommError, CommTimeout, PeerFailure, TransportClosed, rewrap

logger = logging.getLogger(__name__)


class HasTimeout(Protocol):
    """Any c10d options object: each carries ``timeout`` (negative = unset) and ``asyncOp``."""

    timeout: timedelta
    asyncOp: bool


class GroupRuntime:
    """State shared by the collective families of one process group.

    Args:
        group: the group's ranks and channel over a transport.
        options: resolved per-group options.
        name: group name (torch may rename it later with ``setGroupName``).
        default_group: True for WORLD (enables the link-aware controller when wanted).
    """

    def __init__(self, group: Group, options: ZmqOptions, name: str, default_group: bool) -> None:
        self.group = group
        self.transport = group.transport
        self.options = options
        self.timeout = group.timeout
        self.name = name
        self.error: BaseException | None = None
        self.closed = False
        self.executor = Executor(group.channel)
        auto = options.codec == "auto"
        self.compression = BackendCompression(options.codec, options.codec_min_bytes) if options.codec and not auto else None
        self.adaptive = (AdaptiveAllreduce(self.transport, group.ranks, group.channel, self.timeout)
                         if default_group and adaptive.wanted(options, group.size, self.transport) else None)
        self.autocodec = (AutoCodecAllreduce(self.transport, group.ranks, group.channel, self.timeout, options.codec_min_bytes,
                                             self.adaptive) if auto and group.size > 1 else None)
        self.transport.add_failure_listener(self._on_peer_failure)

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def label(self) -> str:
        return self.name or self.group.channel

    # ---- failures -----------------------------------------------------------------------------
    def _on_peer_failure(self, peer: int, reason: str) -> None:
        if peer not in self.group.ranks or reason == "left" or self.closed:
            return
        gr = self.group.ranks.index(peer)
        self.abort(PeerFailure(f"rank {gr} (global rank {peer}) of group {self.label!r} failed: {reason}", peer=peer))

    def abort(self, error: BaseException) -> None:
        """Makes the group unusable with ``error`` and fails every pending receive on its channel."""
        if self.error is None:
            self.error = error
        self.transport.abort_channel(self.group.channel, self.error)

    def check_usable(self, what: str) -> None:
        if self.closed:
            raise TransportClosed(f"{what}: process group {self.label!r} was shut down (destroy_process_group)")

    def check_root(self, root: int, what: str) -> int:
        if not 0 <= root < self.size:
            raise ValueError(f"{what}: expected a root rank in [0, {self.size}), got {root}")
        return int(root)

    # ---- running operations -------------------------------------------------------------------
    def timeout_of(self, opts: HasTimeout | None) -> float:
        t = getattr(opts, "timeout", None)
        if isinstance(t, timedelta) and t.total_seconds() > 0:
            return t.total_seconds()
        return self.timeout

    def run(self, name: str, outputs: list[torch.Tensor], fn: Callable[[OpComm], None], opts: HasTimeout | None = None,
            finalize: Callable[[], None] | None = None) -> ZmqWork:
        """Issues collective ``name``: numbers it now (issue order), runs ``fn(comm)`` then ``finalize()`` on the executor.

        Synchronous calls (``opts.asyncOp`` False) run in the caller's thread when nothing is queued.
        """
        self.check_usable(name)
        timeout = self.timeout_of(opts)
        comm = self.group.op(name, timeout=timeout, tensors=outputs)
        work = ZmqWork(outputs, comm.describe(), timeout)

        def job() -> None:
            if self.error is not None:
                raise rewrap(self.error, f"group {self.label!r} is unusable after an earlier failure: {self.error}")
            try:
                fn(comm)
            except CommTimeout as exc:
                wrapped = CommTimeout(timed_out_message(f"{name} in group {self.label!r}", timeout, str(exc)))
                self.abort(wrapped)
                raise wrapped from None
            except CommError as exc:
                self.abort(exc)
                raise
            if finalize is not None:
                finalize()

        self.executor.submit(job, work, inline=not bool(getattr(opts, "asyncOp", False)))
        return work

    def done(self, outputs: list[torch.Tensor], what: str) -> ZmqWork:
        """A Work already complete (operations finished in the caller, e.g. a send handed to the transport)."""
        return completed_work(outputs, what, self.timeout)

    # ---- lifecycle ------------------------------------------------------------------------------
    def close(self, owns_transport: bool) -> None:
        """Stops the executor and the controller; closes the transport if this group owns it."""
        if self.closed:
            return
        self.closed = True
        self.transport.remove_failure_listener(self._on_peer_failure)
        self.executor.stop()
        if self.autocodec is not None:
            self.autocodec.close()
        if self.adaptive is not None:
            self.adaptive.close()
        if owns_transport:
            self.transport.close(reason=str(self.error) if self.error is not None else "")
        else:
            self.transport.drop_channel(self.group.channel)
