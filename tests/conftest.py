"""Test-suite wiring: fixtures live in ``tests/fix_*.py`` plugin modules (psycopg's layout).

``celery.contrib.pytest`` brings Celery's in-process worker fixtures (``celery_app``,
``celery_worker``...); pytest-celery's own plugin, which replaces ``celery_worker`` with a
Docker-based one, is disabled in ``pyproject.toml`` (``-p no:celery``). It is listed first:
our plugins override its configuration fixtures (``celery_config``...).
"""

pytest_plugins = ["celery.contrib.pytest", "tests.fix_db", "tests.fix_pipeline"]
