"""``load_version``: a stored rules version (table ``rule_versions``) compiled into a ``Ruleset``.

The table is written by the versioning half of issue 14 (migration 0012). Until
a database has it, asking for a version says so plainly. What is read: the row
whose ``id`` is ``version`` or whose ``content_hash`` starts with it, and its
``files`` column, a JSON object ``{file name: text}``; each text is compiled by
the same compiler as the rule files on disk.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, inspect, text

from bot.rules.compiler import compile_file
from bot.rules.model import Ruleset

TABLE = "rule_versions"


class StoredVersionsMissing(LookupError):  # noqa: N818 - named for what the database lacks
    """The database has no ``rule_versions`` table yet."""


class VersionNotFound(LookupError):  # noqa: N818 - named for the answer
    """No stored version (or more than one) answers to what was asked for, or it does not compile."""


def load_version(conn: Connection, version: str) -> Ruleset:
    """The stored version ``version`` (an id, or the start of its content hash), compiled."""
    if not inspect(conn).has_table(TABLE):
        raise StoredVersionsMissing(
            "stored rule versions are not available in this database yet (no rule_versions table: "
            "run smsbot db upgrade with a release that stores them), so only the rule files now can be replayed"
        )
    wanted = version.strip()
    if not wanted:
        raise VersionNotFound("no version given")
    params: dict[str, Any] = {"prefix": wanted.replace("%", "").replace("_", "") + "%"}
    condition = "content_hash LIKE :prefix"
    if wanted.isdigit():
        condition += " OR id = :id"
        params["id"] = int(wanted)
    found = conn.execute(text(f"SELECT id, content_hash, files FROM {TABLE} WHERE {condition}"), params).all()
    if not found:
        raise VersionNotFound(f"no stored rules version {wanted!r} (smsbot rules versions lists them)")
    if len(found) > 1:
        ids = ", ".join(str(row[0]) for row in found[:5])
        raise VersionNotFound(f"{wanted!r} matches {len(found)} stored versions ({ids}): give more of the hash")
    files = found[0][2]
    if isinstance(files, str | bytes):
        files = json.loads(files)
    if not isinstance(files, dict) or not files:
        raise VersionNotFound(f"stored version {wanted!r} holds no files")
    compiled = []
    problems: list[str] = []
    for name, source in sorted(files.items()):
        result = compile_file(str(source), path=str(name), name=str(name))
        problems += [str(d) for d in result.diagnostics if d.is_error]
        if result.compiled is not None:
            compiled.append(result.compiled)
    if problems:
        raise VersionNotFound(f"stored version {wanted!r} does not compile: " + "; ".join(problems[:5]))
    return Ruleset.of(tuple(compiled))
