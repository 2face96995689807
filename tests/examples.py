"""How many examples the hypothesis tests draw: the CI size, or more in a long run by hand.

``METER_PROPERTY_SCALE=N`` (a whole number >= 1, default 1) multiplies the ``max_examples``
of every property and fuzz test (the SQL state machines of ``test_properties*.py`` and the
hostile-input tests of ``test_hostile.py``)::

    METER_PROPERTY_SCALE=40 .venv/bin/pytest -p no:cacheprovider \\
        tests/integration/test_properties.py tests/integration/test_properties_refusals.py \\
        tests/integration/test_hostile.py
"""

from __future__ import annotations

import os


def _scale() -> int:
    raw = os.environ.get("METER_PROPERTY_SCALE", "1")
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError(f"METER_PROPERTY_SCALE: a whole number >= 1, got {raw!r}")
    return int(raw)


SCALE = _scale()  # also scales the tests' timeout (tests/conftest.py)


def examples(n: int) -> int:
    """``n`` examples at the CI size, times ``METER_PROPERTY_SCALE``."""
    return n * SCALE
