"""Parameter server: tensors sharded over S server ranks; workers push, servers aggregate and serve pulls.

Two uses:

* :func:`ps_allreduce` is a plain exact collective (every rank pushes shard s to server rank s,
  which reduces in rank order and sends the result back). ``COMMLAYER_ALGO=ps`` uses it in the
  zmq backend (``COMMLAYER_PS_SERVERS`` servers, default 1).
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
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Sequence

import torch

from commlayer.codecs import Codec, CodecContext, aggregation_mode, from_frames, from_spec, to_frames, to_spec
from commlayer.topologies.base import Guarantee, Topology
from commlayer.topologies.comm import Group, OpComm, frame_tensor, tensor_bytes, wire_dtype, _TORCH_DTYPES
from commlayer.topologies.p2p import Inbox, buf, send_p2p
from commlayer.topologies.reduce_ops import ReduceOp, combine_, finalize_
from commlayer.topologies.ring import even_bounds
from commlayer.transport.errors import CommError, PeerFailure
from commlayer.transport import envelope
from commlayer.transport.envelope import Message

if TYPE_CHECKING:
    from commlayer.topologies.world import World

logger = logging.getLogger(__name__)

TAG = 9
MODES = ("sync", "async")
OPTIMIZERS = ("sgd", "adam")
_AGG, _PULL = "agg", "pull"  # reply kinds: each has its own reply channel; the shard is the reply's chunk


def default_servers(size: int) -> int:
    return max(1, min(size, int(os.environ.get("COMMLAYER_PS_SERVERS", "1"))))


def ps_allreduce(comm: OpComm, flat: torch.Tensor, op: ReduceOp, servers: int | None = None) -> None:
    """Exact all-reduce of ``flat`` in place through ``servers`` co-located servers (group ranks 0..S-1).

    Server s reduces block s of every rank in rank order and sends it back, so every rank ends
    with identical bits. AVG is left as a SUM (the caller divides), as in the other collectives.
    """
    p, me, n = comm.size, comm.rank, flat.numel()
    comm.declare(count=n, dtype=flat.dtype, redop=op)
    if p == 1 or n == 0:
        return
    s_count = min(p, servers or default_servers(p))
    bounds = even_bounds(n, s_count)
    for s, (a, b) in enumerate(bounds):
        if s != me and b > a:
            comm.send_tensor(s, 0, flat[a:b], copy=True)
    if me < s_count:
        a, b = bounds[me]
        if b > a:
            acc = None
            for w in range(p):
                part = flat[a:b] if w == me else comm.recv_tensor(w, 0, flat.dtype, b - a)
                if acc is None:
                    acc = part.clone()
                else:
                    combine_(acc, part, op)
            for w in range(p):
                if w != me:
                    comm.send_tensor(w, 1, acc)
            flat[a:b].copy_(acc)
    for s, (a, b) in enumerate(bounds):
        if s != me and b > a:
            flat[a:b].copy_(comm.recv_tensor(s, 1, flat.dtype, b - a))
    comm.finish()


def _raw(t: torch.Tensor) -> list:
    return [tensor_bytes(t.contiguous())] if t.numel() else []


def _codec_frames(codec: Codec | None, t: torch.Tensor, ctx: CodecContext | None) -> tuple[list, dict]:
    if codec is None:
        return _raw(t), {"dt": wire_dtype(t.dtype)}
    assert ctx is not None
    header, buffers = to_frames(codec.encode(t, ctx))
    return [header, *buffers], {"dt": wire_dtype(t.dtype)}


def _decode(codec: Codec | None, m: Message, dtype: torch.dtype, n: int, ctx: CodecContext | None) -> torch.Tensor:
    frames = [buf(f) for f in m.frames]
    if codec is None:
        if sum(memoryview(f).nbytes for f in frames) != n * torch.empty((), dtype=dtype).element_size():
            raise CommError(f"parameter server: rank {m.header.src} sent a payload of the wrong size for {n} x {dtype}")
        return frame_tensor(frames[0], dtype).clone() if n else torch.empty(0, dtype=dtype)
    assert ctx is not None
    return codec.decode(from_frames(frames[0], frames[1:]), ctx).reshape(-1)


class _Shard:
    """Training state of one shard on its server."""

    def __init__(self) -> None:
        self.params: torch.Tensor | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.clock: dict[int, int] = defaultdict(int)         # updates received per worker
        self.version = 0                                       # sync: optimizer steps taken
        self.sync_buf: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        self.sync_vote: dict[int, bool] = {}                   # clock -> aggregate by majority vote
        self.applied: dict[tuple[int, int], int] = defaultdict(int)
        self.out_of_order = 0
        self.max_staleness = 0
        self.pending: list[tuple[int, int]] = []


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
    """

    name = "ps"

    def __init__(self, world: "World", group: Group, servers: "int | Sequence[int]" = 1, workers: Sequence[int] | None = None,
                 mode: str = "sync", staleness: int = 0, uplink: "str | Codec | None" = None, downlink: "str | Codec | None" = None,
                 optimizer: str = "sgd", lr: float = 0.01, optimizer_options: dict | None = None) -> None:
        super().__init__(world, group)
        self.servers = list(range(servers)) if isinstance(servers, int) else list(servers)
        self.workers = list(range(world.size)) if workers is None else list(workers)
        if not self.servers or not set(self.servers) <= set(range(world.size)) or not set(self.workers) <= set(range(world.size)):
            raise ValueError(f"Expected server and worker ranks in [0, {world.size}), got servers {self.servers}, workers {self.workers}")
        if mode not in MODES or staleness < 0 or optimizer not in OPTIMIZERS:
            raise ValueError(f"Expected mode in {MODES}, staleness >= 0 and optimizer in {OPTIMIZERS}, got {mode!r}, {staleness}, {optimizer!r}")
        self.mode, self.staleness = mode, staleness if mode == "async" else 0
        self.uplink, self.downlink = self.codec(uplink), self.codec(downlink)
        self.optimizer, self.lr, self.optimizer_options = optimizer, lr, dict(optimizer_options or {})
        self.me = world.rank
        self.is_worker = self.me in self.workers
        self.is_server = self.me in self.servers
        self.reply_channel = group.channel + "/r"
        self.clock = 0
        self.round = 0
        self.max_staleness_seen = 0
        self._numel = -1
        self._dtype = torch.float32
        self._thread: threading.Thread | None = None
        self._closed = False
        if self.is_server:
            self._srv_inbox = Inbox(world.transport, group.channel, TAG)
            self._shards: dict[int, _Shard] = defaultdict(_Shard)
            self._agg: dict[tuple[int, int], dict[int, Message]] = defaultdict(dict)
            self._done: set[int] = set()
            self._srv_codecs: dict[str, Codec] = {}
            self.error: BaseException | None = None
            world.on_failure(lambda _r: self._srv_inbox.wake())
            self._thread = threading.Thread(target=self._serve_loop, name=f"ps-server-{self.me}", daemon=True)
            self._thread.start()

    # ---- worker side: aggregation rounds ----------------------------------------------------------
    def guarantee(self, codec: "str | Codec | None" = None) -> Guarantee:
        if self.codec(codec) is None and self.downlink is None:
            return Guarantee(True, "exact: servers reduce every worker's shard in worker order")
        return Guarantee(False, "servers decode every payload and aggregate as the codec's reference aggregation "
                                "(majority vote for sign:scale=none), then re-encode with the downlink codec")

    def _server_of(self, s: int) -> int:
        return self.servers[s]

    def _ctx(self, n: int, dtype: torch.dtype, key: str, step: int) -> CodecContext | None:
        if not dtype.is_floating_point:  # never encoded (codecs take floating tensors only)
            return None
        return CodecContext((n,), dtype, f"{self.group.channel}/{key}", step, self.world.seed)

    def _recv_reply(self, seq: int, kind: str, s: int) -> Message:
        return self.world.transport.recv(f"{self.reply_channel}/{kind}", seq, 0, s, self._server_of(s), self.world.timeout,
                                         f"parameter server {kind} reply #{seq}, shard {s}")

    def _allreduce(self, flat: torch.Tensor, op: ReduceOp, codec: Codec | None, downlink: "str | Codec | None" = None) -> torch.Tensor:
        if not self.is_worker:
            raise RuntimeError("Expected a worker rank: dedicated servers call serve()")
        if set(self.workers) != set(range(self.size)):
            raise RuntimeError("Expected every rank to be a worker for allreduce(); dedicated servers serve training only")
        down = self.codec(downlink) if downlink is not None else self.downlink
        mode = aggregation_mode(codec) if codec is not None else ""
        if mode == "powersgd":
            raise ValueError("Expected a one-shot codec: PowerSGD's two-round protocol needs an all-reduce topology")
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
            frames, meta = _codec_frames(codec, part.clone(), self._ctx(b - a, flat.dtype, f"up/{s}", r))
            send_p2p(self.world.transport, self._server_of(s), self.group.channel, TAG, frames,
                     {**meta_common, **meta, "s": s, "n": b - a})
        for s, (a, b) in enumerate(bounds):
            m = self._recv_reply(r, _AGG, s)
            flat[a:b].copy_(_decode(down, m, flat.dtype, b - a, self._ctx(b - a, flat.dtype, f"down/{s}", r)))
        return flat

    # ---- worker side: training ----------------------------------------------------------------------
    def init(self, params: torch.Tensor) -> torch.Tensor:
        """Registers the flat parameters (the first worker's values win) and returns them as the servers hold them."""
        flat = params.detach().reshape(-1).contiguous()
        self._numel, self._dtype = flat.numel(), flat.dtype
        for s, (a, b) in enumerate(even_bounds(flat.numel(), len(self.servers))):
            send_p2p(self.world.transport, self._server_of(s), self.group.channel, TAG, _raw(flat[a:b].clone()),
                     {"t": "init", "s": s, "n": b - a, "dt": wire_dtype(flat.dtype)})
        return self.pull()

    def push(self, grad: torch.Tensor, codec: "str | Codec | None" = None) -> None:
        """Sends this worker's gradient for its current clock (encoded with ``codec`` or the uplink codec)."""
        c = self.codec(codec) if codec is not None else self.uplink
        flat = grad.detach().reshape(-1).to(self._dtype).contiguous()
        if flat.numel() != self._numel:
            raise ValueError(f"Expected a gradient of {self._numel} elements (call init() first), got {flat.numel()}")
        up = to_spec(c) if c else ""
        for s, (a, b) in enumerate(even_bounds(flat.numel(), len(self.servers))):
            frames, meta = _codec_frames(c, flat[a:b].clone(), self._ctx(b - a, self._dtype, f"grad/{s}", self.clock))
            send_p2p(self.world.transport, self._server_of(s), self.group.channel, TAG, frames,
                     {**meta, "t": "grad", "s": s, "c": self.clock, "n": b - a, "up": up})
        self.clock += 1

    def pull(self) -> torch.Tensor:
        """Parameters for this worker's clock (waits as the mode and staleness bound require)."""
        out = torch.empty(self._numel, dtype=self._dtype)
        bounds = even_bounds(self._numel, len(self.servers))
        for s, (a, b) in enumerate(bounds):
            send_p2p(self.world.transport, self._server_of(s), self.group.channel, TAG, [],
                     {"t": "pull", "s": s, "c": self.clock})
        for s, (a, b) in enumerate(bounds):
            m = self._recv_reply(self.clock, _PULL, s)
            self.max_staleness_seen = max(self.max_staleness_seen, self.clock - int(m.header.meta["min"]))
            out[a:b].copy_(_decode(self.downlink, m, self._dtype, b - a, self._ctx(b - a, self._dtype, f"params/{s}", self.clock)))
        return out

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        """``push(grad)`` then ``pull()``."""
        self.push(grad)
        return self.pull()

    # ---- server side --------------------------------------------------------------------------------
    def _srv_codec(self, spec: str) -> Codec | None:
        if not spec:
            return None
        if spec not in self._srv_codecs:  # the server's own instances (never the co-located worker's)
            self._srv_codecs[spec] = from_spec(spec)
        return self._srv_codecs[spec]

    def _live_workers(self) -> list[int]:
        return [w for w in self.workers if w not in self.world.dead and w not in self._done]

    def _reply(self, w: int, seq: int, kind: str, s: int, frames: list, meta: dict) -> None:
        frames = [buf(f) for f in frames]
        h = envelope.data("ps", f"{self.reply_channel}/{kind}", seq, self.me, chunk=s, meta=meta)
        try:
            self.world.transport.send(w, h, frames)
        except PeerFailure:
            pass

    def _serve_loop(self) -> None:
        try:
            while True:
                m = self._srv_inbox.take(lambda _m: True, 0.2)
                if m is not None:
                    self._handle(m)
                self._progress()
                if not self._live_workers():
                    return
        except BaseException as exc:  # reported by serve()/close()
            if not isinstance(exc, CommError) or not self.world.transport.closed:
                logger.exception("parameter server on rank %d failed", self.me)
                self.error = exc

    def _handle(self, m: Message) -> None:
        meta = m.header.meta
        kind, w = meta.get("t"), m.header.src
        if kind == "done":
            self._done.add(w)
        elif kind == "agg":
            self._agg[(int(meta["r"]), int(meta["s"]))][w] = m
        elif kind == "init":
            sh = self._shards[int(meta["s"])]
            if sh.params is None and w == self.workers[0]:
                sh.params = _decode(None, m, _TORCH_DTYPES[meta["dt"]], int(meta["n"]), None)
                opts = dict(self.optimizer_options)
                p = torch.nn.Parameter(sh.params, requires_grad=False)
                sh.params = p
                sh.opt = (torch.optim.SGD if self.optimizer == "sgd" else torch.optim.Adam)([p], lr=self.lr, **opts)
        elif kind == "grad":
            self._on_grad(w, m)
        elif kind == "pull":
            self._shards[int(meta["s"])].pending.append((w, int(meta["c"])))

    def _on_grad(self, w: int, m: Message) -> None:
        meta = m.header.meta
        s, c, n = int(meta["s"]), int(meta["c"]), int(meta["n"])
        sh = self._shards[s]
        if sh.params is None:
            raise CommError(f"parameter server: rank {w} pushed a gradient before init()")
        codec = self._srv_codec(meta.get("up", ""))
        grad = _decode(codec, m, sh.params.dtype, n, self._ctx(n, sh.params.dtype, f"grad/{s}", c))
        if c != sh.clock[w]:
            sh.out_of_order += 1
        sh.clock[w] = max(sh.clock[w], c + 1)
        if self.mode == "async":
            self._apply(sh, grad)
            sh.applied[(w, c)] += 1
        else:
            sh.sync_buf[c][w] = grad
            sh.sync_vote[c] = codec is not None and aggregation_mode(codec) == "majority_vote"

    def _apply(self, sh: _Shard, grad: torch.Tensor) -> None:
        assert sh.params is not None and sh.opt is not None
        sh.params.grad = grad.to(sh.params.dtype)
        sh.opt.step()
        sh.params.grad = None

    def _progress(self) -> None:
        live = self._live_workers()
        # Aggregation rounds: complete once every live worker has pushed.
        for key in sorted(self._agg):
            got = self._agg[key]
            if got and all(w in got for w in live):
                self._finish_agg(key, got)
                del self._agg[key]
        for s, sh in self._shards.items():
            # Sync training: one optimizer step per clock on the mean (or majority vote) of live workers' gradients.
            while self.mode == "sync" and sh.version in sh.sync_buf:
                got = sh.sync_buf[sh.version]
                ws = sorted(got)
                if not ws or not all(w in got for w in live):
                    break
                grads = [got[w] for w in ws]
                if sh.sync_vote.pop(sh.version, False):
                    g = torch.sign(torch.stack(grads).sum(0))
                else:
                    acc = torch.zeros_like(grads[0], dtype=torch.float64 if grads[0].dtype == torch.float64 else torch.float32)
                    for x in grads:
                        acc += x
                    g = acc / len(grads)
                self._apply(sh, g)
                for w in ws:
                    sh.applied[(w, sh.version)] += 1
                del sh.sync_buf[sh.version]
                sh.version += 1
            self._answer_pulls(s, sh, live)

    def _answer_pulls(self, s: int, sh: _Shard, live: list[int]) -> None:
        if sh.params is None or not sh.pending:
            return
        floor = min((sh.clock[w] for w in live), default=10**9)
        if self.mode == "sync":
            floor = sh.version
        keep = []
        for w, c in sh.pending:
            if floor >= c - self.staleness and (self.mode == "sync" or sh.clock[w] >= c):
                sh.max_staleness = max(sh.max_staleness, c - min(floor, c))
                frames, _ = _codec_frames(self.downlink and self._srv_codec(to_spec(self.downlink)), sh.params.detach().clone(),
                                          self._ctx(sh.params.numel(), sh.params.dtype, f"params/{s}", c))
                self._reply(w, c, _PULL, s, frames, {"min": min(floor, c)})
            else:
                keep.append((w, c))
        sh.pending = keep

    def _finish_agg(self, key: tuple[int, int], got: dict[int, Message]) -> None:
        r, s = key
        first = got[min(got)].header.meta
        n, dtype, op = int(first["n"]), _TORCH_DTYPES[first["dt"]], ReduceOp(first["op"])
        up, down = self._srv_codec(first["up"]), self._srv_codec(first["down"])
        ctx = self._ctx(n, dtype, f"up/{s}", r)
        if up is not None and first["m"] == "majority_vote":
            payloads = [from_frames(buf(got[w].frames[0]), [buf(f) for f in got[w].frames[1:]]) for w in sorted(got)]
            res = up.majority_vote(payloads, ctx) if hasattr(up, "majority_vote") else up.inner.majority_vote(payloads, ctx)  # type: ignore[attr-defined]
        elif up is not None:
            acc = torch.zeros(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
            for w in sorted(got):
                acc += _decode(up, got[w], dtype, n, ctx).to(acc.dtype)
            if op == ReduceOp.AVG and first["m"] != "allreduce":  # linear codecs were divided before encoding
                acc /= len(got)
            res = acc.to(dtype)
        else:
            res = None
            for w in sorted(got):
                part = _decode(None, got[w], dtype, n, None)
                if res is None:
                    res = part
                else:
                    combine_(res, part, op)
            assert res is not None
            finalize_(res, op, len(got))
        frames, _ = _codec_frames(down, res.reshape(-1).contiguous(), self._ctx(n, dtype, f"down/{s}", r))
        for w in sorted(got):
            self._reply(w, r, _AGG, s, frames, {})

    def serve(self) -> None:
        """Dedicated servers: serves until every worker has closed (or died)."""
        if self._thread is not None:
            self._thread.join()
        if self.is_server and self.error is not None:
            raise self.error

    def server_stats(self) -> dict[int, dict[str, Any]]:
        """Instrumentation of the shards this rank serves: per shard, ``updates`` applied, ``duplicates``
        ((worker, clock) applied more than once), ``out_of_order`` pushes, ``max_staleness`` granted,
        ``clocks`` per worker, ``version`` (sync steps)."""
        if not self.is_server:
            return {}
        return {s: {"updates": sum(sh.applied.values()), "duplicates": sum(1 for v in sh.applied.values() if v > 1),
                    "applied_keys": len(sh.applied), "out_of_order": sh.out_of_order, "max_staleness": sh.max_staleness,
                    "clocks": dict(sh.clock), "version": sh.version}
                for s, sh in self._shards.items()}

    def server_params(self) -> dict[int, torch.Tensor]:
        """Shard parameters held by this server rank (after :meth:`close`, every update is in)."""
        if not self.is_server:
            return {}
        return {s: sh.params.detach().clone() for s, sh in self._shards.items() if sh.params is not None}

    def close(self) -> None:
        """Workers: tell the servers this worker is done; servers: wait until every worker is done."""
        if self._closed:
            return
        self._closed = True
        if self.is_worker:
            for srv in self.servers:
                try:
                    send_p2p(self.world.transport, srv, self.group.channel, TAG, [], {"t": "done"})
                except CommError:
                    pass
        self.serve()
