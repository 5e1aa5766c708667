"""The parameter server's optimizer side: per-shard parameters, server-side optimizer, clocks and SSP.

``mode="sync"``: one optimizer step per clock on the mean of every live worker's gradient
(majority vote for ``sign:scale=none``); ``mode="async"``: every push is applied as it arrives,
and a pull of clock c is answered only once every live worker has pushed at least c - staleness
updates (stale-synchronous parallel, Ho et al., NIPS 2013).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from commlayer.codecs import Codec, CodecContext, Encoded
from commlayer.codecs.aggregate import acc_dtype, combine, gathered_mode
from commlayer.transport.errors import CommError

MODES = ("sync", "async")

#: A sync-mode push kept encoded until its clock is complete: (uplink spec, codec, payload, context).
Payload = tuple[str, Codec, Encoded, CodecContext]
OPTIMIZERS = ("sgd", "adam")


class Shard:
    """Training state of one shard on its server.

    Args:
        mode: "sync" or "async".
        staleness: SSP bound (async).
    """

    def __init__(self, mode: str = "sync", staleness: int = 0) -> None:
        self.mode, self.staleness = mode, staleness
        self.params: torch.Tensor | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.clock: dict[int, int] = defaultdict(int)         # updates received per worker
        self.version = 0                                       # sync: optimizer steps taken
        self.sync_buf: dict[int, dict[int, torch.Tensor | Payload]] = defaultdict(dict)
        self.applied: dict[tuple[int, int], int] = defaultdict(int)
        self.out_of_order = 0
        self.max_staleness = 0
        self.pending: list[tuple[int, int]] = []

    def init(self, params: torch.Tensor, optimizer: str, lr: float, options: dict[str, Any]) -> None:
        """Takes the initial parameters (once) and builds the optimizer."""
        if self.params is not None:
            return
        p = torch.nn.Parameter(params, requires_grad=False)
        self.params = p
        self.opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)([p], lr=lr, **dict(options))

    def apply(self, grad: torch.Tensor) -> None:
        assert self.params is not None and self.opt is not None
        self.params.grad = grad.to(self.params.dtype)
        self.opt.step()
        self.params.grad = None

    def on_grad(self, w: int, c: int, grad: "torch.Tensor | Payload") -> None:
        """Worker ``w``'s gradient of clock ``c``: a tensor, or (sync mode) its still-encoded payload."""
        if self.params is None:
            raise CommError(f"parameter server: rank {w} pushed a gradient before init()")
        if c != self.clock[w]:
            self.out_of_order += 1
        self.clock[w] = max(self.clock[w], c + 1)
        if self.mode == "async":
            assert isinstance(grad, torch.Tensor)
            self.apply(grad)
            self.applied[(w, c)] += 1
        else:
            self.sync_buf[c][w] = grad

    @staticmethod
    def _aggregate(grads: list["torch.Tensor | Payload"]) -> torch.Tensor:
        """Mean of one clock's gradients; payloads of one codec go through its gathered aggregation
        (:func:`commlayer.codecs.aggregate.combine`: decode and average, or majority vote)."""
        if grads and all(isinstance(g, tuple) for g in grads) and len({g[0] for g in grads}) == 1:  # type: ignore[index]
            _, codec, _, ctx = grads[0]  # type: ignore[misc]
            return combine(codec, gathered_mode(codec), [g[2] for g in grads], ctx, average=True)  # type: ignore[index,misc]
        dense = [g if isinstance(g, torch.Tensor) else g[1].decode(g[2], g[3]).reshape(-1) for g in grads]
        acc = torch.zeros_like(dense[0], dtype=acc_dtype(dense[0].dtype))
        for x in dense:
            acc += x
        return acc / len(dense)

    def sync_steps(self, live: list[int]) -> None:
        """Sync mode: one optimizer step per clock that every live worker has pushed."""
        while self.mode == "sync" and self.version in self.sync_buf:
            got = self.sync_buf[self.version]
            ws = sorted(got)
            if not ws or not all(w in got for w in live):
                break
            self.apply(self._aggregate([got[w] for w in ws]))
            for w in ws:
                self.applied[(w, self.version)] += 1
            del self.sync_buf[self.version]
            self.version += 1

    def ready_pulls(self, live: list[int]) -> list[tuple[int, int, int]]:
        """Pending pulls that may be answered now, as (worker, clock, oldest clock included); removed from the queue."""
        if self.params is None or not self.pending:
            return []
        floor = min((self.clock[w] for w in live), default=10**9)
        if self.mode == "sync":
            floor = self.version
        keep, ready = [], []
        for w, c in self.pending:
            if floor >= c - self.staleness and (self.mode == "sync" or self.clock[w] >= c):
                self.max_staleness = max(self.max_staleness, c - min(floor, c))
                ready.append((w, c, min(floor, c)))
            else:
                keep.append((w, c))
        self.pending = keep
        return ready

    def stats(self) -> dict[str, Any]:
        return {"updates": sum(self.applied.values()), "duplicates": sum(1 for v in self.applied.values() if v > 1),
                "applied_keys": len(self.applied), "out_of_order": self.out_of_order, "max_staleness": self.max_staleness,
                "clocks": dict(self.clock), "version": self.version}
