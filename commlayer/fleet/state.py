"""The replicated fleet state: flat global parameters, the outer optimizer's momentum, and the ledger cursor.

Every peer holds the same :class:`OuterState` after applying the same rounds: the round's aggregate
arrives as the same bytes on every peer and the outer step is the same float32 arithmetic in the
same order, so replicas are bit-identical (checked by :meth:`OuterState.digest`). The outer step is
Nesterov SGD exactly as ``torch.optim.SGD(nesterov=True)`` computes it (buffer ``m = mu m + g``,
step ``g + mu m``); with lr 1 and no momentum it is plain model averaging.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import torch

_MAGIC = b"CLFS1"


def digest(data: bytes | memoryview) -> str:
    """Hex BLAKE2b-128 of ``data`` (identifies payloads, chunks and states)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().numpy().tobytes()


def bytes_tensor(data: bytes | memoryview, n: int, what: str) -> torch.Tensor:
    if len(data) != 4 * n:
        raise ValueError(f"{what}: expected {4 * n} bytes ({n} float32), got {len(data)}")
    return torch.frombuffer(bytearray(data), dtype=torch.float32).clone()


@dataclass
class OuterState:
    """The state every member of a fleet replicates.

    Attributes:
        round: the last round applied (0: the initial model).
        params: flat float32 global parameters.
        momentum: flat float32 outer momentum buffer.
        included: per owner id, the highest contribution sequence number already applied
            (the ledger cursor: what a round may still include).
    """

    round: int
    params: torch.Tensor
    momentum: torch.Tensor
    included: dict[int, int] = field(default_factory=dict)

    @classmethod
    def initial(cls, params: torch.Tensor) -> "OuterState":
        flat = params.detach().to(torch.float32).reshape(-1).clone()
        return cls(0, flat, torch.zeros_like(flat))

    @property
    def numel(self) -> int:
        return self.params.numel()

    @torch.no_grad()
    def apply(self, round_: int, agg: torch.Tensor | None, lr: float, momentum: float,
              included: dict[int, int]) -> None:
        """Applies round ``round_``: the outer step on the averaged pseudo-gradient ``agg`` (None: no contribution).

        Raises:
            ValueError: ``round_`` is not the next round (rounds are applied in order, exactly once).
        """
        if round_ != self.round + 1:
            raise ValueError(f"Expected round {self.round + 1} next, got round {round_}: rounds apply in order, once each")
        if agg is not None:
            if agg.numel() != self.numel:
                raise ValueError(f"round {round_}: expected an aggregate of {self.numel} floats, got {agg.numel()}")
            if momentum:
                self.momentum.mul_(momentum).add_(agg)
                self.params.sub_(agg.add(self.momentum, alpha=momentum), alpha=lr)
            else:
                self.params.sub_(agg, alpha=lr)
        self.included.update(included)
        self.round = round_

    def digest(self) -> str:
        """Digest of the parameters and momentum (equal on every replica after the same rounds)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(tensor_bytes(self.params))
        h.update(tensor_bytes(self.momentum))
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        """Self-describing serialization: magic, header length, JSON header, params, momentum."""
        head = json.dumps({"round": self.round, "numel": self.numel,
                           "included": {str(k): v for k, v in self.included.items()}}).encode()
        return b"".join([_MAGIC, struct.pack("<I", len(head)), head, tensor_bytes(self.params), tensor_bytes(self.momentum)])

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, source: str) -> "OuterState":
        """Parses :meth:`to_bytes` output received from ``source`` (named in errors)."""
        mv = memoryview(data)
        if bytes(mv[:5]) != _MAGIC:
            raise ValueError(f"state from {source}: expected the fleet state magic {_MAGIC!r}, got {bytes(mv[:5])!r}")
        (hl,) = struct.unpack("<I", mv[5:9])
        head = json.loads(bytes(mv[9:9 + hl]))
        n = int(head["numel"])
        off = 9 + hl
        if len(mv) != off + 8 * n:
            raise ValueError(f"state from {source}: expected {off + 8 * n} bytes for {n} parameters, got {len(mv)}")
        params = bytes_tensor(mv[off:off + 4 * n], n, f"state from {source}")
        mom = bytes_tensor(mv[off + 4 * n:], n, f"state from {source}")
        return cls(int(head["round"]), params, mom, {int(k): int(v) for k, v in head["included"].items()})
