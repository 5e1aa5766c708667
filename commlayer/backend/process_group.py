"""``ProcessGroupZMQ``: the torch.distributed process group over the commlayer transport.

Collectives run on the group's executor in issue order; point-to-point operations are matched
by the transport's mailbox and need no executor. See ``../shared/notes/torch-backend.md`` for
the torch 2.13 contract this class follows.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from commlayer.backend import adaptive
from commlayer.backend.adaptive import AdaptiveAllreduce
from commlayer.backend.compression import BackendCompression
from commlayer.backend.executor import Executor
from commlayer.backend.options import ZmqOptions
from commlayer.backend.work import ZmqWork, completed_work
from commlayer.topologies.comm import Group, OpComm
from commlayer.transport.bootstrap import connect_transport
from commlayer.transport.engine import Transport
from commlayer.transport.errors import CommError, PeerFailure, TransportClosed, rewrap

logger = logging.getLogger(__name__)

_world_lock = threading.Lock()
_world_transport: Transport | None = None
_live: "weakref.WeakSet[ProcessGroupZMQ]" = weakref.WeakSet()


class ProcessGroupZMQ(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run over ZeroMQ."""

    from commlayer.backend.collectives import (  # noqa: E402 - methods defined in their own module
        all_gather_single, all_gather_single_coalesced, all_to_all_single, allgather, allgather_coalesced,
        allreduce, allreduce_coalesced, alltoall, barrier, broadcast, gather, recv, recv_anysource, reduce,
        reduce_scatter, reduce_scatter_single, reduce_scatter_single_coalesced, scatter, send)

    _allgather_base = all_gather_single
    _reduce_scatter_base = reduce_scatter_single
    alltoall_base = all_to_all_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def __init__(self, group: Group, owns_transport: bool, options: ZmqOptions, name: str, default_group: bool = False) -> None:
        super().__init__(group.rank, group.size)
        self.group = group
        self.transport = group.transport
        self.options = options
        self.timeout = group.timeout
        self._owns_transport = owns_transport
        self._name = name
        self._desc = ""
        self._error: BaseException | None = None
        self._shutdown = False
        self._exec = Executor(group.channel)
        self.compression = BackendCompression(options.codec, options.codec_min_bytes) if options.codec else None
        self.adaptive = AdaptiveAllreduce(self.transport, group.ranks, group.channel, self.timeout) if default_group and adaptive.wanted(options, group.size, self.transport) else None
        self.transport.add_failure_listener(self._on_peer_failure)
        _live.add(self)

    # ---- names ----------------------------------------------------------------------------
    def getBackendName(self) -> str:
        return "zmq"

    def setGroupName(self, name: str) -> None:
        self._name = name

    def getGroupName(self) -> str:
        return self._name

    def setGroupDesc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:
        return self._desc

    @property
    def group_label(self) -> str:
        return self._name or self.group.channel

    # ---- failure handling -------------------------------------------------------------------
    def _on_peer_failure(self, peer: int, reason: str) -> None:
        if peer not in self.group.ranks or reason == "left" or self._shutdown:
            return
        gr = self.group.ranks.index(peer)
        self._abort(PeerFailure(f"rank {gr} (global rank {peer}) of group {self.group_label!r} failed: {reason}", peer=peer))

    def _abort(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.transport.abort_channel(self.group.channel, self._error)

    def _check_usable(self, what: str) -> None:
        if self._shutdown:
            raise TransportClosed(f"{what}: process group {self.group_label!r} was shut down (destroy_process_group)")

    # ---- running operations ---------------------------------------------------------------
    def _timeout_of(self, opts: Any) -> float:
        t = getattr(opts, "timeout", None)
        if isinstance(t, timedelta) and t.total_seconds() > 0:
            return t.total_seconds()
        return self.timeout

    def run(self, name: str, outputs: list[torch.Tensor], fn: Callable[[OpComm], None], opts: Any = None,
            finalize: Callable[[], None] | None = None) -> ZmqWork:
        """Issues collective ``name``: numbers it now, runs ``fn(comm)`` on the executor."""
        self._check_usable(name)
        timeout = self._timeout_of(opts)
        comm = self.group.op(name, timeout=timeout, tensors=outputs)
        work = ZmqWork(outputs, comm.describe(), timeout)

        def job() -> None:
            if self._error is not None:
                raise rewrap(self._error, f"group {self.group_label!r} is unusable after an earlier failure: {self._error}")
            try:
                fn(comm)
            except CommError as exc:
                self._abort(exc)
                raise
            if finalize is not None:
                finalize()

        self._exec.submit(job, work, inline=not bool(getattr(opts, "asyncOp", False)))
        return work

    def done(self, outputs: list[torch.Tensor], what: str) -> ZmqWork:
        return completed_work(outputs, what, self.timeout)

    # ---- lifecycle ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Called by destroy_process_group(): stops the executor and frees the transport if owned."""
        if self._shutdown:
            return
        self._shutdown = True
        self.transport.remove_failure_listener(self._on_peer_failure)
        self._exec.stop()
        if self.adaptive is not None:
            self.adaptive.close()
        if self._owns_transport:
            global _world_transport
            with _world_lock:
                if _world_transport is self.transport:
                    _world_transport = None
            self.transport.close(reason=str(self._error) if self._error is not None else "")
        else:
            self.transport.drop_channel(self.group.channel)

    def abort(self) -> None:
        self._abort(TransportClosed(f"process group {self.group_label!r} was aborted"))
        self.shutdown()


def create_process_group(opts: Any, backend_options: Any) -> ProcessGroupZMQ:
    """Backend creator registered with torch (``extended_api=True``)."""
    global _world_transport
    options = ZmqOptions.resolve(backend_options)
    timeout = opts.timeout.total_seconds() if opts.timeout.total_seconds() > 0 else 1800.0
    rank, size = int(opts.group_rank), int(opts.group_size)
    global_ranks = list(opts.global_ranks_in_group)
    name = f"pg{opts.group_id}"
    with _world_lock:
        world = _world_transport if _world_transport is not None and not _world_transport.closed else None
        if not global_ranks:  # the default group
            transport = connect_transport(opts.store, rank, size, timeout, name)
            _world_transport = transport
            ranks, owns = list(range(size)), True
        elif world is not None and max(global_ranks) < world.world_size and world.rank == global_ranks[rank]:
            transport, ranks, owns = world, global_ranks, False
        else:
            transport = connect_transport(opts.store, rank, size, timeout, name)
            ranks, owns = list(range(size)), True
    group = Group(transport, ranks, channel=name, timeout=timeout)
    return ProcessGroupZMQ(group, owns, options, name, default_group=not global_ranks)


@atexit.register
def _close_all() -> None:
    for pg in list(_live):
        try:
            pg.shutdown()
        except Exception:  # pragma: no cover - best effort at exit
            logger.debug("shutdown at exit failed", exc_info=True)
