"""Test lanes and process settings shared by every test.

Every test gets one lane marker, from its file (a test may declare its own instead):

* ``unit``: one process, no sockets between ranks; ``pytest -m unit`` is the fast lane (under a minute).
* ``soak``: the CI-sized reliability runs (kill injection, fuzzing, soak, timeouts).
* ``integration``: everything else (real processes over real sockets), also any new file until it is listed.
"""

from __future__ import annotations

import os

import pytest

# Keep every rank single-threaded on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

LANES = ("unit", "integration", "soak")
UNIT_FILES = {
    "test_adapt_units.py", "test_codecs.py", "test_codecs_golden.py", "test_codecs_powersgd.py", "test_codecs_props.py",
    "test_ef.py", "test_settings.py", "test_wan_spec.py",
}
SOAK_FILES = {"test_reliability.py", "test_reliability_flush.py", "test_reliability_fuzz.py"}


def lane_of(filename: str) -> str:
    """The lane of a test file by name."""
    if filename in UNIT_FILES:
        return "unit"
    return "soak" if filename in SOAK_FILES else "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(lane) for lane in LANES):
            item.add_marker(getattr(pytest.mark, lane_of(item.path.name)))
