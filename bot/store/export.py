"""Messages in and out as CSV or JSON lines, for ``smsbot export`` and the console's download.

Both callers need the same thing: every message in a time range, with the
reasons the bot gave (rule, states, template, delivery outcome), in a file
a spreadsheet or a script can read. So the query and the row format live
here, and the callers only choose where the chunks go.

An export can cover millions of rows, so nothing here holds more than one
batch: rows are read through a server-side cursor on PostgreSQL (SQLite's
cursor is lazy anyway) and turned into text a batch at a time.

Phone numbers are masked unless the caller asks to reveal them: an export is
a file that gets mailed around, and the masked form is enough to tell
conversations apart. Numbers a customer typed into a message are masked
too, the same way the logs do it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, Engine, RowMapping, Select, func, select

from bot.numbers import mask_number, mask_phone_numbers
from bot.store.models import messages
from bot.store.queries import NUMBER, message_filter, messages_with_numbers

ExportFormat = Literal["csv", "jsonl"]
BATCH_ROWS = 1000

COLUMNS = (
    "id",
    "created_at",
    "conversation_id",
    "signature",
    "nationcode",
    "mobile",
    "direction",
    "text",
    "in_reply_to_id",
    "rule",
    "rule_kind",
    "unmatched",
    "state_before",
    "state_after",
    "template_name",
    "template_id",
    "params",
    "segments",
    "status",
    "status_reason",
    "error_code",
    "error_message",
    "provider_serial",
    "provider_time",
    "sent_at",
    "delivered_at",
    "updated_at",
)
"""The columns, in file order. Part of the interface: scripts read these names, so they only ever grow."""

_FREE_TEXT = ("text", "status_reason", "error_message")
_CSV_FORMULA = re.compile(r"^[=+\-@\t\r]")


class BadDate(ValueError):  # noqa: N818 - named for what the user sees
    """A --since/--until value that is neither an ISO date nor an ISO datetime."""


@dataclass(frozen=True)
class ExportFilter:
    """Which messages: ``since <= created_at < until`` (UTC), optionally of one signature."""

    since: datetime
    until: datetime
    signature: str | None = None
    reveal: bool = False

    def __post_init__(self) -> None:
        if self.since.tzinfo is None or self.until.tzinfo is None:
            raise ValueError("export bounds must be aware datetimes")
        if self.until <= self.since:
            raise BadDate(f"the range is empty: until ({self.until.isoformat()}) is not after since")


def parse_bound(value: str, *, end: bool = False) -> datetime:
    """An export bound from the command line or a form field, as an aware UTC datetime.

    A bare date means a whole day, so ``--since 2026-01-01 --until 2026-01-31``
    is all of January: as a start it is that day's 00:00, as an end (``end``)
    the next day's 00:00, exclusive. A datetime is taken as written (exclusive
    as an end); without an offset it is UTC, like every time the database holds.
    """
    text = value.strip()
    try:
        day = date.fromisoformat(text)
    except ValueError:
        pass
    else:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        return start + timedelta(days=1) if end else start
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadDate(
            f"{value!r} is not a date or time: use 2026-01-31, 2026-01-31T08:00 or 2026-01-31T08:00+08:00"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _where(filters: ExportFilter) -> list[ColumnElement[bool]]:
    """One filter for the file and for ``count_rows``, so a progress bar counts the rows the file gets."""
    return message_filter(since=filters.since, until=filters.until, signature=filters.signature)


def _query(filters: ExportFilter) -> Select[Any]:
    cols = [c for c in messages.c if c.name in COLUMNS]
    return (
        select(*cols, *NUMBER)
        .select_from(messages_with_numbers())
        .where(*_where(filters))
        .order_by(messages.c.created_at, messages.c.id)
    )


def count_rows(engine: Engine, filters: ExportFilter) -> int:
    """How many rows ``export_chunks`` will yield (an index range count: cheap enough for a progress bar)."""
    query = select(func.count()).select_from(messages).where(*_where(filters))
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def iter_rows(engine: Engine, filters: ExportFilter) -> Iterator[dict[str, Any]]:
    """Every matching message as a plain dict (values as the database gave them), oldest first, masked."""
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=BATCH_ROWS).execute(_query(filters))
        for row in result.mappings():
            yield _row(row, reveal=filters.reveal)


def _row(row: RowMapping, *, reveal: bool) -> dict[str, Any]:
    out = {name: row[name] for name in COLUMNS}
    if not reveal:
        out["mobile"] = mask_number(out["mobile"])
        for name in _FREE_TEXT:
            if out[name]:
                out[name] = mask_phone_numbers(out[name])
    return out


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _csv_cell(value: Any) -> Any:
    """A CSV cell; text a spreadsheet would run as a formula (``=HYPERLINK(...)``) gets a leading quote."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        value = json.dumps(value, ensure_ascii=False)
    if isinstance(value, str) and _CSV_FORMULA.match(value):
        return "'" + value
    return value


def export_chunks(
    engine: Engine,
    filters: ExportFilter,
    fmt: ExportFormat,
    *,
    progress: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """The export as text chunks of about ``BATCH_ROWS`` rows each (CSV starts with its header line).

    Suits a streaming HTTP response as well as a file: memory stays at one
    batch whatever the range. ``progress`` is called with the number of rows
    in each chunk just before it is yielded.
    """
    buffer = io.StringIO()
    # "\r\n" (RFC 4180), not "\n": the csv module quotes a field holding a character of the line
    # terminator, and with "\n" alone a customer's "\r=cmd" stayed unquoted, so a spreadsheet
    # started a new row at the CR with the formula first in its cell.
    writer = csv.writer(buffer, lineterminator="\r\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(COLUMNS)
    pending = 0
    for row in iter_rows(engine, filters):
        if writer is not None:
            writer.writerow([_csv_cell(row[name]) for name in COLUMNS])
        else:
            buffer.write(json.dumps({k: _jsonable(v) for k, v in row.items()}, ensure_ascii=False))
            buffer.write("\n")
        pending += 1
        if pending >= BATCH_ROWS:
            if progress is not None:
                progress(pending)
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    if progress is not None and pending:
        progress(pending)
    if buffer.tell():
        yield buffer.getvalue()


def media_type(fmt: ExportFormat) -> str:
    """The Content-Type of a download in ``fmt``."""
    return "text/csv; charset=utf-8" if fmt == "csv" else "application/x-ndjson; charset=utf-8"
