"""Claims of the README and docs/ that the code can check cheaply stay true to it."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_internals_has_one_row_per_migration_in_order() -> None:
    rows = re.findall(
        r"^\| `(\d{3}_[^`]+\.sql)` \|", (REPO / "docs/internals.md").read_text(), re.M
    )
    files = sorted(p.name for p in (REPO / "sql").glob("[0-9][0-9][0-9]_*.sql"))
    assert rows == files


def test_readme_names_the_metadata_depth_the_producer_refuses() -> None:
    from meter.producer import MAX_METADATA_DEPTH

    readme = " ".join((REPO / "README.md").read_text().split())
    assert (
        f"`metadata` nested more than {MAX_METADATA_DEPTH} levels (`MAX_METADATA_DEPTH`" in readme
    )


def test_exit_status_tables_name_every_exit_code() -> None:
    from click.testing import CliRunner

    from meter.cli import EXIT_OK, EXIT_PROBLEMS, EXIT_UNREACHABLE, EXIT_USAGE, main

    codes = {EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_UNREACHABLE}
    operations = (REPO / "docs/operations.md").read_text()
    table = operations.split("### Exit status", 1)[1].split("\n\n", 2)[1]
    assert {int(c) for c in re.findall(r"^\| (\d) \|", table, re.M)} == codes
    assert "lost under the call" in table
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert {int(c) for c in re.findall(r"^ {4}(\d)  ", help_text, re.M)} == codes
    assert "lost under the call" in " ".join(help_text.split())


def test_readme_says_which_split_events_a_worker_sends_as_text() -> None:
    from meter.wire import OBJECT_DEPTH

    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"nested more than {OBJECT_DEPTH} levels deep, `wire.OBJECT_DEPTH`" in readme
