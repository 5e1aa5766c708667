"""Parameter server: tensors sharded over S server ranks; workers push, servers aggregate and serve pulls.

Two uses:

* :func:`~commlayer.topologies.ps_collective.ps_allreduce` is a plain exact collective (every rank
  pushes shard s to server rank s, which reduces in rank order and sends the result back), the
  registry's ``ps`` algorithm (``COMMLAYER_ALGO=ps``); it lives in :mod:`ps_collective`.
* :class:`ParameterServer` (``World.parameter_server``) runs a server thread on each server rank
  (co-located with a worker, or on a dedicated rank that calls :meth:`ParameterServer.serve`):

  - ``allreduce(x, op, codec)``: synchronous aggregation round; workers push encoded shards
    (uplink codec), servers decode, aggregate in worker order (``sign:scale=none``: majority
    vote, Bernstein et al. 2018) and answer with the result (optionally encoded with a
    different downlink codec). Exact without codecs.
  - training: ``init(params)``, ``push(grad)``, ``pull()``: the servers hold the parameters and
    run the server-side optimizer. ``mode="sync"``: one optimizer step per clock on the mean of
    every live worker's gradient (majority vote for ``sign:scale=none``); ``mode="async"``: every
    push is applied as it arrives, and a pull of clock c is answered only once every live worker
    has pushed at least c - staleness updates (stale-synchronous parallel, Ho et al., NIPS 2013).

Failover (training): with ``replicas`` (one backup rank per server), workers send every init, push
and done to both the server and its replica, which runs the same shard server on the same
updates (active replication), and pull from the server. When the transport reports the server
dead (its connection dropped, its pidfd fired, or its heartbeats stopped: the liveness bound, never
the group timeout), the worker logs the failover and re-sends the pull to the replica. Without a
replica the worker stops with a :class:`~commlayer.transport.errors.PeerFailure` naming the server.

This module is the worker-facing topology; the server thread is :mod:`ps_server`, the optimizer
state :mod:`ps_optimizer`, the shard payloads :mod:`ps_payload`.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from commlayer.codecs import Codec, CodecContext, aggregation_mode, to_spec
from commlayer.codecs.aggregate import multi_round
from commlayer.topologies.base import Guarantee, Topology
from commlayer.topologies.comm import Group, wire_dtype
from commlayer.topologies.p2p import send_p2p
from commlayer.topologies.ps_collective import default_servers, ps_allreduce  # noqa: F401  (re-exported)
from commlayer.topologies.ps_optimizer import MODES, OPTIMIZERS
from commlayer.topologies.ps_payload import AGG, PULL, TAG, codec_frames, decode, raw_frames, shard_ctx
from commlayer.topologies.ps_server import ShardServer
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.ring import even_bounds
from commlayer.topologies.world_view import WorldView
from commlayer.transport.errors import CommError, PeerFailure
from commlayer.transport.envelope import Message

logger = logging.getLogger(__name__)


class ParameterServer(Topology):
    """Parameter server over a :class:`World` (see the module docstring).

    Args:
        servers: number of servers (ranks 0..S-1) or their ranks.
        workers: worker ranks (default: every rank; servers that are not workers are dedicated
            and must call :meth:`serve`).
        mode: "sync" or "async" (training).
        staleness: SSP bound s for async mode (0 = bulk synchronous).
        uplink: default codec for pushes (spec or instance; None = exact).
        downlink: codec for what servers send back (aggregates, parameters); None = exact.
        optimizer: server-side optimizer, "sgd" or "adam".
        lr: its learning rate; optimizer_options: further keyword arguments (momentum, ...).
        replicas: one backup rank per server (training only): workers fail over to it when the server dies.
    """

    name = "ps"

    def __init__(self, world: WorldView, group: Group, servers: "int | Sequence[int]" = 1, workers: Sequence[int] | None = None,
                 mode: str = "sync", staleness: int = 0, uplink: "str | Codec | None" = None, downlink: "str | Codec | None" = None,
                 optimizer: str = "sgd", lr: float = 0.01, optimizer_options: dict | None = None,
                 replicas: Sequence[int] | None = None) -> None:
        super().__init__(world, group)
        self.servers = list(range(servers)) if isinstance(servers, int) else list(servers)
        self.workers = list(range(world.size)) if workers is None else list(workers)
        if not self.servers or not set(self.servers) <= set(range(world.size)) or not set(self.workers) <= set(range(world.size)):
            raise ValueError(f"Expected server and worker ranks in [0, {world.size}), got servers {self.servers}, workers {self.workers}")
        if mode not in MODES or staleness < 0 or optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected mode in {MODES}, staleness >= 0 and optimizer in {OPTIMIZERS}, got {mode!r}, {staleness}, {optimizer!r}")
        self.replicas = list(replicas) if replicas is not None else []
        if self.replicas and (len(self.replicas) != len(self.servers) or set(self.replicas) & set(self.servers)
                              or not set(self.replicas) <= set(range(world.size)) or set(self.replicas) & set(self.workers)):
            raise ValueError(f"Expected one dedicated replica rank per server (not a server or worker), got replicas "
                             f"{self.replicas} for servers {self.servers} and workers {self.workers}")
        self.failed_over: dict[int, str] = {}  # shard -> why its server was given up
        self.replica_lost: set[int] = set()
        self.mode, self.staleness = mode, staleness if mode == "async" else 0
        self.uplink, self.downlink = self.codec(uplink), self.codec(downlink)
        self.optimizer, self.lr, self.optimizer_options = optimizer, lr, dict(optimizer_options or {})
        self.me = world.rank
        self.is_worker = self.me in self.workers
        self.is_server = self.me in self.servers or self.me in self.replicas
        self.reply_channel = group.channel + "/r"
        self.clock = 0
        self.round = 0
        self.max_staleness_seen = 0
        self._numel = -1
        self._dtype = torch.float32
        self._closed = False
        self.server: ShardServer | None = ShardServer(self) if self.is_server else None

    # ---- worker side: aggregation rounds ----------------------------------------------------------
    def guarantee(self, codec: "str | Codec | None" = None) -> Guarantee:
        if self.codec(codec) is None and self.downlink is None:
            return Guarantee(True, "exact: servers reduce every worker's shard in worker order")
        return Guarantee(False, "servers decode every payload and aggregate as the codec's reference aggregation "
                                "(majority vote for sign:scale=none), then re-encode with the downlink codec")

    def _server_of(self, s: int) -> int:
        return self.replicas[s] if s in self.failed_over else self.servers[s]

    def _send_shard(self, s: int, frames: list, meta: dict) -> None:
        """Sends a training message for shard ``s`` to its server and its replica (the dead one is skipped)."""
        targets = [self.servers[s]] + ([self.replicas[s]] if self.replicas else [])
        skip = {self.servers[s]} if s in self.failed_over else set()
        skip |= {self.replicas[s]} if s in self.replica_lost else set()
        for dst in (d for d in targets if d not in skip):
            try:
                send_p2p(self.world.transport, dst, self.group.channel, TAG, frames, meta)
            except PeerFailure as exc:
                if not self.replicas or s in self.failed_over:
                    raise self._no_server(s, exc) from None
                if dst == self.servers[s]:
                    self._fail_over(s, exc)
                elif s not in self.replica_lost:  # the server still works: training goes on without redundancy
                    self.replica_lost.add(s)
                    logger.warning("parameter server shard %d: replica rank %d failed (%s); no failover left", s, dst, exc)

    def _fail_over(self, s: int, exc: BaseException) -> None:
        if s not in self.failed_over:
            self.failed_over[s] = str(exc)
            logger.warning("parameter server shard %d: server rank %d failed (%s); rank %d fails over to replica rank %d",
                           s, self.servers[s], exc, self.me, self.replicas[s])

    def _no_server(self, s: int, exc: BaseException) -> PeerFailure:
        server = self._server_of(s)
        fix = (f"its replica rank {self.replicas[s]} failed too" if s in self.failed_over else
               "no replica is configured: pass replicas=[one dedicated rank per server] to parameter_server()")
        return PeerFailure(f"parameter server shard {s}: server rank {server} failed ({exc}); {fix}", peer=server)

    def _ctx(self, n: int, dtype: torch.dtype, key: str, step: int) -> CodecContext | None:
        return shard_ctx(self.group.channel, self.world.seed, n, dtype, key, step)

    def _recv_reply(self, seq: int, kind: str, s: int) -> Message:
        try:
            return self.world.transport.recv(f"{self.reply_channel}/{kind}", seq, 0, s, self._server_of(s),
                                             self.world.timeout, f"parameter server {kind} reply #{seq}, shard {s}")
        except PeerFailure as exc:
            if kind != PULL or not self.replicas or s in self.failed_over:
                raise self._no_server(s, exc) from None
            self._fail_over(s, exc)
            self._send_shard(s, [], {"t": "pull", "s": s, "c": seq})
            return self._recv_reply(seq, kind, s)

    def _allreduce(self, flat: torch.Tensor, op: ReduceOp, codec: Codec | None, downlink: "str | Codec | None" = None) -> torch.Tensor:
        if not self.is_worker:
            raise RuntimeError("Expected a worker rank: dedicated servers call serve()")
        if set(self.workers) != set(range(self.size)):
            raise RuntimeError("Expected every rank to be a worker for allreduce(); dedicated servers serve training only")
        down = self.codec(downlink) if downlink is not None else self.downlink
        mode = aggregation_mode(codec) if codec is not None else ""
        if codec is not None and multi_round(codec, mode):
            raise ValueError(f"Expected a one-shot codec: {mode}'s multi-round protocol needs an all-reduce topology, not a parameter server")
        r = self.round
        self.round += 1
        n = flat.numel()
        bounds = even_bounds(n, len(self.servers))
        meta_common = {"t": "agg", "r": r, "op": op.value, "up": to_spec(codec) if codec else "",
                       "down": to_spec(down) if down else "", "m": mode}
        for s, (a, b) in enumerate(bounds):
            part = flat[a:b]
            if codec is not None and op == ReduceOp.AVG and mode == "allreduce":
                part = part / len(self.workers)
            frames, meta = codec_frames(codec, part.clone(), self._ctx(b - a, flat.dtype, f"up/{s}", r))
            send_p2p(self.world.transport, self._server_of(s), self.group.channel, TAG, frames,
                     {**meta_common, **meta, "s": s, "n": b - a})
        for s, (a, b) in enumerate(bounds):
            m = self._recv_reply(r, AGG, s)
            flat[a:b].copy_(decode(down, m, flat.dtype, b - a, self._ctx(b - a, flat.dtype, f"down/{s}", r)))
        return flat

    # ---- worker side: training ----------------------------------------------------------------------
    def init(self, params: torch.Tensor) -> torch.Tensor:
        """Registers the flat parameters (the first worker's values win) and returns them as the servers hold them."""
        flat = params.detach().reshape(-1).contiguous()
        self._numel, self._dtype = flat.numel(), flat.dtype
        for s, (a, b) in enumerate(even_bounds(flat.numel(), len(self.servers))):
            self._send_shard(s, raw_frames(flat[a:b].clone()), {"t": "init", "s": s, "n": b - a, "dt": wire_dtype(flat.dtype)})
        return self.pull()

    def push(self, grad: torch.Tensor, codec: "str | Codec | None" = None) -> None:
        """Sends this worker's gradient for its current clock (encoded with ``codec`` or the uplink codec)."""
        c = self.codec(codec) if codec is not None else self.uplink
        flat = grad.detach().reshape(-1).to(self._dtype).contiguous()
        if flat.numel() != self._numel:
            raise ValueError(f"Expected a gradient of {self._numel} elements (call init() first), got {flat.numel()}")
        up = to_spec(c) if c else ""
        for s, (a, b) in enumerate(even_bounds(flat.numel(), len(self.servers))):
            frames, meta = codec_frames(c, flat[a:b].clone(), self._ctx(b - a, self._dtype, f"grad/{s}", self.clock))
            self._send_shard(s, frames, {**meta, "t": "grad", "s": s, "c": self.clock, "n": b - a, "up": up})
        self.clock += 1

    def pull(self) -> torch.Tensor:
        """Parameters for this worker's clock (waits as the mode and staleness bound require)."""
        out = torch.empty(self._numel, dtype=self._dtype)
        bounds = even_bounds(self._numel, len(self.servers))
        for s, (a, b) in enumerate(bounds):
            try:
                send_p2p(self.world.transport, self._server_of(s), self.group.channel, TAG, [],
                         {"t": "pull", "s": s, "c": self.clock})
            except PeerFailure as exc:  # the reply wait below fails over (or names the server)
                logger.info("parameter server shard %d: pull to rank %d failed: %s", s, self._server_of(s), exc)
        for s, (a, b) in enumerate(bounds):
            m = self._recv_reply(self.clock, PULL, s)
            self.max_staleness_seen = max(self.max_staleness_seen, self.clock - int(m.header.meta["min"]))
            out[a:b].copy_(decode(self.downlink, m, self._dtype, b - a, self._ctx(b - a, self._dtype, f"params/{s}", self.clock)))
        return out

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """``push(grad)`` then ``pull()``."""
        self.push(grad)
        return self.pull()

    # ---- server side (ps_server.ShardServer) --------------------------------------------------------
    @property
    def error(self) -> BaseException | None:
        """The server thread's failure, if any (servers only)."""
        return self.server.error if self.server is not None else None

    def serve(self) -> None:
        """Dedicated servers: serves until every worker has closed (or died)."""
        if self.server is not None:
            self.server.thread.join()
            if self.server.error is not None:
                raise self.server.error

    def server_stats(self) -> dict[int, dict[str, Any]]:
        """Instrumentation of the shards this rank serves: per shard, ``updates`` applied, ``duplicates``
        ((worker, clock) applied more than once), ``out_of_order`` pushes, ``max_staleness`` granted,
        ``clocks`` per worker, ``version`` (sync steps)."""
        return self.server.stats() if self.server is not None else {}

    def server_params(self) -> dict[int, torch.Tensor]:
        """Shard parameters held by this server rank (after :meth:`close`, every update is in)."""
        return self.server.params() if self.server is not None else {}

    def close(self) -> None:
        """Workers: tell the servers this worker is done; servers: wait until every worker is done."""
        if self._closed:
            return
        self._closed = True
        if self.is_worker:
            for srv in self.servers + self.replicas:
                try:
                    send_p2p(self.world.transport, srv, self.group.channel, TAG, [], {"t": "done"})
                except CommError:
                    pass
        self.serve()
