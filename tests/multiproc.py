"""Kept for the tests written against it: the launcher lives in :mod:`commlayer.testing`."""

from __future__ import annotations

from commlayer.testing import free_port, run_world

__all__ = ["free_port", "run_world"]
