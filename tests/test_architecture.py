"""The import directions of docs/architecture.md's "Packages" table hold in the code.

The table is the single source of truth: this test reads it (it keeps no copy
of its own), so changing what a package may import means changing the
document. Every ``import`` and ``from ... import`` in every module under
``bot/`` and ``migrations/`` counts, wherever it stands: at module level,
inside a function, or under ``if TYPE_CHECKING:`` (a type-only import is
still a dependency a reader has to follow, and it becomes a real one the day
someone needs the name at run time).

The checker works on text (the table's Markdown, the modules' sources) so
that ``test_the_checker_reports_forbidden_imports`` can prove on a synthetic
tree that it does report violations, and the real-tree test cannot pass by
checking nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO

DOC = REPO / "docs" / "architecture.md"
SOURCE_DIRS = ("bot", "migrations")
ROOT_PACKAGE = "bot/__init__.py"
"""The root of the namespace: in no row, so it must import nothing of ours (everything imports it)."""

NOTHING = "nothing of ours"
EVERYTHING = "everything"


@dataclass(frozen=True)
class Row:
    """One row of the Packages table.

    ``path`` is the repository path as written (``bot/rules/``, ``bot/numbers.py``,
    ``migrations/``); ``module`` the dotted name it is imported under
    (``bot.rules``, ``bot.numbers``, ``bot.migrations``); ``may_import`` the
    paths of the rows it may import, or None for "everything".
    """

    path: str
    module: str
    may_import: frozenset[str] | None

    @property
    def is_package(self) -> bool:
        return self.path.endswith("/")


class TableError(AssertionError):
    """The Packages table cannot be read: the test fails rather than guessing."""


def _cells(line: str) -> list[str]:
    if not (line.startswith("|") and line.endswith("|")):
        raise TableError(f"not a table row: {line!r}")
    return [cell.strip() for cell in line[1:-1].split("|")]


def _dotted(path: str) -> str:
    return path.removesuffix("/").removesuffix(".py").replace("/", ".")


def parse_table(markdown: str) -> list[Row]:
    """The rows of the table under ``## Packages`` (columns ``package | holds | may import``)."""
    lines = markdown.splitlines()
    try:
        start = lines.index("## Packages")
    except ValueError:
        raise TableError("no '## Packages' section") from None
    table: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append(line.strip())
        elif table:
            break  # the first blank or prose line after the table ends it
    if len(table) < 3:
        raise TableError("the Packages section has no table with rows")
    header = [cell.lower() for cell in _cells(table[0])]
    if header != ["package", "holds", "may import"]:
        raise TableError(f"unexpected columns {header}")
    if not all(set(cell) <= set("-: ") for cell in _cells(table[1])):
        raise TableError(f"second line is not the header separator: {table[1]!r}")

    rows: list[Row] = []
    for line in table[2:]:
        cells = _cells(line)
        if len(cells) != 3:
            raise TableError(f"expected 3 cells: {line!r}")
        package, _holds, allowed = cells
        named = re.fullmatch(r"`([^`]+)`(?: \(installed as `([^`]+)`\))?", package)
        if named is None:
            raise TableError(f"first cell must be a backticked path (optionally '(installed as `x`)'): {package!r}")
        path, installed_as = named.group(1), named.group(2)
        if not path.endswith(("/", ".py")):
            raise TableError(f"{path!r} is neither a package (ending in /) nor a module (ending in .py)")
        may_import: frozenset[str] | None
        if allowed == EVERYTHING:
            may_import = None
        elif allowed == NOTHING:
            may_import = frozenset()
        else:
            items = [item.strip() for item in allowed.split(",")]
            if not all(re.fullmatch(r"`[^`]+`", item) for item in items):
                raise TableError(
                    f"{path}: last cell must be {NOTHING!r}, {EVERYTHING!r} or backticked paths: {allowed!r}"
                )
            may_import = frozenset(item.strip("`") for item in items)
        rows.append(Row(path, installed_as or _dotted(path), may_import))

    paths = [row.path for row in rows]
    if len(set(paths)) != len(paths):
        raise TableError(f"a package has two rows: {paths}")
    for row in rows:
        unknown = sorted((row.may_import or frozenset()) - set(paths))
        if unknown:
            raise TableError(f"{row.path} may import {unknown}, which have no row of their own")
    return rows


