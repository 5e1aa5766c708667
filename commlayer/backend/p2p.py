"""Point-to-point operations and the barrier of the zmq process group.

Sends and receives need no executor: a send is handed to the transport at once and a receive
is matched by the transport's mailbox (by group channel, tag and source), which completes the
Work from the I/O thread.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from commlayer.backend.runtime import GroupRuntime
from commlayer.backend.tensors import check_cpu, one
from commlayer.backend.work import ZmqWork
from commlayer.topologies import linear
from commlayer.topologies.comm import frame_tensor, tensor_bytes, wire_dtype
from commlayer.transport.errors import CommError
from commlayer.transport import envelope


class PointToPoint:
    """Sends, receives and the barrier of one group (composed into ``ProcessGroupZMQ``)."""

    def __init__(self, rt: GroupRuntime) -> None:
        self.rt = rt

    def barrier(self, opts: dist.BarrierOptions | None) -> ZmqWork:
        return self.rt.run("barrier", [], linear.barrier, opts)

    def _peer(self, peer: int, what: str) -> int:
        rt = self.rt
        if not 0 <= peer < rt.size or peer == rt.rank:
            raise ValueError(f"{what}: expected a peer rank in [0, {rt.size}) other than this rank ({rt.rank}), got {peer}")
        return int(peer)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> ZmqWork:
        rt = self.rt
        one(tensors, "send")
        check_cpu(tensors, "send")
        rt.check_usable("send")
        dst = self._peer(dst, "send")
        t = tensors[0].detach()
        # Snapshot large tensors so the caller may reuse them at once; small ones are copied by ZeroMQ.
        snap = t.contiguous().clone() if t.numel() * t.element_size() >= rt.transport.config.copy_threshold else t.contiguous()
        data = tensor_bytes(snap)
        h = envelope.p2p(rt.group.channel, tag, rt.transport.rank, dtype=wire_dtype(t.dtype), shape=(t.numel(),))
        rt.transport.send(rt.group.ranks[dst], h, [data] if len(data) else [])
        return rt.done(tensors, f"send to rank {dst} (tag {tag}) in group {rt.label!r}")

    def recv(self, tensors: list[torch.Tensor], src: int | None, tag: int) -> ZmqWork:
        """Posts a receive from group rank ``src`` (``None``: any source) with ``tag``."""
        rt = self.rt
        what = "recv from any rank" if src is None else f"recv from rank {self._peer(src, 'recv')}"
        one(tensors, what)
        check_cpu(tensors, what)
        rt.check_usable(what)
        t = tensors[0]
        work = ZmqWork(list(tensors), f"{what} (tag {tag}) in group {rt.label!r}", rt.timeout)
        want = wire_dtype(t.dtype)
        ranks = rt.group.ranks

        def on_message(msg: Any, err: BaseException | None) -> None:
            if err is not None:
                work.set_error(err)
                return
            h = msg.header
            n = h.shape[0] if h.shape else 0
            if h.dtype != want or n != t.numel():
                work.set_error(CommError(f"rank {ranks.index(h.src)} sent {n} x {h.dtype}, the receiving tensor holds {t.numel()} x {want}"))
                return
            if n:
                t.copy_(frame_tensor(msg.frames[0], t.dtype).view_as(t))
            work._source = ranks.index(h.src)
            work.set_done()

        rt.transport.post_p2p(rt.group.channel, int(tag), None if src is None else ranks[src], on_message)
        work.on_timeout = lambda: rt.transport.cancel_p2p(rt.group.channel, int(tag), on_message)
        return work
