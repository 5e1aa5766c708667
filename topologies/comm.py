"""Group and per-operation communicators: the topologies' view of the transport.

A :class:`Group` is a set of global ranks talking on one channel of a transport. Each
operation gets an :class:`OpComm` with its own sequence number, so messages of different
operations never mix, and sends/receives speak in group ranks and algorithm steps.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import numpy as np
import torch
import zmq

from commlayer.transport.engine import Transport
from commlayer.transport.errors import CommError, CommTimeout, rewrap
from commlayer.transport.mailbox import Message
from commlayer.transport.wire import Header, Kind

_WIRE_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16", torch.int32: "int32",
    torch.int64: "int64", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
    torch.float64: "float64", torch.complex64: "complex64", torch.complex128: "complex128",
    torch.uint16: "uint16", torch.uint32: "uint32", torch.uint64: "uint64",
}
_TORCH_DTYPES = {v: k for k, v in _WIRE_DTYPES.items()}


def wire_dtype(dtype: torch.dtype) -> str:
    try:
        return _WIRE_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"Expected a dtype in {sorted(_WIRE_DTYPES.values())}, got {dtype}") from None


def tensor_bytes(t: torch.Tensor) -> Any:
    """A zero-copy byte view of a contiguous CPU tensor."""
    if not t.is_contiguous():
        raise ValueError("Expected a contiguous tensor")
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()


def frame_tensor(frame: Any, dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing a received frame (zero-copy; valid while the frame lives)."""
    buf = frame.buffer if isinstance(frame, zmq.Frame) else frame
    if len(buf) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(dtype)


class Group:
    """Ranks of one communicator over a transport.

    Args:
        transport: the process's transport.
        ranks: global rank of each group rank.
        channel: unique channel name of this group.
        timeout: default seconds for every wait.
    """

    def __init__(self, transport: Transport, ranks: Sequence[int], channel: str, timeout: float) -> None:
        self.transport = transport
        self.ranks = list(ranks)
        self.channel = channel
        self.timeout = timeout
        if transport.rank not in self.ranks:
            raise ValueError(f"Expected this process (global rank {transport.rank}) in the group's ranks, got {self.ranks}")
        self.rank = self.ranks.index(transport.rank)
        self.size = len(self.ranks)
        self._seq = 0
        self._lock = threading.Lock()

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def op(self, name: str, seq: int | None = None, timeout: float | None = None) -> "OpComm":
        return OpComm(self, name, self.next_seq() if seq is None else seq, self.timeout if timeout is None else timeout)


class OpComm:
    """Sends and receives of one operation, addressed by group rank and algorithm step."""

    def __init__(self, group: Group, op: str, seq: int, timeout: float) -> None:
        self.group = group
        self.op = op
        self.seq = seq
        self.timeout = timeout
        self.rank = group.rank
        self.size = group.size
        self._t = group.transport
        self._trackers: list[tuple[int, zmq.MessageTracker]] = []
        self.step_offset = 0

    def shifted(self, offset: int) -> "OpComm":
        """The same operation with steps moved by ``offset``, so several phases (e.g. PowerSGD's two
        all-reduces) can run inside one operation without their messages colliding."""
        other = OpComm(self.group, self.op, self.seq, self.timeout)
        other.step_offset = self.step_offset + offset
        return other

    def describe(self, step: int | None = None) -> str:
        s = f"{self.op} #{self.seq} in group {self.group.channel!r} (rank {self.rank} of {self.size})"
        return s if step is None else f"{s}, step {step}"

    def send(self, peer: int, step: int, frames: Sequence[Any], chunk: int = 0, dtype: str = "", shape: Sequence[int] = (),
             meta: dict[str, Any] | None = None, track: bool = False) -> None:
        """Sends raw frames to group rank ``peer``."""
        sizes = tuple(f.nbytes if isinstance(f, (memoryview, np.ndarray)) else len(f) for f in frames)
        h = Header(Kind.DATA, self.op, self.group.channel, self.seq, step + self.step_offset, chunk, self.group.transport.rank, dtype,
                   tuple(shape), sizes, meta or {})
        dst = self.group.ranks[peer]
        tr = self._t.send(dst, h, frames, track=track)
        if tr:
            self._trackers.extend((dst, t) for t in tr)

    def send_tensor(self, peer: int, step: int, t: torch.Tensor, chunk: int = 0, copy: bool = False) -> None:
        """Sends a contiguous tensor. Unless ``copy``, large ones go zero-copy and :meth:`finish` waits
        until ZeroMQ has released them, so the caller may reuse the memory afterwards."""
        data = tensor_bytes(t)
        if copy and len(data):
            data = bytes(data)
        self.send(peer, step, [data] if len(data) else [], chunk, wire_dtype(t.dtype), (t.numel(),), track=not copy)

    def recv(self, peer: int, step: int, chunk: int = 0) -> Message:
        msg = self._t.recv(self.group.channel, self.seq, step + self.step_offset, chunk, self.group.ranks[peer], self.timeout,
                           self.describe(step + self.step_offset))
        if msg.header.op != self.op:
            raise CommError(f"collective mismatch: rank {peer} of group {self.group.channel!r} sent {msg.header.op} #{self.seq} "
                            f"while this rank runs {self.op} #{self.seq}; every rank must call the same collectives in the same order")
        return msg

    def recv_tensor(self, peer: int, step: int, dtype: torch.dtype, numel: int, chunk: int = 0) -> torch.Tensor:
        """Receives a tensor (a zero-copy view of the received frame) and checks its dtype and size."""
        msg = self.recv(peer, step, chunk)
        want = wire_dtype(dtype)
        got_numel = msg.header.shape[0] if msg.header.shape else 0
        if msg.header.dtype != want or got_numel != numel:
            raise CommError(f"{self.describe(step)}: rank {peer} sent {got_numel} x {msg.header.dtype or 'bytes'}, expected {numel} x {want}; "
                            "every rank must pass tensors of the same dtype and size")
        return frame_tensor(msg.frames[0], dtype) if numel else torch.empty(0, dtype=dtype)

    def finish(self) -> None:
        """Waits until ZeroMQ no longer reads any zero-copy buffer this operation sent.

        Raises:
            PeerFailure (or the group's abort error): the destination died, so its data never drains.
            CommTimeout: not drained within the operation's timeout.
        """
        deadline = time.monotonic() + self.timeout
        mb = self._t.mailbox
        for dst, tr in self._trackers:
            while not tr.done:
                err = mb.failure_for(self.group.channel, dst)
                if err is not None:
                    self._trackers.clear()
                    raise rewrap(err, f"{self.describe()}: data for rank {dst} cannot be delivered: {err}")
                if time.monotonic() > deadline:
                    self._trackers.clear()
                    raise CommTimeout(f"{self.describe()}: data for rank {dst} not flushed within {self.timeout:.0f} s")
                try:
                    tr.wait(0.05)
                except zmq.NotDone:
                    pass
        self._trackers.clear()
