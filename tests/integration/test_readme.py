"""The README's SDK example runs as written and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_sdk_example_runs_and_prints_the_documented_balance(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = [b for b in _python_blocks() if "MeterClient(" in b]
    assert blocks, "README has no SDK example"
    monkeypatch.setenv("METER_DATABASE_URL", db_url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue().strip()
    documented = re.search(r"prints `(\{.*?\})`", README.read_text())
    assert documented, "README does not say what the example prints"
    assert printed == documented.group(1)