def row_of(module: str, rows: list[Row]) -> Row | None:
    """The row ``module`` (a dotted name, maybe of a name inside a module) belongs to: the longest match."""
    matches = [row for row in rows if module == row.module or module.startswith(row.module + ".")]
    return max(matches, key=lambda row: len(row.module), default=None)


def module_name(path: str, rows: list[Row]) -> str:
    """The dotted name a source file is imported under (``migrations/env.py`` -> ``bot.migrations.env``)."""
    dotted = path.removesuffix(".py").removesuffix("/__init__")
    for row in sorted(rows, key=lambda row: len(row.path), reverse=True):
        if row.is_package and path.startswith(row.path):
            rest = dotted[len(row.path) :].replace("/", ".")
            return row.module + ("." + rest if rest else "")
    return dotted.replace("/", ".")


def imported_names(source: str, module: str, *, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every name ``source`` imports, anywhere in it, relative imports resolved.

    ``from a.b import c`` yields ``a.b.c`` (``c`` may be a module or a name in
    ``a.b``; the longest-match lookup of the row gives the right package either way).
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise AssertionError(f"{module}: relative import beyond the top package (line {node.lineno})")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield node.lineno, base if alias.name == "*" else f"{base}.{alias.name}"


def ours(name: str) -> bool:
    return name == "bot" or name.startswith("bot.")


def violations(rows: list[Row], sources: Mapping[str, str]) -> list[str]:
    """Every forbidden import in ``sources`` (repository path -> Python source), and every module without a row."""
    found: list[str] = []
    for path in sorted(sources):
        module = module_name(path, rows)
        own = row_of(module, rows)
        is_package = path.endswith("/__init__.py")
        names = sorted({name for _line, name in imported_names(sources[path], module, is_package=is_package)})
        if own is None and path != ROOT_PACKAGE:
            found.append(f"{path} belongs to no row of the Packages table")
            continue
        for name in filter(ours, names):
            target = row_of(name, rows)
            if own is None:  # the root package
                found.append(f"{path} imports {name} ({path} belongs to no row and may import nothing of ours)")
            elif target is None:
                found.append(f"{path} imports {name}, which belongs to no row of the Packages table")
            elif target != own and own.may_import is not None and target.path not in own.may_import:
                found.append(f"{path} imports {name} ({target.path} may not be imported by {own.path})")
    return found


def missing_paths(rows: list[Row], root: Path) -> list[str]:
    """Rows naming a path that is not in the tree (a renamed package must not leave a stale row behind)."""
    missing = []
    for row in rows:
        target = root / row.path
        if not (target.is_dir() if row.is_package else target.is_file()):
            missing.append(f"the Packages table names {row.path}, which does not exist")
    return missing


def sources_under(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): path.read_text(encoding="utf-8")
        for top in SOURCE_DIRS
        for path in sorted((root / top).rglob("*.py"))
    }


# ---------------------------------------------------------------- the real tree


def test_the_table_is_read() -> None:
    """Guards the parser: a table it misread (no rows, no restrictions) would make the import test vacuous."""
    rows = parse_table(DOC.read_text(encoding="utf-8"))
    by_path = {row.path: row for row in rows}
    assert {"bot/rules/", "bot/cli/", "migrations/"} <= set(by_path)
    assert by_path["bot/rules/"].may_import == frozenset()
    assert by_path["bot/cli/"].may_import is None
    assert by_path["migrations/"].module == "bot.migrations"
    assert by_path["migrations/"].may_import == frozenset({"bot/store/"})


def test_every_row_names_a_path_that_exists() -> None:
    assert missing_paths(parse_table(DOC.read_text(encoding="utf-8")), REPO) == []


def test_imports_follow_the_packages_table() -> None:
    """Each module imports only its own package and what its row's "may import" names; each module has a row."""
    rows = parse_table(DOC.read_text(encoding="utf-8"))
    sources = sources_under(REPO)
    assert len(sources) > 50, f"found only {len(sources)} modules: is SOURCE_DIRS right?"
    found = violations(rows, sources)
    if found:
        pytest.fail("imports the Packages table of docs/architecture.md forbids:\n" + "\n".join(found), pytrace=False)


# ---------------------------------------------------------------- the checker itself

TABLE = """\
# Title

## Packages

| package | holds | may import |
| --- | --- | --- |
| `bot/rules/` | rules | nothing of ours |
| `bot/numbers.py` | numbers | nothing of ours |
| `bot/store/` | storage | `bot/numbers.py` |
| `bot/tencent/` | vendor | `bot/rules/`, `bot/numbers.py` |
| `bot/ingest/` | inbound | `bot/rules/`, `bot/tencent/`, `bot/store/` |
| `bot/cli/` | command | everything |
| `migrations/` (installed as `bot.migrations`) | Alembic | `bot/store/` |

## Next section
"""


