"""Crash suite settings: reduced size by default (and in CI), full size behind an option.

Full size: ``pytest --chaos-full`` (the option is declared in ``tests/conftest.py``) or
``CONVEYOR_CHAOS_FULL=1``; ``python3 dev.py test --chaos-full`` passes it on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


def chaos_full(config: pytest.Config) -> bool:
    if config.getoption("--chaos-full", default=False):
        return True
    return _truthy(os.environ.get("CONVEYOR_CHAOS_FULL"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = 600 if chaos_full(config) else 150
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents and item.get_closest_marker("chaos"):
            item.add_marker(pytest.mark.timeout(seconds), append=False)


@pytest.fixture
def full(request: pytest.FixtureRequest) -> bool:
    """True when the crash suite runs at full size."""
    return chaos_full(request.config)
