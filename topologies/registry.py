"""The all-reduce algorithm registry: the one place that says which algorithms exist.

Each :class:`Algorithm` declares how it runs (an in-place exact all-reduce over an
:class:`~commlayer.topologies.comm.OpComm`), what it supports (group sizes, dtypes, reduce ops,
codec payloads) and what it costs (a replay of its schedule over a link matrix,
:mod:`commlayer.topologies.cost`). Everything that picks an algorithm reads this table:

* the exact all-reduce (:func:`commlayer.topologies.dense.allreduce`) and the ``auto`` size rule;
* the compressed all-reduce (:mod:`commlayer.topologies.codec_allreduce`): summable payloads and
  PowerSGD's rounds run over the algorithm's exact all-reduce, gathered payloads travel the way
  the algorithm declares (``gather``: around the ring or directly);
* option validation (``ZmqOptions.algo``, ``COMMLAYER_ALGO``) and the error listing known names;
* the cost model (:func:`commlayer.adapt.cost.allreduce_time`) and the planner's candidates
  (algorithms with ``candidate=True``).

Adding an algorithm = its file (run + cost function) + one :class:`Algorithm` row in ``_BUILTIN``
(or :func:`register` from outside the package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch

from commlayer import settings
from commlayer.topologies.chain import chain_allreduce, chain_allreduce_time, chain_schedule
from commlayer.topologies.comm import OpComm
from commlayer.topologies.cost import CostParams, Links
from commlayer.topologies.ps_collective import ps_allreduce, ps_allreduce_time, ps_schedule
from commlayer.topologies.recursive_doubling import recursive_doubling_allreduce, recursive_doubling_schedule, recursive_doubling_time
from commlayer.topologies.reduce_ops import ReduceOp
from commlayer.topologies.ring import ring_allreduce, ring_allreduce_time, ring_schedule
from commlayer.topologies.schedule import Step

AUTO = "auto"
GATHERS = ("ring", "direct")


class RunFn(Protocol):
    def __call__(self, comm: OpComm, flat: torch.Tensor, op: ReduceOp, order: Sequence[int] | None, chunk_bytes: int) -> None: ...


class ScheduleFn(Protocol):
    def __call__(self, size: int, numel: int, elem_size: int, order: Sequence[int] | None, chunk_bytes: int) -> Iterable[Step]: ...


class CostFn(Protocol):
    def __call__(self, s: Links, nbytes: float, order: Sequence[int] | None, chunk_bytes: int, params: CostParams,
                 elem_scale: float = 1.0) -> float: ...


@dataclass(frozen=True)
class Algorithm:
    """One exact all-reduce algorithm.

    Attributes:
        name: the name in ``algo=`` / ``COMMLAYER_ALGO``.
        run: ``run(comm, flat, op, order, chunk_bytes)`` reduces the 1-D contiguous ``flat`` in
            place on every rank (AVG left as a SUM: the caller divides), identical bits everywhere.
        cost: ``cost(links, nbytes, order, chunk_bytes, params, elem_scale)`` predicted seconds.
        gather: how payloads that cannot be summed (non-linear codecs) reach every rank:
            "ring" (forwarded around the ring, each link carries each payload once) or "direct".
        uses_order: ``order`` (a permutation of group ranks) changes the schedule (ring, chain).
        candidate: the adaptive planner prices it as a candidate plan.
        min_size: smallest group size it runs on.
        dtypes: dtypes it reduces (None: every dtype the transport carries).
        ops: reduce ops it supports.
        doc: one line for docs and error messages.
        schedule: ``schedule(size, numel, elem_size, order, chunk_bytes)`` the messages ``run`` sends,
            step by step (:mod:`commlayer.topologies.schedule`; the simulator replays it).
    """

    name: str
    run: RunFn
    cost: CostFn
    gather: str = "direct"
    uses_order: bool = False
    candidate: bool = False
    min_size: int = 1
    dtypes: frozenset[torch.dtype] | None = None
    ops: frozenset[ReduceOp] = frozenset(ReduceOp)
    doc: str = ""
    schedule: ScheduleFn | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name == AUTO:
            raise ValueError(f"Expected an algorithm name other than {AUTO!r} and '', got {self.name!r}")
        if self.gather not in GATHERS:
            raise ValueError(f"Expected gather in {GATHERS}, got {self.gather!r}")

    def check(self, size: int, dtype: torch.dtype, op: ReduceOp) -> None:
        """Raises a clear error if this algorithm cannot reduce ``dtype`` with ``op`` over ``size`` ranks."""
        if size < self.min_size:
            raise ValueError(f"algo {self.name!r}: expected a group of at least {self.min_size} ranks, got {size}")
        if self.dtypes is not None and dtype not in self.dtypes:
            raise TypeError(f"algo {self.name!r}: expected a dtype in {sorted(map(str, self.dtypes))}, got {dtype}")
        if op not in self.ops:
            raise ValueError(f"algo {self.name!r}: expected op in {sorted(o.value for o in self.ops)}, got {op.value}")


def _ring(comm: OpComm, flat: torch.Tensor, op: ReduceOp, order: Sequence[int] | None, chunk_bytes: int) -> None:
    ring_allreduce(comm, flat, op, order=order, chunk_bytes=chunk_bytes)


def _tree(comm: OpComm, flat: torch.Tensor, op: ReduceOp, order: Sequence[int] | None, chunk_bytes: int) -> None:
    recursive_doubling_allreduce(comm, flat, op)


def _ps(comm: OpComm, flat: torch.Tensor, op: ReduceOp, order: Sequence[int] | None, chunk_bytes: int) -> None:
    ps_allreduce(comm, flat, op)


def _tree_cost(s: Links, nbytes: float, order: Sequence[int] | None, chunk_bytes: int, params: CostParams,
               elem_scale: float = 1.0) -> float:
    return recursive_doubling_time(s, nbytes, params, elem_scale)


def _ring_schedule(size: int, numel: int, elem_size: int, order: Sequence[int] | None, chunk_bytes: int) -> Iterable[Step]:
    return ring_schedule(size, numel, elem_size, order, chunk_bytes)


def _tree_schedule(size: int, numel: int, elem_size: int, order: Sequence[int] | None, chunk_bytes: int) -> Iterable[Step]:
    return recursive_doubling_schedule(size, numel * elem_size)


def _ps_schedule(size: int, numel: int, elem_size: int, order: Sequence[int] | None, chunk_bytes: int) -> Iterable[Step]:
    return ps_schedule(size, numel, elem_size)


_BUILTIN = (
    Algorithm("ring", _ring, ring_allreduce_time, gather="ring", uses_order=True, candidate=True,
              doc="chunked pipelined ring (bandwidth-optimal, Patarasuk & Yuan 2009)", schedule=_ring_schedule),
    Algorithm("tree", _tree, _tree_cost, gather="direct", candidate=True,
              doc="recursive doubling (latency-optimal, Thakur et al. 2005)", schedule=_tree_schedule),
    Algorithm("chain", chain_allreduce, chain_allreduce_time, gather="ring", uses_order=True,
              doc="pipelined reduce down a path and broadcast back (a line of sites)", schedule=chain_schedule),
    Algorithm("ps", _ps, ps_allreduce_time, gather="direct",
              doc="sharded co-located parameter servers (COMMLAYER_PS_SERVERS)", schedule=_ps_schedule),
)

_TABLE: dict[str, Algorithm] = {a.name: a for a in _BUILTIN}


def register(algo: Algorithm) -> Algorithm:
    """Adds ``algo`` (e.g. from a plug-in); every rank must register the same algorithms.

    Raises:
        ValueError: the name is taken.
    """
    if algo.name in _TABLE:
        raise ValueError(f"Expected a new algorithm name, got {algo.name!r} (known: {names()})")
    _TABLE[algo.name] = algo
    return algo


def names(auto: bool = False) -> tuple[str, ...]:
    """Registered algorithm names (with ``"auto"`` first if ``auto``)."""
    return ((AUTO,) if auto else ()) + tuple(_TABLE)


def get(name: str) -> Algorithm:
    """The algorithm called ``name``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"Expected algo in {names(auto=True)}, got {name!r}") from None


def validate(name: str, what: str = "algo") -> str:
    """``name`` if it is "auto" or registered, else ValueError naming ``what`` and the known names."""
    if name != AUTO and name not in _TABLE:
        raise ValueError(f"{what}: expected one of {names(auto=True)}, got {name!r}")
    return name


def small_bytes() -> int:
    """``COMMLAYER_SMALL_BYTES``: below it the latency of 2(p-1) ring hops outweighs the ring's bandwidth."""
    return int(settings.get("COMMLAYER_SMALL_BYTES"))


def choose(nbytes: int, size: int) -> str:
    """The ``auto`` rule: recursive doubling for small messages, the ring for large ones."""
    return "tree" if nbytes < small_bytes() else "ring"


def resolve(name: str, nbytes: int, size: int) -> Algorithm:
    """The algorithm ``name`` stands for on a message of ``nbytes`` over ``size`` ranks."""
    return get(choose(nbytes, size) if name == AUTO else name)


def candidates() -> tuple[Algorithm, ...]:
    """Algorithms the adaptive planner prices."""
    return tuple(a for a in _TABLE.values() if a.candidate)

