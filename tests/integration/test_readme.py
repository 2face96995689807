"""The README's Python examples run as written and print what the README says they print.

Every ```` ```python ```` block is run: the SDK ones against a fresh database
(``METER_DATABASE_URL``), the producer ones also through a real broker and worker
(``METER_BROKER_URL``). A block followed by "prints `X`" must print exactly ``X``.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> list[tuple[str, str | None]]:
    """(code, documented output or None) of every python block, in README order."""
    found = re.findall(r"```python\n(.*?)```\s*(?:prints `([^`]*)`)?", README.read_text(), re.S)
    return [(code, printed or None) for code, printed in found]


def _run(code: str) -> str:
    out = io.StringIO()
    scope: dict[str, Any] = {"__name__": "readme"}
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), scope)
    finally:
        for value in scope.values():  # the examples leave clients and producers open
            if type(value).__name__ in ("MeterClient", "MeterProducer"):
                value.close()
    return out.getvalue().strip()


def _check(code: str, documented: str | None) -> None:
    printed = _run(code)
    if documented is not None:
        assert printed == documented, code


def test_readme_has_the_examples_it_promises() -> None:
    examples = _examples()
    sdk = [c for c, _ in examples if "MeterClient(" in c]
    producer = [c for c, _ in examples if "MeterProducer(" in c]
    assert len(sdk) >= 2 and len(producer) >= 2
    five_liners = [c for c in sdk + producer if len(c.strip().splitlines()) == 5]
    assert len(five_liners) == 2, "the quick start's SDK and producer examples are 5 lines"
    assert all(doc for c, doc in examples if c in five_liners)


def test_readme_sdk_examples_run_and_print_what_is_documented(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METER_DATABASE_URL", db_url)
    for code, documented in _examples():
        if "MeterProducer(" not in code:
            _check(code, documented)
    # "and again 750 when run twice": the idempotency keys replay
    five = next(c for c, _ in _examples() if "MeterClient(" in c)
    assert _run(five) == "750"


def test_readme_producer_examples_run_through_a_worker(
    pipeline: Any, db_url: str, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("METER_DATABASE_URL", db_url)
    monkeypatch.setenv("METER_BROKER_URL", broker_url)
    for code, documented in _examples():
        if "MeterProducer(" in code:
            _check(code, documented)
