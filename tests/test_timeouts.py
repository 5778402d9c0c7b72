"""The per-test timeouts of tests/conftest.py: short for unit tests, pyproject's longer one for the rest."""

from __future__ import annotations

import pytest

from tests.conftest import UNIT_TIMEOUT


def test_a_unit_test_gets_the_short_timeout(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("timeout")
    assert marker is not None and marker.args == (UNIT_TIMEOUT,)


@pytest.mark.slow
def test_a_slow_test_keeps_the_configured_timeout(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("timeout") is None
    assert int(request.config.getini("timeout")) > UNIT_TIMEOUT


@pytest.mark.timeout(7)
def test_an_explicit_timeout_is_left_alone(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("timeout")
    assert marker is not None and marker.args == (7,)
