"""The parameter server's server thread: aggregation rounds and the training shards it serves.

One :class:`ShardServer` runs on each server rank (a daemon thread fed by a p2p :class:`Inbox`).
Aggregation rounds (``ParameterServer.allreduce``) complete once every live worker has pushed its
shard: exact shards are reduced in worker order; codec shards go through the gathered half of the
codec aggregation protocol (:func:`commlayer.codecs.aggregate.combine`: decode and sum, or the
codec's own one-shot mode such as majority vote), and the result is re-encoded with the downlink
codec. Training pushes and pulls are handed to the shard's optimizer state (:mod:`ps_optimizer`).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any, Protocol

import torch

from commlayer.codecs import Codec, from_spec, to_spec
from commlayer.codecs.aggregate import combine
from commlayer.topologies.comm import _TORCH_DTYPES, Group
from commlayer.topologies.p2p import Inbox, buf
from commlayer.topologies.ps_optimizer import Shard
from commlayer.topologies.ps_payload import AGG, PULL, TAG, codec_frames, decode, encoded_of, shard_ctx
from commlayer.topologies.reduce_ops import ReduceOp, combine_, finalize_
from commlayer.topologies.world_view import WorldView
from commlayer.transport.errors import CommError, PeerFailure
from commlayer.transport.envelope import Message
from commlayer.transport import envelope


class ServerHost(Protocol):
    """What the server thread reads of its :class:`~commlayer.topologies.ps.ParameterServer` (which builds it)."""

    world: WorldView
    group: Group
    me: int
    workers: list[int]
    mode: str
    staleness: int
    reply_channel: str
    downlink: Codec | None
    optimizer: str
    lr: float
    optimizer_options: dict


logger = logging.getLogger(__name__)


class ShardServer:
    """The server side of a :class:`~commlayer.topologies.ps.ParameterServer` on one server rank.

    Args:
        ps: the parameter server (its world, channels, workers, mode and optimizer settings).
    """

    def __init__(self, ps: ServerHost) -> None:
        self.ps = ps
        self.world = ps.world
        self.me = ps.me
        self.inbox = Inbox(ps.world.transport, ps.group.channel, TAG)
        self.shards: dict[int, Shard] = defaultdict(lambda: Shard(ps.mode, ps.staleness))
        self._agg: dict[tuple[int, int], dict[int, Message]] = defaultdict(dict)
        self._done: set[int] = set()
        self._codecs: dict[str, Codec] = {}
        self.error: BaseException | None = None
        ps.world.on_failure(lambda _r: self.inbox.wake())
        self.thread = threading.Thread(target=self._loop, name=f"ps-server-{self.me}", daemon=True)
        self.thread.start()

    def _ctx(self, n: int, dtype: torch.dtype, key: str, step: int) -> Any:
        return shard_ctx(self.ps.group.channel, self.world.seed, n, dtype, key, step)

    def _codec(self, spec: str) -> Codec | None:
        if not spec:
            return None
        if spec not in self._codecs:  # the server's own instances (never the co-located worker's)
            self._codecs[spec] = from_spec(spec)
        return self._codecs[spec]

    def live_workers(self) -> list[int]:
        return [w for w in self.ps.workers if w not in self.world.dead and w not in self._done]

    def _reply(self, w: int, seq: int, kind: str, s: int, frames: list, meta: dict) -> None:
        frames = [buf(f) for f in frames]
        h = envelope.data("ps", f"{self.ps.reply_channel}/{kind}", seq, self.me, chunk=s, meta=meta)
        try:
            self.world.transport.send(w, h, frames)
        except PeerFailure:
            pass

    def _loop(self) -> None:
        try:
            while True:
                m = self.inbox.take(lambda _m: True, 0.2)
                if m is not None:
                    self._handle(m)
                self._progress()
                if not self.live_workers():
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
            sh = self.shards[int(meta["s"])]
            if sh.params is None and w == self.ps.workers[0]:
                sh.init(decode(None, m, _TORCH_DTYPES[meta["dt"]], int(meta["n"]), None), self.ps.optimizer, self.ps.lr,
                        self.ps.optimizer_options)
        elif kind == "grad":
            s, c, n = int(meta["s"]), int(meta["c"]), int(meta["n"])
            sh = self.shards[s]
            if sh.params is None:
                raise CommError(f"parameter server: rank {w} pushed a gradient before init()")
            spec = meta.get("up", "")
            codec = self._codec(spec)
            ctx = self._ctx(n, sh.params.dtype, f"grad/{s}", c)
            if codec is not None and ctx is not None and sh.mode == "sync":  # aggregated encoded, with the clock's others
                sh.on_grad(w, c, (spec, codec, encoded_of(m), ctx))
            else:
                sh.on_grad(w, c, decode(codec, m, sh.params.dtype, n, ctx))
        elif kind == "pull":
            self.shards[int(meta["s"])].pending.append((w, int(meta["c"])))

    def _progress(self) -> None:
        live = self.live_workers()
        # Aggregation rounds: complete once every live worker has pushed.
        for key in sorted(self._agg):
            got = self._agg[key]
            if got and all(w in got for w in live):
                self._finish_agg(key, got)
                del self._agg[key]
        down = self.ps.downlink and self._codec(to_spec(self.ps.downlink))
        for s, sh in self.shards.items():
            sh.sync_steps(live)
            for w, c, oldest in sh.ready_pulls(live):
                assert sh.params is not None
                frames, _ = codec_frames(down, sh.params.detach().clone(), self._ctx(sh.params.numel(), sh.params.dtype, f"params/{s}", c))
                self._reply(w, c, PULL, s, frames, {"min": oldest})

    def _finish_agg(self, key: tuple[int, int], got: dict[int, Message]) -> None:
        r, s = key
        first = got[min(got)].header.meta
        n, dtype, op = int(first["n"]), _TORCH_DTYPES[first["dt"]], ReduceOp(first["op"])
        up, down = self._codec(first["up"]), self._codec(first["down"])
        ctx = self._ctx(n, dtype, f"up/{s}", r)
        if up is not None:
            # Linear payloads were divided by the group size before encoding: their decoded sum is the mean.
            mode = "allgather" if first["m"] == "allreduce" else first["m"]
            average = op == ReduceOp.AVG and first["m"] != "allreduce"
            res = combine(up, mode, [encoded_of(got[w]) for w in sorted(got)], ctx, average).to(dtype)
        else:
            res = None
            for w in sorted(got):
                part = decode(None, got[w], dtype, n, None)
                if res is None:
                    res = part
                else:
                    combine_(res, part, op)
            assert res is not None
            finalize_(res, op, len(got))
        assert res is not None
        frames, _ = codec_frames(down, res.reshape(-1).contiguous(), self._ctx(n, dtype, f"down/{s}", r))
        for w in sorted(got):
            self._reply(w, r, AGG, s, frames, {})

    def stats(self) -> dict[int, dict[str, Any]]:
        return {s: sh.stats() for s, sh in self.shards.items()}

    def params(self) -> dict[int, torch.Tensor]:
        return {s: sh.params.detach().clone() for s, sh in self.shards.items() if sh.params is not None}
