"""Creating zmq process groups: the backend creator torch calls, the world transport, exit cleanup.

The default group connects the process's transport over the c10d store; subgroups whose members
all live in that transport share it on their own channel, others connect one of their own.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Any, Mapping, Protocol

from torch._C._distributed_c10d import _DistributedBackendOptions

from commlayer.backend.options import ZmqOptions
from commlayer.topologies.comm import Group
from commlayer.transport.bootstrap import connect_transport
from commlayer.transport.engine import Transport

logger = logging.getLogger(__name__)

_world_lock = threading.Lock()
_world_transport: Transport | None = None
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()


class _GroupClass(Protocol):
    def __call__(self, group: Group, owns_transport: bool, options: ZmqOptions, name: str, default_group: bool = False) -> Any: ...


def create(opts: _DistributedBackendOptions, backend_options: ZmqOptions | Mapping[str, Any] | None, cls: _GroupClass) -> Any:
    """Builds the group torch asks for (``opts``: torch's ``_DistributedBackendOptions``).

    Args:
        opts: store, group rank/size, timeout, group id and global ranks (``[]`` for WORLD).
        backend_options: the ``pg_options=`` given to init_process_group / new_group.
        cls: the process-group class to instantiate.
    """
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
    try:
        pg = cls(Group(transport, ranks, channel=name, timeout=timeout), owns, options, name, default_group=not global_ranks)
    except BaseException:
        if owns:
            forget_transport(transport)
            transport.close()
        raise
    _live.add(pg)
    return pg


def standalone(cls: _GroupClass, store: Any, rank: int, size: int, timeout: float = 1800.0,
               options: ZmqOptions | None = None, name: str = "standalone") -> Any:
    """A group over ``store`` that torch's registry does not know (its own transport; close it with ``shutdown()``).

    For wrappers that build and rebuild groups themselves, such as torchft's reconfigurable
    ``ProcessGroupWrapper`` (its ``_create_pg(store, rank, world_size)`` may return this): every
    configuration must use a fresh store prefix, as torchft's quorums do.
    """
    transport = connect_transport(store, rank, size, timeout, name)
    try:
        pg = cls(Group(transport, list(range(size)), channel=name, timeout=timeout), True, options or ZmqOptions.resolve(None), name)
    except BaseException:
        transport.close()
        raise
    _live.add(pg)
    return pg


def forget_transport(transport: Transport) -> None:
    global _world_transport
    with _world_lock:
        if _world_transport is transport:
            _world_transport = None


def forget(pg: Any) -> None:
    """Called from a group's shutdown: it no longer needs closing at exit."""
    _live.discard(pg)
    if getattr(pg, "_owns_transport", False):
        forget_transport(pg.rt.transport)


@atexit.register
def _close_all() -> None:
    for pg in list(_live):
        try:
            pg.shutdown()
        except Exception:  # pragma: no cover - best effort at exit
            logger.debug("shutdown at exit failed", exc_info=True)
