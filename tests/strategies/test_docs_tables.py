"""The docs' per-strategy tables say what each built-in declares, so they cannot drift.

docs/privacy.md lists the central-DP modes every built-in composes with, and
docs/strategies.md whether it composes with SecAgg+; both are read by users choosing a
strategy, and both are claims the server enforces from the class attributes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedlora.run.registry import BUILTINS, load_strategy_class

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _cells(line: str) -> list[str]:
    """A markdown table line's cells; an escaped ``\\|`` stays inside its cell."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _table(doc: str, header: str) -> tuple[list[str], dict[str, list[str]]]:
    """The header and rows (by first cell) of the table whose header starts with ``header``.

    Every row must have the header's number of cells: a stray ``|`` in a cell would cut
    the rest of the row off where a reader sees it.
    """
    lines = (DOCS / doc).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = _cells(lines[start])
    rows: dict[str, list[str]] = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(names), f"{doc}: {len(cells)} cells, not {len(names)}: {line}"
        rows[cells[0].strip("`")] = cells[1:]
    return names, rows


def _rows(doc: str, header: str) -> dict[str, list[str]]:
    return _table(doc, header)[1]


@pytest.mark.parametrize(
    ("doc", "header"),
    [("privacy.md", "| strategy | client | server | why |"), ("strategies.md", "| name | what")],
)
def test_the_tables_list_exactly_the_builtins(doc: str, header: str) -> None:
    assert set(_rows(doc, header)) == set(BUILTINS)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_privacy_md_central_dp_row_matches_the_declaration(name: str) -> None:
    rows = _rows("privacy.md", "| strategy | client | server | why |")
    assert name in rows, f"docs/privacy.md's central-DP table has no row for {name}"
    client, server = rows[name][0], rows[name][1]
    declared = load_strategy_class(name).central_dp
    assert (client == "yes") == ("client" in declared), (name, client, declared)
    assert (server == "yes") == ("server" in declared), (name, server, declared)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_strategies_md_row_matches_the_declarations(name: str) -> None:
    header, rows = _table("strategies.md", "| name | what the server does |")
    assert name in rows, f"docs/strategies.md's table has no row for {name}"
    row = dict(zip(header[1:], rows[name], strict=True))
    cls = load_strategy_class(name)
    assert row["secure aggregation"].startswith("composes") == cls.secure_sum, (name, row)
    # client DP-SGD composes unless a plan replies with raw data (fed_sb_data's calibration)
    assert row["DP"].startswith("client: yes;") != cls.calibrates, (name, row["DP"])
    central = re.findall(r"central: ([a-z, ]+|no)\b", row["DP"])
    assert central, f"{name}: the DP cell names no central modes: {row['DP']!r}"
    modes = {m.strip() for m in central[0].split(",")} - {"no"}
    assert modes == set(cls.central_dp), (name, modes, cls.central_dp)
