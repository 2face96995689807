"""Test-suite wiring: fixtures live in ``tests/fix_*.py`` plugin modules (psycopg's layout).

``celery.contrib.pytest`` brings Celery's in-process worker fixtures (``celery_app``,
``celery_worker``...); pytest-celery's own plugin, which replaces ``celery_worker`` with a
Docker-based one, is disabled in ``pyproject.toml`` (``-p no:celery``). It is listed first:
our plugins override its configuration fixtures (``celery_config``...).
"""

import pytest

from tests.examples import SCALE

pytest_plugins = ["celery.contrib.pytest", "tests.fix_db", "tests.fix_pipeline"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A long run (``METER_PROPERTY_SCALE`` > 1) draws that many times more examples: give
    its tests that many times the configured timeout (a test's own timeout stays)."""
    if SCALE == 1:
        return
    timeout = float(config.getini("timeout") or 0) * SCALE
    for item in items:
        if timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout))