def test_the_checker_reports_forbidden_imports() -> None:
    """A synthetic tree with known violations, in every import form the real test relies on seeing."""
    rows = parse_table(TABLE)
    sources = {
        "bot/__init__.py": "",
        "bot/rules/__init__.py": "",
        "bot/rules/engine.py": "from bot.store.db import make_engine\nfrom . import model\nfrom .model import Rule\n",
        "bot/rules/model.py": "def f() -> None:\n    from bot import numbers\n",
        "bot/rules/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..store import models\n",
        "bot/numbers.py": "import re\n",
        "bot/store/db.py": "import bot.numbers\nfrom bot.store import models\n",
        "bot/tencent/callbacks.py": "from bot.rules.model import Rule\nimport bot.ingest.batch\n",
        "bot/ingest/batch.py": "from bot.rules import engine\nfrom bot.tencent import callbacks\nfrom bot.cli import app\n",
        "bot/cli/__init__.py": "from bot.ingest.batch import handle\nimport bot.migrations.env\n",
        "bot/stray.py": "import os\n",
        "bot/web/app.py": "from bot.rules import engine\n",
        "migrations/env.py": "from bot.store.models import Base\nfrom bot.tencent import sender\nfrom . import versions\n",
        "migrations/versions/0001_x.py": "import bot.store.models\nfrom bot.unknown import thing\n",
    }
    assert violations(rows, sources) == [
        "bot/ingest/batch.py imports bot.cli.app (bot/cli/ may not be imported by bot/ingest/)",
        "bot/rules/engine.py imports bot.store.db.make_engine (bot/store/ may not be imported by bot/rules/)",
        "bot/rules/model.py imports bot.numbers (bot/numbers.py may not be imported by bot/rules/)",
        "bot/rules/typed.py imports bot.store.models (bot/store/ may not be imported by bot/rules/)",
        "bot/stray.py belongs to no row of the Packages table",
        "bot/tencent/callbacks.py imports bot.ingest.batch (bot/ingest/ may not be imported by bot/tencent/)",
        "bot/web/app.py belongs to no row of the Packages table",
        "migrations/env.py imports bot.tencent.sender (bot/tencent/ may not be imported by migrations/)",
        "migrations/versions/0001_x.py imports bot.unknown.thing, which belongs to no row of the Packages table",
    ]


def test_the_root_package_may_import_nothing_of_ours() -> None:
    rows = parse_table(TABLE)
    assert violations(rows, {"bot/__init__.py": "from bot.rules import engine\n"}) == [
        "bot/__init__.py imports bot.rules.engine (bot/__init__.py belongs to no row and may import nothing of ours)"
    ]


def test_the_checker_reports_rows_naming_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "bot" / "rules").mkdir(parents=True)
    (tmp_path / "bot" / "numbers.py").write_text("", encoding="utf-8")
    (tmp_path / "bot" / "store.py").write_text("", encoding="utf-8")  # a module where the table says package
    rows = parse_table(TABLE)
    assert missing_paths(rows, tmp_path) == [
        f"the Packages table names {path}, which does not exist"
        for path in ("bot/store/", "bot/tencent/", "bot/ingest/", "bot/cli/", "migrations/")
    ]


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        (TABLE.replace("| `bot/numbers.py` |", "| bot/numbers.py |"), "backticked path"),
        (TABLE.replace("`bot/rules/`, `bot/numbers.py` |", "`bot/rules/` and `bot/numbers.py` |"), "backticked paths"),
        (TABLE.replace("| command | everything |", "| command | anything |"), "backticked paths"),
        (TABLE.replace("`bot/numbers.py` |\n", "`bot/number.py` |\n"), "have no row of their own"),
        (TABLE.replace("| may import |", "| imports |"), "unexpected columns"),
        (TABLE.replace("## Packages", "## Package list"), "no '## Packages' section"),
    ],
    ids=["path-not-backticked", "list-not-commas", "unknown-word", "unknown-row", "columns", "no-section"],
)
def test_a_table_it_cannot_read_fails_instead_of_allowing(table: str, complaint: str) -> None:
    """A misspelt table must fail loudly: silently dropping a row or a restriction would allow imports."""
    with pytest.raises(TableError, match=re.escape(complaint)):
        parse_table(table)
