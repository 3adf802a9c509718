"""The contacts CSV of ``smsbot start --csv`` and ``smsbot contacts import``: a number and vars per row.

Columns: ``nationcode``, ``mobile``, then one column per var (its header is the
var's name). UTF-8, with or without Excel's byte-order mark. An empty cell sets
no value (the var keeps what it had). Line numbers are the file's own (the
header is line 1), so a rejected row can be found in an editor.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bot.outreach.check import VAR_NAME, StartRefused, check_number, check_vars


@dataclass(frozen=True)
class CsvRow:
    line: int
    nationcode: str
    mobile: str
    vars: dict[str, str]


@dataclass(frozen=True)
class CsvProblem:
    line: int
    field: str
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.detail}"


@dataclass
class CsvFile:
    rows: list[CsvRow] = field(default_factory=list)
    problems: list[CsvProblem] = field(default_factory=list)


class CsvRefused(Exception):  # noqa: N818 - what the user sees
    """The file as a whole cannot be read (not UTF-8, wrong header)."""


def count_rows(path: Path) -> int:
    """Data rows in ``path`` (for a progress bar's length), without checking them."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return max(sum(1 for _ in csv.reader(handle)) - 1, 0)


def read_rows(path: Path) -> Iterator[CsvRow | CsvProblem]:
    """Each data row of ``path``, checked: a ``CsvRow``, or a ``CsvProblem`` naming its line and field."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise CsvRefused(f"{path}: the file is empty (the first line names the columns)")
            names = [name.strip() for name in header]
            if names[:2] != ["nationcode", "mobile"]:
                raise CsvRefused(f"{path}: line 1 must start with the columns nationcode,mobile (then one per var)")
            var_names = names[2:]
            for name in var_names:
                if not VAR_NAME.fullmatch(name):
                    raise CsvRefused(f"{path}: line 1: {name!r} is not a var name (letters, digits, _)")
            if len(set(var_names)) != len(var_names):
                raise CsvRefused(f"{path}: line 1: a var column appears twice")
            for cells in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue  # a blank line
                if len(cells) != len(names):
                    yield CsvProblem(line, "columns", f"{len(cells)} cells, the header has {len(names)}")
                    continue
                try:
                    nationcode, mobile = check_number(cells[0] or "86", cells[1])
                    values = check_vars({n: v for n, v in zip(var_names, cells[2:], strict=True) if v != ""})
                except StartRefused as exc:
                    yield CsvProblem(line, exc.field, exc.detail)
                    continue
                yield CsvRow(line, nationcode, mobile, values)
    except UnicodeDecodeError as exc:
        raise CsvRefused(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_file(path: Path) -> CsvFile:
    found = CsvFile()
    for item in read_rows(path):
        (found.rows if isinstance(item, CsvRow) else found.problems).append(item)  # type: ignore[arg-type]
    return found
