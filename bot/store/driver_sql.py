"""Driver-level SQL for the inbound hot path, on SQLite and PostgreSQL.

Everything else uses SQLAlchemy Core and the typed models. The few statements
that run for every callback go straight to the DBAPI cursor instead: building
and compiling SQLAlchemy statements and converting each bound value in Python
cost more than the database work itself (measured with ``bench/bench_ingest.py``).
The values written here use exactly the storage formats SQLAlchemy's types
use (``UtcDateTime``, ``JSON``, ``Boolean``), so rows written either way read
back the same through the models.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

# Datetimes go to SQLite as naive UTC "YYYY-MM-DD HH:MM:SS.ffffff": SQLAlchemy's storage format.

PREPARE = False
"""Whether single statements become server-side prepared statements on PostgreSQL: they do not.

psycopg prepares a statement after a few runs, and PostgreSQL then switches
to a generic plan chosen once, on the statistics of that moment: on a fresh
database, tables of a few rows, so lookups by key (``dedupe_key = ANY(...)``,
``mobile = ANY(...)``, ``m.id = ANY(...)``) stayed sequential scans of whole
tables for good and the writer spent most of each batch waiting on them
(``auto_explain`` under ``bench/bench_ingest.py``: 4-10 ms per statement at
5,000 rows). Unprepared, each statement is planned for its own values, on the
tables' sizes of the moment, for a few tens of microseconds. (The session-wide
``plan_cache_mode = force_custom_plan`` does the same but also re-plans every
foreign-key check, which doubled the cost of inserting a batch.) The inbound
batch's own set-based statements are prepared: see ``bot.ingest.batch``.
"""


class DriverSql:
    """Dialect details for raw statements on one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.postgres = conn.dialect.name == "postgresql"
        # The DBAPI cursor of the same connection, inside the same transaction: SQLAlchemy's
        # own execution path costs more per statement than SQLite's work for it.
        self.cursor: Any = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        self._ts_texts: dict[datetime, str] = {}
        """Storage text of each datetime already written through this (short-lived) object."""

    def sql(self, statement: str) -> str:
        """Statements are written with ``?`` placeholders; psycopg wants ``%s``."""
        return statement.replace("?", "%s") if self.postgres else statement

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """``column IN (...)`` as SQL and parameters: ``= ANY(?)`` with one array on PostgreSQL."""
        if self.postgres:
            return f"{column} = ANY(?)", [list(values)]
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    def rows(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        self._execute(statement, params)
        return list(self.cursor.fetchall())

    def scalar(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self._execute(statement, params)
        row = self.cursor.fetchone()
        return None if row is None else row[0]

    def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        self._execute(statement, params)

    def _execute(self, statement: str, params: Sequence[Any]) -> None:
        if self.postgres:
            self.cursor.execute(self.sql(statement), tuple(params), prepare=PREPARE)
        else:
            self.cursor.execute(statement, tuple(params))

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cursor.executemany(self.sql(statement), [tuple(r) for r in rows])

    # -- values

    def ts(self, value: datetime | None) -> Any:
        if value is None or self.postgres:
            return value
        text = self._ts_texts.get(value)  # most values of a batch are its one "now"
        if text is None:
            text = value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
            self._ts_texts[value] = text
        return text

    def read_ts(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return datetime.fromisoformat(str(value)).replace(tzinfo=UTC)

    def json(self, value: Any) -> Any:
        return None if value is None else json.dumps(value, ensure_ascii=False)

    def read_json(self, value: Any) -> Any:
        if value is None or not isinstance(value, str | bytes):
            return value
        return json.loads(value)

    def bool(self, value: bool) -> Any:
        return value if self.postgres else int(value)

    def allocate_ids(self, table: str, count: int) -> list[int]:
        """Ids for ``count`` new rows of ``table``, so one executemany can insert them all.

        On PostgreSQL they come from the table's sequence; on SQLite the caller
        holds the database's only write lock (BEGIN IMMEDIATE), so max(id) + 1 ... are free.
        """
        if count <= 0:
            return []
        if self.postgres:
            found = self.rows(
                "SELECT nextval(pg_get_serial_sequence(?, 'id')) FROM generate_series(1, ?)", (table, count)
            )
            return [int(r[0]) for r in found]
        top = int(self.scalar(f"SELECT coalesce(max(id), 0) FROM {table}"))
        return list(range(top + 1, top + 1 + count))


def chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
