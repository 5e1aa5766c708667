"""``ProcessGroupZMQ``: the torch.distributed process group over the commlayer transport.

Every method torch (or a wrapper holding the group) may call is defined in this class body, typed
with the c10d option classes, and accepts the call forms gloo's object accepts
(:mod:`commlayer.backend.forms`). The work is done by composed collective families
(:mod:`~commlayer.backend.reductions`, :mod:`~commlayer.backend.gathers`,
:mod:`~commlayer.backend.scatters`, :mod:`~commlayer.backend.p2p`) over one
:class:`~commlayer.backend.runtime.GroupRuntime`; tensors outside host memory go through
:mod:`~commlayer.backend.staging`. The torch 2.13 contract is in ``docs/torch-backend.md``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _DistributedBackendOptions

from commlayer.backend import creator, forms, staging
from commlayer.backend.forms import (AllgatherOptions, AllreduceCoalescedOptions, AllreduceOptions, AllToAllOptions,
                                     BarrierOptions, BroadcastOptions, GatherOptions, Op, ReduceOptions,
                                     ReduceScatterOptions, ScatterOptions, Tensors)
from commlayer.backend.gathers import Gathers
from commlayer.backend.options import ZmqOptions
from commlayer.backend.p2p import PointToPoint
from commlayer.backend.reductions import Reductions
from commlayer.backend.runtime import GroupRuntime
from commlayer.backend.scatters import Scatters
from commlayer.backend.work import ZmqWork
from commlayer.topologies.comm import Group
from commlayer.transport.errors import TransportClosed

Nested = Sequence[Sequence[torch.Tensor]]


class ProcessGroupZMQ(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run over ZeroMQ.

    Args:
        group: ranks and channel over the process's transport.
        owns_transport: close the transport on shutdown (the default group, or a group with its own).
        options: resolved per-group options.
        name: group name.
        default_group: True for WORLD.
    """

    def __init__(self, group: Group, owns_transport: bool, options: ZmqOptions, name: str, default_group: bool = False) -> None:
        super().__init__(group.rank, group.size)
        self.rt = GroupRuntime(group, options, name, default_group)
        self._owns_transport = owns_transport
        self._desc = ""
        self._reductions = Reductions(self.rt)
        self._gathers = Gathers(self.rt)
        self._scatters = Scatters(self.rt)
        self._p2p = PointToPoint(self.rt)
        # Report the CPU device like gloo does: ``_device_types``, ``_get_pg_default_device()`` and what
        # builds on them (DCP, set_model_state_dict(broadcast_from_rank0), FSDP1 sharded state dicts)
        # work. The registered backend is None: C++ callers of methods the pybind trampoline does not
        # forward get "Could not retrieve or create the backend" instead of a crash.
        self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.CUSTOM, None)

    # ---- the group ----------------------------------------------------------------------------
    @property
    def group(self) -> Group:
        return self.rt.group

    @property
    def transport(self) -> Any:
        return self.rt.transport

    @property
    def options(self) -> ZmqOptions:
        return self.rt.options

    @property
    def compression(self) -> Any:
        return self.rt.compression

    @property
    def autocodec(self) -> Any:
        """The ``codec="auto"`` controller (:class:`commlayer.adapt.autocodec.AutoCodec`) or None."""
        return self.rt.autocodec.controller if self.rt.autocodec is not None else None

    @property
    def adaptive(self) -> Any:
        return self.rt.adaptive

    @property
    def group_label(self) -> str:
        return self.rt.label

    def getBackendName(self) -> str:
        return "zmq"

    def setGroupName(self, name: str) -> None:
        self.rt.name = name

    def getGroupName(self) -> str:
        return self.rt.name

    def setGroupDesc(self, desc: str) -> None:
        self._desc = desc

    def getGroupDesc(self) -> str:
        return self._desc

    def _issue(self, call: Callable[..., ZmqWork], what: str, *args: Any) -> ZmqWork:
        if staging.needs_staging(args):
            return staging.staged(call, args, f"{what} (host-staged) in group {self.rt.label!r}", self.rt.timeout)
        return call(*args)

    # ---- reductions ---------------------------------------------------------------------------
    def allreduce(self, tensors: Tensors, opts: AllreduceOptions | Op | None = None, timeout: timedelta | None = None,
                  *, op: Op | None = None) -> ZmqWork:
        ts, o = forms.allreduce(tensors, op if op is not None else opts, timeout)
        return self._issue(lambda t: self._reductions.allreduce(t, o), "allreduce", ts)

    def allreduce_coalesced(self, tensors: Sequence[torch.Tensor], opts: AllreduceCoalescedOptions | Op | None = None) -> ZmqWork:
        ts, o = forms.allreduce(tensors, opts, None, AllreduceCoalescedOptions, "allreduce_coalesced")
        return self._issue(lambda t: self._reductions.allreduce_coalesced(t, o), "allreduce_coalesced", ts)

    def reduce(self, tensors: Tensors, opts: ReduceOptions | int | None = None, op: Op | None = None,
               timeout: timedelta | None = None, *, root: int | None = None) -> ZmqWork:
        ts, o = forms.reduce(tensors, root if root is not None else opts, op, timeout)
        return self._issue(lambda t: self._reductions.reduce(t, o), "reduce", ts)

    def broadcast(self, tensors: Tensors, opts: BroadcastOptions | int | None = None, timeout: timedelta | None = None,
                  *, root: int | None = None) -> ZmqWork:
        ts, o = forms.broadcast(tensors, root if root is not None else opts, timeout)
        return self._issue(lambda t: self._reductions.broadcast(t, o), "broadcast", ts)

    # ---- gathers ------------------------------------------------------------------------------
    def allgather(self, output_tensors: Nested | Sequence[torch.Tensor], input_tensors: Tensors,
                  opts: AllgatherOptions | timedelta | None = None) -> ZmqWork:
        outs, ins = forms.gather_lists(output_tensors, input_tensors, "allgather")
        o = forms.plain(AllgatherOptions, opts, None, "allgather")
        return self._issue(lambda a, b: self._gathers.allgather(a, b, o), "allgather", outs, ins)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: AllgatherOptions | timedelta | None = None) -> ZmqWork:
        o = forms.plain(AllgatherOptions, opts, None, "all_gather_single")
        return self._issue(lambda a, b: self._gathers.all_gather_single(a, b, o), "all_gather_into_tensor", output, input)

    def allgather_coalesced(self, output_lists: Nested, input_list: Sequence[torch.Tensor],
                            opts: AllgatherOptions | None = None) -> ZmqWork:
        o = forms.plain(AllgatherOptions, opts, None, "allgather_coalesced")
        return self._issue(lambda a, b: self._gathers.allgather_coalesced(a, b, o), "allgather_coalesced",
                           [list(x) for x in output_lists], list(input_list))

    def all_gather_single_coalesced(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                                    opts: AllgatherOptions | None = None) -> ZmqWork:
        o = forms.plain(AllgatherOptions, opts, None, "all_gather_single_coalesced")
        return self._issue(lambda a, b: self._gathers.all_gather_single_coalesced(a, b, o), "all_gather_into_tensor_coalesced",
                           list(outputs), list(inputs))

    def gather(self, output_tensors: Nested | Sequence[torch.Tensor], input_tensors: Tensors,
               opts: GatherOptions | int | None = None, timeout: timedelta | None = None) -> ZmqWork:
        outs, ins = forms.gather_lists(output_tensors, input_tensors, "gather")
        o = forms.rooted(GatherOptions, opts, timeout, "gather")
        return self._issue(lambda a, b: self._gathers.gather(a or [[]], b, o), "gather", outs, ins)

    def scatter(self, output_tensors: Tensors, input_tensors: Nested | Sequence[torch.Tensor],
                opts: ScatterOptions | int | None = None, timeout: timedelta | None = None) -> ZmqWork:
        outs, ins = forms.scatter_lists(output_tensors, input_tensors, "scatter")
        o = forms.rooted(ScatterOptions, opts, timeout, "scatter")
        return self._issue(lambda a, b: self._gathers.scatter(a, b or [[]], o), "scatter", outs, ins)

    # ---- reduce-scatters and all-to-alls ------------------------------------------------------
    def reduce_scatter(self, output_tensors: Tensors, input_tensors: Nested | Sequence[torch.Tensor],
                       opts: ReduceScatterOptions | Op | None = None, timeout: timedelta | None = None) -> ZmqWork:
        outs, ins = forms.scatter_lists(output_tensors, input_tensors, "reduce_scatter")
        o = forms.reduce_op_or(ReduceScatterOptions, opts, timeout, "reduce_scatter")
        return self._issue(lambda a, b: self._scatters.reduce_scatter(a, b, o), "reduce_scatter", outs, ins)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: ReduceScatterOptions | Op | None = None) -> ZmqWork:
        o = forms.reduce_op_or(ReduceScatterOptions, opts, None, "reduce_scatter_single")
        return self._issue(lambda a, b: self._scatters.reduce_scatter_single(a, b, o), "reduce_scatter_tensor", output, input)

    def reduce_scatter_single_coalesced(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                                        opts: ReduceScatterOptions | Op | None = None) -> ZmqWork:
        o = forms.reduce_op_or(ReduceScatterOptions, opts, None, "reduce_scatter_single_coalesced")
        return self._issue(lambda a, b: self._scatters.reduce_scatter_single_coalesced(a, b, o), "reduce_scatter_tensor_coalesced",
                           list(outputs), list(inputs))

    def alltoall(self, output_tensors: Sequence[torch.Tensor], input_tensors: Sequence[torch.Tensor],
                 opts: AllToAllOptions | timedelta | None = None) -> ZmqWork:
        o = forms.plain(AllToAllOptions, opts, None, "alltoall")
        return self._issue(lambda a, b: self._scatters.alltoall(a, b, o), "all_to_all", list(output_tensors), list(input_tensors))

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: Sequence[int] = (),
                          input_split_sizes: Sequence[int] = (), opts: AllToAllOptions | timedelta | None = None) -> ZmqWork:
        o = forms.plain(AllToAllOptions, opts, None, "all_to_all_single")
        return self._issue(lambda a, b: self._scatters.all_to_all_single(a, b, output_split_sizes, input_split_sizes, o),
                           "all_to_all_single", output, input)

    # ---- barrier and point to point -------------------------------------------------------------
    def barrier(self, opts: BarrierOptions | timedelta | None = None) -> ZmqWork:
        return self._p2p.barrier(forms.plain(BarrierOptions, opts, None, "barrier"))

    def send(self, tensors: Tensors, dstRank: int, tag: int = 0) -> ZmqWork:
        return self._issue(lambda t: self._p2p.send(t, dstRank, tag), "send", forms.tensor_list(tensors, "send"))

    def recv(self, tensors: Tensors, srcRank: int, tag: int = 0) -> ZmqWork:
        return self._issue(lambda t: self._p2p.recv(t, srcRank, tag), "recv", forms.tensor_list(tensors, "recv"))

    def recv_anysource(self, tensors: Tensors, tag: int = 0) -> ZmqWork:
        return self._issue(lambda t: self._p2p.recv(t, None, tag), "recv_anysource", forms.tensor_list(tensors, "recv_anysource"))

    # Older names (torch < 2.13 and the trampoline's fallbacks) reach the same methods.
    _allgather_base = all_gather_single
    _reduce_scatter_base = reduce_scatter_single
    alltoall_base = all_to_all_single
    allgather_into_tensor_coalesced = all_gather_single_coalesced
    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    # ---- lifecycle ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Called by destroy_process_group(): stops the executor and frees the transport if owned."""
        creator.forget(self)
        self.rt.close(self._owns_transport)

    def abort(self) -> None:
        self.rt.abort(TransportClosed(f"process group {self.rt.label!r} was aborted"))
        self.shutdown()


def create_process_group(opts: _DistributedBackendOptions, backend_options: ZmqOptions | Mapping[str, Any] | None) -> ProcessGroupZMQ:
    """Backend creator registered with torch (``extended_api=True``); see :mod:`commlayer.backend.creator`."""
    return creator.create(opts, backend_options, ProcessGroupZMQ)


def group_over_store(store: Any, rank: int, size: int, timeout: float = 1800.0, options: ZmqOptions | None = None,
                     name: str = "standalone") -> ProcessGroupZMQ:
    """A zmq group over any c10d store, outside torch's registry (e.g. torchft's ``_create_pg``); see :func:`creator.standalone`."""
    return creator.standalone(ProcessGroupZMQ, store, rank, size, timeout, options, name)
