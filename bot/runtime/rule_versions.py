"""Stored rules versions as rules: what every serving process, the CLI and the console use.

- ``stored_rules(conn, ref)``: load stored version ``ref`` (id or hash) as a
  ``Ruleset``, compiled in memory from its stored text (replay, pin, the console).
- ``VersionStore``: one process's link to the versions table and the control
  row (``LiveRules`` records every load through it and follows the control row).
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import RowMapping

from bot.rules.loader import LoadResult
from bot.rules.model import Ruleset
from bot.rules.versions import Check, stored_ruleset, texts_version
from bot.store import rule_versions as sql
from bot.store.db import WRITE_OPTIONS
from bot.store.rule_versions import Control


class VersionNotFound(LookupError):  # noqa: N818 - named for what the user sees
    """No stored version has that id or hash."""


class VersionUnusable(ValueError):  # noqa: N818 - named for what the user sees
    """A stored version that cannot be served: it has errors, or its own tests fail."""


def host_label() -> str:
    """Who loaded a version: this host and process."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def find_stored(conn: Connection, ref: str) -> RowMapping:
    """The stored version ``ref`` (id, ``#id``, hash or a unique hash prefix), or VersionNotFound."""
    try:
        row = sql.find_version(conn, ref)
    except sql.AmbiguousVersion as exc:
        raise VersionNotFound(str(exc)) from exc
    if row is None:
        raise VersionNotFound(f"no stored rules version {ref!r} (see 'smsbot rules versions')")
    return row


def compile_stored(row: RowMapping, *, param_max_length: int | None = None) -> Ruleset:
    """A stored version's text compiled in memory; VersionUnusable when it does not compile."""
    result = stored_ruleset(dict(row["files"]), param_max_length=param_max_length)
    if result.ruleset is None:
        problems = "; ".join(str(d) for d in sorted(result.errors)[:3])
        raise VersionUnusable(f"rules version {row['hash']} (#{row['id']}) has errors: {problems}")
    return result.ruleset


def stored_rules(conn: Connection, ref: str | int, *, param_max_length: int | None = None) -> Ruleset:
    """Load stored version ``ref`` (id or hash) as a ``Ruleset`` (its ``version`` is the stored hash)."""
    return compile_stored(find_stored(conn, str(ref)), param_max_length=param_max_length)


class VersionStore:
    """Records the versions one process loads and reads the control row for it; thread-safe."""

    def __init__(self, engine: Engine, *, param_max_length: int | None = None) -> None:
        self.engine = engine
        self.param_max_length = param_max_length
        self.host = host_label()
        self._compiled: dict[int, Ruleset] = {}
        self._lock = threading.Lock()

    def record(self, result: LoadResult, check: Check) -> int:
        """Store what a load of the folder found (once per text); the version's id."""
        now = datetime.now(UTC)
        with self.engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
            return sql.record_version(
                conn,
                hash=texts_version(result.texts),
                files=dict(result.texts),
                check=check.as_json(),
                ok=check.ok,
                host=self.host,
                now=now,
            )

    def loaded(self, version_id: int, *, staged: bool) -> Control:
        """A valid version loaded from the folder: live (immediate) or the candidate (staged)."""
        with self.engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
            return sql.version_loaded(conn, version_id, staged=staged, by=self.host, now=datetime.now(UTC))

    def control(self) -> Control:
        with self.engine.connect() as conn:
            return sql.read_control(conn)

    def rules(self, version_id: int, known: dict[int, Ruleset] | None = None) -> Ruleset:
        """Stored version ``version_id`` compiled (kept: a version's text never changes)."""
        if known and version_id in known:
            return known[version_id]
        with self._lock:
            found = self._compiled.get(version_id)
        if found is not None:
            return found
        with self.engine.connect() as conn:
            row = find_stored(conn, str(version_id))
        ruleset = compile_stored(row, param_max_length=self.param_max_length)
        with self._lock:
            self._compiled[version_id] = ruleset
        return ruleset


# ---------------------------------------------------------------- changes of the control row (CLI and console)


class RolloutRefused(ValueError):  # noqa: N818 - named for what the user sees
    """A promote, pin or unpin that cannot be done as asked (nothing changed)."""


def promote_candidate(conn: Connection, *, by: str, now: datetime) -> Control:
    """Make the candidate live for everyone (one UPDATE); RolloutRefused when there is none."""
    done = sql.promote(conn, by=by, now=now)
    if done is None:
        raise RolloutRefused("there is no candidate to promote (with rollout: staged, a new valid version is one)")
    return done


def pin_version(
    conn: Connection, ref: str, *, by: str, now: datetime, param_max_length: int | None = None
) -> tuple[Control, RowMapping]:
    """Serve stored version ``ref`` to everyone; refused unless it compiles and its own tests passed."""
    try:
        row = find_stored(conn, ref)
    except VersionNotFound as exc:
        raise RolloutRefused(str(exc)) from exc
    if not row["ok"]:
        problems = list((row["check"] or {}).get("errors") or []) + list(
            ((row["check"] or {}).get("tests") or {}).get("failures") or []
        )
        raise RolloutRefused(
            f"rules version {row['hash']} (#{row['id']}) was refused when it loaded and cannot be pinned: "
            + "; ".join(problems[:3])
        )
    try:
        compile_stored(row, param_max_length=param_max_length)
    except VersionUnusable as exc:
        raise RolloutRefused(str(exc)) from exc
    return sql.pin(conn, int(row["id"]), by=by, now=now), row


def unpin_version(conn: Connection, *, by: str, now: datetime) -> Control:
    if sql.read_control(conn).pinned_id is None:
        raise RolloutRefused("no rules version is pinned")
    return sql.unpin(conn, by=by, now=now)
