"""The collective and point-to-point methods of ``ProcessGroupZMQ`` (bound in its class body).

Argument lists follow what torch 2.13 passes (see shared/notes/torch-backend.md §5).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from commlayer.backend.tensors import Flat, bounds_of, check_cpu, translate_op
from commlayer.topologies import linear, tree
from commlayer.topologies.codec_allreduce import codec_allreduce
from commlayer.topologies.comm import OpComm, frame_tensor, tensor_bytes, wire_dtype
from commlayer.topologies.dense import allreduce as dense_allreduce
from commlayer.topologies.reduce_ops import ReduceOp, check_op, finalize_
from commlayer.topologies.ring import ring_allgather, ring_reduce_scatter
from commlayer.transport.errors import CommError
from commlayer.transport import envelope

if TYPE_CHECKING:
    from commlayer.backend.process_group import ProcessGroupZMQ
    from commlayer.backend.work import ZmqWork


def _reduce_inplace(pg: "ProcessGroupZMQ", name: str, tensors: Sequence[torch.Tensor], opts: Any) -> "ZmqWork":
    check_cpu(tensors, name)
    op, factor = translate_op(opts.reduceOp)
    flat = Flat(tensors)
    check_op(op, flat.buf.dtype)
    comp = pg.compression
    if comp is not None and comp.applies(op, flat.buf, factor):
        ctx = comp.context(flat.buf)  # numbered now, in issue order

        def lossy(comm: OpComm) -> None:
            algo = pg.options.algo if pg.options.algo in ("ring", "tree") else "auto"
            codec_allreduce(comm, flat.buf, comp.codec, ctx, algo=algo, average=op == ReduceOp.AVG,
                            order=pg.options.ring_order, chunk_bytes=pg.options.chunk_bytes)
            flat.commit()

        return pg.run(name, list(tensors), lossy, opts)

    adaptive = pg.adaptive

    def fn(comm: OpComm) -> None:
        if factor is not None:
            flat.buf.mul_(factor)
        if adaptive is not None:
            adaptive.run(comm, flat.buf, op)
        else:
            dense_allreduce(comm, flat.buf, op, pg.options.algo, pg.options.ring_order, pg.options.chunk_bytes)
        finalize_(flat.buf, op, comm.size)
        flat.commit()

    return pg.run(name, list(tensors), fn, opts)


def allreduce(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], opts: Any = None) -> "ZmqWork":
    return _reduce_inplace(self, "allreduce", tensors, opts)


def allreduce_coalesced(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], opts: Any = None) -> "ZmqWork":
    return _reduce_inplace(self, "allreduce_coalesced", tensors, opts)


def broadcast(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], opts: Any) -> "ZmqWork":
    check_cpu(tensors, "broadcast")
    _check_root(self, opts.rootRank, "broadcast")
    flat = Flat(tensors)

    def fn(comm: OpComm) -> None:
        tree.broadcast(comm, flat.buf, opts.rootRank)
        if comm.rank != opts.rootRank:
            flat.commit()

    return self.run("broadcast", list(tensors), fn, opts)


def reduce(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], opts: Any) -> "ZmqWork":
    check_cpu(tensors, "reduce")
    _check_root(self, opts.rootRank, "reduce")
    op, factor = translate_op(opts.reduceOp)
    flat = Flat(tensors)
    check_op(op, flat.buf.dtype)

    def fn(comm: OpComm) -> None:
        root = comm.rank == opts.rootRank
        buf = flat.buf if root else flat.buf.clone()
        if factor is not None:
            buf.mul_(factor)
        tree.binomial_reduce(comm, buf, op, opts.rootRank)
        if root:
            finalize_(buf, op, comm.size)
            flat.commit()

    return self.run("reduce", list(tensors), fn, opts)


def _gather_into(self: "ProcessGroupZMQ", name: str, outs: Sequence[torch.Tensor], inp: torch.Tensor, opts: Any) -> "ZmqWork":
    """All-gather of one input into ``outs[r]`` (any shapes; sizes may differ per rank)."""
    check_cpu([inp, *outs], name)
    if len(outs) != self.size():
        raise ValueError(f"{name}: expected {self.size()} output tensors, got {len(outs)}")
    if outs[self.rank()].numel() != inp.numel():
        raise ValueError(f"{name}: expected the input to have {outs[self.rank()].numel()} elements like this rank's output, got {inp.numel()}")
    dtype = inp.dtype
    for o in outs:
        if o.dtype != dtype:
            raise TypeError(f"{name}: expected output tensors of dtype {dtype}, got {o.dtype}")

    def fn(comm: OpComm) -> None:
        bounds = bounds_of([o.numel() for o in outs])
        flat = torch.empty(bounds[-1][1], dtype=dtype)
        lo, hi = bounds[comm.rank]
        flat[lo:hi].copy_(inp.reshape(-1))
        ring_allgather(comm, flat, bounds, chunk_bytes=self.options.chunk_bytes)
        for o, (a, b) in zip(outs, bounds):
            o.copy_(flat[a:b].view_as(o))

    return self.run(name, list(outs), fn, opts)


def allgather(self: "ProcessGroupZMQ", output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor],
              opts: Any = None) -> "ZmqWork":
    _one(input_tensors, "allgather")
    return _gather_into(self, "allgather", output_tensors[0], input_tensors[0], opts)


def all_gather_single(self: "ProcessGroupZMQ", output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> "ZmqWork":
    if output.numel() != input.numel() * self.size():
        raise ValueError(f"all_gather_into_tensor: expected an output of {input.numel() * self.size()} elements, got {output.numel()}")
    out = output if output.is_contiguous() else output.contiguous()
    outs = list(out.view(-1).chunk(self.size())) if out.numel() else [out.view(-1)[:0]] * self.size()
    work = _gather_into(self, "all_gather_into_tensor", outs, input, opts)
    if out is not output:
        work.wait()
        output.copy_(out)
    work._outputs = [output]
    return work


def allgather_coalesced(self: "ProcessGroupZMQ", output_lists: list[list[torch.Tensor]], input_list: list[torch.Tensor],
                        opts: Any = None) -> "ZmqWork":
    # One flat all-gather: rank r contributes cat(input_list); outputs are sliced back per tensor.
    p = self.size()
    sizes = [t.numel() for t in input_list]
    flats = [torch.empty(sum(sizes), dtype=input_list[0].dtype) for _ in range(p)]
    inp = torch.cat([t.reshape(-1) for t in input_list]) if input_list else torch.empty(0)
    work = _gather_into(self, "allgather_coalesced", flats, inp, opts)
    work.wait()
    for r, outs in enumerate(output_lists):
        off = 0
        for o in outs:
            o.copy_(flats[r][off:off + o.numel()].view_as(o))
            off += o.numel()
    return self.done([t for outs in output_lists for t in outs], "allgather_coalesced")


def all_gather_single_coalesced(self: "ProcessGroupZMQ", outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                opts: Any = None) -> "ZmqWork":
    works = [all_gather_single(self, o, i, opts) for o, i in zip(outputs, inputs)]
    return _chain(self, works, outputs, "all_gather_into_tensor_coalesced")


def gather(self: "ProcessGroupZMQ", output_lists: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any) -> "ZmqWork":
    _one(input_tensors, "gather")
    _check_root(self, opts.rootRank, "gather")
    inp = input_tensors[0].contiguous()
    outs = output_lists[0] if self.rank() == opts.rootRank else None
    if outs is not None and len(outs) != self.size():
        raise ValueError(f"gather: expected {self.size()} output tensors on the root, got {len(outs)}")
    return self.run("gather", list(outs or []), lambda comm: linear.gather(comm, inp, outs, opts.rootRank), opts)


def scatter(self: "ProcessGroupZMQ", output_tensors: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any) -> "ZmqWork":
    _one(output_tensors, "scatter")
    _check_root(self, opts.rootRank, "scatter")
    ins = [t.contiguous() for t in input_lists[0]] if self.rank() == opts.rootRank else None
    if ins is not None and len(ins) != self.size():
        raise ValueError(f"scatter: expected {self.size()} input tensors on the root, got {len(ins)}")
    out = output_tensors[0]
    return self.run("scatter", [out], lambda comm: linear.scatter(comm, ins, out, opts.rootRank), opts)


def _reduce_scatter_into(self: "ProcessGroupZMQ", name: str, out: torch.Tensor, ins: Sequence[torch.Tensor], opts: Any) -> "ZmqWork":
    check_cpu([out, *ins], name)
    if len(ins) != self.size():
        raise ValueError(f"{name}: expected {self.size()} input tensors, got {len(ins)}")
    op, factor = translate_op(opts.reduceOp)
    check_op(op, out.dtype)

    def fn(comm: OpComm) -> None:
        bounds = bounds_of([t.numel() for t in ins])
        flat = torch.cat([t.reshape(-1) for t in ins]) if ins else torch.empty(0, dtype=out.dtype)
        if factor is not None:
            flat.mul_(factor)
        ring_reduce_scatter(comm, flat, op, bounds, chunk_bytes=self.options.chunk_bytes)
        a, b = bounds[comm.rank]
        mine = flat[a:b]
        finalize_(mine, op, comm.size)
        out.copy_(mine.view_as(out))

    return self.run(name, [out], fn, opts)


def reduce_scatter(self: "ProcessGroupZMQ", output_tensors: list[torch.Tensor], input_lists: list[list[torch.Tensor]],
                   opts: Any = None) -> "ZmqWork":
    _one(output_tensors, "reduce_scatter")
    return _reduce_scatter_into(self, "reduce_scatter", output_tensors[0], input_lists[0], opts)


def reduce_scatter_single(self: "ProcessGroupZMQ", output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> "ZmqWork":
    if input.numel() != output.numel() * self.size():
        raise ValueError(f"reduce_scatter_tensor: expected an input of {output.numel() * self.size()} elements, got {input.numel()}")
    ins = list(input.reshape(-1).chunk(self.size())) if input.numel() else [input.reshape(-1)] * self.size()
    return _reduce_scatter_into(self, "reduce_scatter_tensor", output, ins, opts)


def reduce_scatter_single_coalesced(self: "ProcessGroupZMQ", outputs: list[torch.Tensor], inputs: list[torch.Tensor],
                                    opts: Any = None) -> "ZmqWork":
    works = [reduce_scatter_single(self, o, i, opts) for o, i in zip(outputs, inputs)]
    return _chain(self, works, outputs, "reduce_scatter_tensor_coalesced")


def alltoall(self: "ProcessGroupZMQ", output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor], opts: Any = None) -> "ZmqWork":
    check_cpu([*output_tensors, *input_tensors], "all_to_all")
    p = self.size()
    if len(output_tensors) != p or len(input_tensors) != p:
        raise ValueError(f"all_to_all: expected {p} input and {p} output tensors, got {len(input_tensors)} and {len(output_tensors)}")
    ins = [t.contiguous() for t in input_tensors]
    return self.run("all_to_all", list(output_tensors), lambda comm: linear.alltoall(comm, ins, output_tensors), opts)


def all_to_all_single(self: "ProcessGroupZMQ", output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int],
                      input_split_sizes: list[int], opts: Any = None) -> "ZmqWork":
    check_cpu([output, input], "all_to_all_single")
    p = self.size()
    osplit = list(output_split_sizes) or _even_split(output, p, "output")
    isplit = list(input_split_sizes) or _even_split(input, p, "input")
    if len(osplit) != p or len(isplit) != p or sum(osplit) != (output.shape[0] if output.dim() else 0) or sum(isplit) != (input.shape[0] if input.dim() else 0):
        raise ValueError(f"all_to_all_single: expected {p} split sizes summing to dim 0 (input {tuple(input.shape)}, output "
                         f"{tuple(output.shape)}), got input splits {isplit}, output splits {osplit}")
    ins = [t.contiguous() for t in input.split(isplit)]
    outs = list(output.split(osplit))
    return self.run("all_to_all_single", [output], lambda comm: linear.alltoall(comm, ins, outs), opts)


def barrier(self: "ProcessGroupZMQ", opts: Any = None) -> "ZmqWork":
    return self.run("barrier", [], linear.barrier, opts)


# ---- point to point -------------------------------------------------------------------------
def send(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], dstRank: int, tag: int) -> "ZmqWork":
    _one(tensors, "send")
    check_cpu(tensors, "send")
    self._check_usable("send")
    if not 0 <= dstRank < self.size() or dstRank == self.rank():
        raise ValueError(f"send: expected a destination rank in [0, {self.size()}) other than this rank ({self.rank()}), got {dstRank}")
    t = tensors[0].detach()
    # Snapshot large tensors so the caller may reuse them at once; small ones are copied by ZeroMQ.
    snap = t.contiguous().clone() if t.numel() * t.element_size() >= self.transport.config.copy_threshold else t.contiguous()
    data = tensor_bytes(snap)
    h = envelope.p2p(self.group.channel, tag, self.transport.rank, dtype=wire_dtype(t.dtype), shape=(t.numel(),))
    self.transport.send(self.group.ranks[dstRank], h, [data] if len(data) else [])
    return self.done(tensors, f"send to rank {dstRank} (tag {tag}) in group {self.group_label!r}")


def _post_recv(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], src: int | None, tag: int, what: str) -> "ZmqWork":
    from commlayer.backend.work import ZmqWork

    _one(tensors, what)
    check_cpu(tensors, what)
    self._check_usable(what)
    t = tensors[0]
    work = ZmqWork(list(tensors), f"{what} (tag {tag}) in group {self.group_label!r}", self.timeout)
    want = wire_dtype(t.dtype)

    def on_message(msg: Any, err: BaseException | None) -> None:
        if err is not None:
            work.set_error(err)
            return
        h = msg.header
        n = h.shape[0] if h.shape else 0
        if h.dtype != want or n != t.numel():
            work.set_error(CommError(f"rank {self.group.ranks.index(h.src)} sent {n} x {h.dtype}, the receiving tensor holds {t.numel()} x {want}"))
            return
        if n:
            t.copy_(frame_tensor(msg.frames[0], t.dtype).view_as(t))
        work._source = self.group.ranks.index(h.src)
        work.set_done()

    self.transport.post_p2p(self.group.channel, int(tag), None if src is None else self.group.ranks[src], on_message)
    work.on_timeout = lambda: self.transport.cancel_p2p(self.group.channel, int(tag), on_message)
    return work


def recv(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], srcRank: int, tag: int) -> "ZmqWork":
    if not 0 <= srcRank < self.size() or srcRank == self.rank():
        raise ValueError(f"recv: expected a source rank in [0, {self.size()}) other than this rank ({self.rank()}), got {srcRank}")
    return _post_recv(self, tensors, srcRank, tag, f"recv from rank {srcRank}")


def recv_anysource(self: "ProcessGroupZMQ", tensors: list[torch.Tensor], tag: int) -> "ZmqWork":
    return _post_recv(self, tensors, None, tag, "recv from any rank")


# ---- helpers ------------------------------------------------------------------------------------
def _one(tensors: Sequence[torch.Tensor], what: str) -> None:
    if len(tensors) != 1:
        raise ValueError(f"{what}: expected exactly one tensor per process on CPU, got {len(tensors)}")


def _check_root(pg: "ProcessGroupZMQ", root: int, what: str) -> None:
    if not 0 <= root < pg.size():
        raise ValueError(f"{what}: expected a root rank in [0, {pg.size()}), got {root}")


def _even_split(t: torch.Tensor, p: int, what: str) -> list[int]:
    n = t.shape[0] if t.dim() else 0
    if n % p:
        raise ValueError(f"all_to_all_single: expected the {what}'s dim 0 ({n}) divisible by the group size {p} when no split sizes are given")
    return [n // p] * p


def _chain(pg: "ProcessGroupZMQ", works: list["ZmqWork"], outputs: list[torch.Tensor], what: str) -> "ZmqWork":
    for w in works:
        w.wait()
    return pg.done(outputs, what)
