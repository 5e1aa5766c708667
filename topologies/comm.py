"""Group and per-operation communicators: the topologies' view of the transport.

A :class:`Group` is a set of global ranks talking on one channel of a transport. Each
operation gets an :class:`OpComm` with its own sequence number, so messages of different
operations never mix, and sends/receives speak in group ranks and algorithm steps.

Every message of an operation carries the call's fingerprint (:meth:`OpComm.declare`: kind, root,
count, dtype, reduce op, and with ``COMMLAYER_DEBUG=detail`` the shapes); the transport compares
it with this rank's own call and fails every rank of the group at once on any disagreement. In
rooted collectives some ranks would never hear from the others (a broadcast root only sends), so
there every rank also sends its fingerprint to every other and waits for theirs in :meth:`finish`.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np
import torch

from commlayer.transport import envelope
from commlayer.transport.config import debug_detail
from commlayer.transport.engine import Transport
from commlayer.transport.errors import CommError
from commlayer.transport.flush import Flush
from commlayer.transport.envelope import Message
from commlayer.transport.wire import Call

CONFIRM_STEP = -1  # the fingerprint-only message of rooted collectives
_SHAPE_CHECKED = ("allreduce", "allreduce_coalesced", "broadcast", "reduce", "allgather", "_allgather_base",
                  "allgather_into_tensor_coalesced", "reduce_scatter", "_reduce_scatter_base", "reduce_scatter_tensor_coalesced")

_WIRE_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8", torch.int16: "int16", torch.int32: "int32",
    torch.int64: "int64", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
    torch.float64: "float64", torch.complex64: "complex64", torch.complex128: "complex128",
    torch.uint16: "uint16", torch.uint32: "uint32", torch.uint64: "uint64",
}
_TORCH_DTYPES = {v: k for k, v in _WIRE_DTYPES.items()}
WIRE_DTYPES: tuple[torch.dtype, ...] = tuple(_WIRE_DTYPES)  # every dtype the wire carries, in a fixed order


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
    buf = getattr(frame, "buffer", frame)  # the transport delivers memoryviews; a raw frame object still works
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
        self.detail = debug_detail()

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def op(self, name: str, seq: int | None = None, timeout: float | None = None,
           tensors: Sequence[torch.Tensor] = ()) -> "OpComm":
        """A communicator for the next operation; ``tensors`` (the call's) are compared across ranks in detail mode."""
        shapes = tuple(tuple(t.shape) for t in tensors) if self.detail and name in _SHAPE_CHECKED and tensors else None
        return OpComm(self, name, self.next_seq() if seq is None else seq, self.timeout if timeout is None else timeout, shapes)


class _CallState:
    __slots__ = ("call", "confirm", "flush")

    def __init__(self) -> None:
        self.call: Call | None = None
        self.confirm = False
        self.flush = Flush()


class OpComm:
    """Sends and receives of one operation, addressed by group rank and algorithm step."""

    def __init__(self, group: Group, op: str, seq: int, timeout: float, shapes: tuple[tuple[int, ...], ...] | None = None,
                 state: _CallState | None = None) -> None:
        self.group = group
        self.op = op
        self.seq = seq
        self.timeout = timeout
        self.rank = group.rank
        self.size = group.size
        self.shapes = shapes
        self._t = group.transport
        self._state = state or _CallState()
        self.step_offset = 0

    def shifted(self, offset: int) -> "OpComm":
        """The same operation with steps moved by ``offset``, so several phases (e.g. PowerSGD's two
        all-reduces) can run inside one operation without their messages colliding."""
        other = OpComm(self.group, self.op, self.seq, self.timeout, self.shapes, self._state)
        other.step_offset = self.step_offset + offset
        return other

    @property
    def call(self) -> Call | None:
        return self._state.call

    def declare(self, root: int = -1, count: int = -1, dtype: torch.dtype | None = None, redop: Any = "",
                confirm: bool = False) -> None:
        """Records this call's fingerprint before its first message (later declarations are ignored).

        Args:
            root: group rank of the root (rooted collectives).
            count: elements of the call.
            dtype: element type of the call.
            redop: the reduction (a ReduceOp or its name).
            confirm: every rank sends its fingerprint to every other and :meth:`finish` waits for theirs
                (for collectives in which some rank would otherwise never hear from some other); always on
                for an empty call (``count == 0``).

        Raises:
            CollectiveMismatch: a message of this call that already arrived disagrees.
        """
        st = self._state
        if st.call is not None:
            return
        # A rank with nothing to send would otherwise return at once, successful, whatever the others called.
        confirm = confirm or count == 0
        name = getattr(redop, "name", redop)
        st.call = Call(int(root), int(count), wire_dtype(dtype) if dtype is not None else "", str(name).lower(), self.shapes)
        self._t.expect(self.group.channel, self.seq, self.op, st.call, self.group.ranks)
        if confirm and self.size > 1:
            st.confirm = True
            for peer in range(self.size):
                if peer != self.rank:
                    self._send(peer, CONFIRM_STEP, [])

    def _ensure_declared(self) -> None:
        if self._state.call is None:
            self.declare()

    def describe(self, step: int | None = None) -> str:
        s = f"{self.op} #{self.seq} in group {self.group.channel!r} (rank {self.rank} of {self.size})"
        return s if step is None else f"{s}, step {step}"

    def send(self, peer: int, step: int, frames: Sequence[Any], chunk: int = 0, dtype: str = "", shape: Sequence[int] = (),
             meta: dict[str, Any] | None = None, track: bool = False) -> None:
        """Sends raw frames to group rank ``peer``."""
        self._ensure_declared()
        self._send(peer, step + self.step_offset, frames, chunk, dtype, shape, meta, track)

    def _send(self, peer: int, step: int, frames: Sequence[Any], chunk: int = 0, dtype: str = "", shape: Sequence[int] = (),
              meta: dict[str, Any] | None = None, track: bool = False) -> None:
        sizes = tuple(f.nbytes if isinstance(f, (memoryview, np.ndarray)) else len(f) for f in frames)
        h = envelope.collective(self.op, self.group.channel, self.seq, self._t.rank, self._state.call, step=step, chunk=chunk,
                                dtype=dtype, shape=shape, nbytes=sizes, meta=meta)
        try:
            flush = self._t.send(self.group.ranks[peer], h, frames, track=track)
        except CommError as exc:
            cause = self._t.failure_for(self.group.channel, None)  # a mismatch found elsewhere is the root cause
            if cause is not None and cause is not exc:
                raise cause from exc
            raise
        if flush:
            self._state.flush.extend(flush)

    def send_tensor(self, peer: int, step: int, t: torch.Tensor, chunk: int = 0, copy: bool = False) -> None:
        """Sends a contiguous tensor. Unless ``copy``, large ones go zero-copy and :meth:`finish` waits
        until ZeroMQ has released them, so the caller may reuse the memory afterwards."""
        data = tensor_bytes(t)
        if copy and len(data):
            data = bytes(data)
        self.send(peer, step, [data] if len(data) else [], chunk, wire_dtype(t.dtype), (t.numel(),), track=not copy)

    def recv(self, peer: int, step: int, chunk: int = 0) -> Message:
        self._ensure_declared()
        return self._recv(peer, step + self.step_offset, chunk)

    def _recv(self, peer: int, step: int, chunk: int = 0) -> Message:
        msg = self._t.recv(self.group.channel, self.seq, step, chunk, self.group.ranks[peer], self.timeout, self.describe(step))
        if msg.header.op != self.op:  # the transport already compared the fingerprints; kept as a last guard
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
        """Waits for the other ranks' fingerprints (rooted collectives) and until ZeroMQ no longer reads any
        zero-copy buffer this operation sent.

        Raises:
            CollectiveMismatch: another rank called something else.
            PeerFailure (or the group's abort error): the destination died, so its data never drains.
            CommTimeout: not drained within the operation's timeout.
        """
        st = self._state
        if st.confirm:
            st.confirm = False
            for peer in range(self.size):
                if peer != self.rank:
                    self._recv(peer, CONFIRM_STEP)
        flush, st.flush = st.flush, Flush()
        self._t.wait_flushed(flush, self.group.channel, self.timeout, self.describe())
