"""Estimated communication energy from bytes transmitted per device or per link."""

from __future__ import annotations

from typing import Mapping, Sequence

from commlayer.wan.matrix import LinkMatrix


def device_energy_j(bytes_sent: Sequence[int] | Mapping[int, int], links: LinkMatrix) -> list[float]:
    """Transmit energy per device in joules: ``bytes * 8 * energy_nj_per_bit(device) * 1e-9``.

    Args:
        bytes_sent: bytes each rank transmitted (a sequence indexed by rank or a rank->bytes map).
        links: the matrix whose per-device energy figures apply.

    Returns:
        Joules per rank (length ``links.world_size``).
    """
    items = bytes_sent.items() if isinstance(bytes_sent, Mapping) else enumerate(bytes_sent)
    out = [0.0] * links.world_size
    for rank, nbytes in items:
        if not 0 <= rank < links.world_size:
            raise ValueError(f"rank {rank} out of range for world size {links.world_size}")
        if nbytes < 0:
            raise ValueError(f"rank {rank}: expected bytes_sent >= 0, got {nbytes}")
        out[rank] += nbytes * 8 * links.device_energy_nj_per_bit[rank] * 1e-9
    return out


def link_energy_j(bytes_per_link: Mapping[tuple[int, int], int], links: LinkMatrix) -> list[float]:
    """Transmit energy per sending device in joules, from bytes per directed link (src, dst).

    Uses each link's own ``energy_nj_per_bit`` (links from files may differ per destination).
    """
    out = [0.0] * links.world_size
    for (src, dst), nbytes in bytes_per_link.items():
        out[src] += nbytes * 8 * links.link(src, dst).energy_nj_per_bit * 1e-9
    return out
