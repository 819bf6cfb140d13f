"""Shared pytest fixtures."""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["tests.services"]


@pytest.fixture
def reactor() -> Any:
    """The global reactor that pytest-twisted runs tests on (imported lazily)."""
    from twisted.internet import reactor as _reactor

    return _reactor
