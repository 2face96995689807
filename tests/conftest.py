"""Test-suite wiring: fixtures live in ``tests/fix_*.py`` plugin modules (psycopg's layout)."""

pytest_plugins = ["tests.fix_db"]
