"""The README's configuration table lists every environment variable the settings read.

The expected rows are generated from the pydantic models (``Settings``, which extends the
worker side's ``CelerySettings``): each field's environment variable is the first name of
its ``validation_alias``. A field added to either model without a README row, a row for a
variable nothing reads, and a default that differs from the code all fail here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo

from service.config import Settings
from taskgate.worker.contract import CelerySettings

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Configuration"
_ROW = re.compile(r"^\|\s*`(?P<name>[A-Z][A-Z0-9_]*)`\s*\|(?P<rest>.*)\|\s*$")
_CODE = re.compile(r"`([^`]*)`")
#: How the table writes an empty string default.
EMPTY = "empty"
#: Units a numeric setting may name in the table's Unit column.
UNITS = {"seconds", "bytes", "count", "connections", "levels", "tasks", "streams"}


@dataclass(frozen=True)
class Row:
    """One row of the README's configuration table."""

    name: str
    default: str
    unit: str


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a settings field reads (the first choice of its alias)."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        assert isinstance(first, str), f"{name}: the first alias must be the variable's name"
        return first
    if isinstance(alias, str):
        return alias
    return name.upper()


def read_variables(*models: type[BaseModel]) -> dict[str, FieldInfo]:
    """Every environment variable the models read, with the field that reads it."""
    fields: dict[str, FieldInfo] = {}
    for model in models:
        for name, field in model.model_fields.items():
            fields[env_name(name, field)] = field
    return fields


def readme_rows(text: str) -> dict[str, Row]:
    """The rows of the tables in the README's configuration section, by variable name.

    Raises:
        AssertionError: no such section, a variable listed twice, or a row with too few columns.
    """
    assert SECTION in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, Row] = {}
    for line in section.splitlines():
        match = _ROW.match(line.strip())
        if match is None:
            continue
        cells = [cell.strip() for cell in match["rest"].split("|")]
        assert len(cells) >= 3, f"row {line!r}: expected | Variable | Default | Unit | Meaning |"
        name = match["name"]
        assert name not in rows, f"{name} is listed twice"
        rows[name] = Row(name, _default_text(cells[0]), cells[1])
    return rows


def _default_text(cell: str) -> str:
    """The default as the table writes it: the first code span, or ``empty``."""
    if cell.lower().startswith(EMPTY):
        return EMPTY
    match = _CODE.search(cell)
    assert match is not None, f"default {cell!r}: write it as `value` or {EMPTY!r}"
    return match.group(1)


def same_default(code: Any, table: str) -> bool:
    """Whether the table's text means the code's default (numbers compare as numbers)."""
    if isinstance(code, bool):
        return table == ("1" if code else "0")
    if isinstance(code, int | float):
        try:
            return float(table.replace("_", "").replace(",", "")) == float(code)
        except ValueError:
            return False
    if code == "":
        return table == EMPTY
    return str(code) == table


@pytest.fixture(scope="module")
def rows() -> dict[str, Row]:
    return readme_rows(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def variables() -> dict[str, FieldInfo]:
    return read_variables(CelerySettings, Settings)


def test_every_variable_the_settings_read_is_in_the_table(
    rows: dict[str, Row], variables: dict[str, FieldInfo]
) -> None:
    missing = sorted(set(variables) - set(rows))
    assert not missing, f"add these to the README's configuration table: {missing}"


def test_the_table_lists_only_variables_that_are_read(
    rows: dict[str, Row], variables: dict[str, FieldInfo]
) -> None:
    unread = sorted(set(rows) - set(variables))
    assert not unread, f"the README's configuration table lists variables no setting reads: {unread}"


def test_the_table_defaults_are_the_code_defaults(
    rows: dict[str, Row], variables: dict[str, FieldInfo]
) -> None:
    wrong = {
        name: (rows[name].default, field.get_default(call_default_factory=True))
        for name, field in variables.items()
        if name in rows and not same_default(field.get_default(call_default_factory=True), rows[name].default)
    }
    assert not wrong, f"README default differs from the code (README, code): {wrong}"


def test_numeric_settings_name_their_unit(rows: dict[str, Row], variables: dict[str, FieldInfo]) -> None:
    numeric = [name for name, field in variables.items() if field.annotation in (int, float)]
    without = sorted(name for name in numeric if name in rows and rows[name].unit not in UNITS)
    assert not without, f"give these a unit ({sorted(UNITS)}) in the README: {without}"


def test_the_parser_reads_defaults_as_the_table_writes_them() -> None:
    text = f"{SECTION}\n\n| Variable | Default | Unit | Meaning |\n|---|---|---|---|\n"
    text += "| `A_B` | empty | — | x |\n| `C` | `300` (5 min) | seconds | y |\n\n## Next\n| `D` | `1` | | |\n"
    rows = readme_rows(text)
    assert rows == {"A_B": Row("A_B", EMPTY, "—"), "C": Row("C", "300", "seconds")}
    assert same_default("", EMPTY) and same_default(300.0, "300") and same_default(False, "0")
    assert not same_default(True, "0") and not same_default(31536000.0, "3153600")
