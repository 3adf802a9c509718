"""The dashboard's SQL: traffic counted per time bucket by the database, and the keywords that matched.

Buckets are computed in SQL (epoch seconds plus an offset, divided by the
bucket length), so the database returns one row per bucket instead of every
message. A reply is counted in the bucket it was created in, also when its
failure report came later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Connection, Integer, and_, case, cast, func, select
from sqlalchemy.sql.elements import ColumnElement as Expr

from bot.store.models import messages, opt_out_events
from bot.store.queries import FAILED, NOT_SENT, message_filter

TRAFFIC = ("inbound", "outbound", "failed", "unmatched")
"""The per-bucket message counts, in the order the page lists them."""


@dataclass(frozen=True)
class Buckets:
    """Equal buckets of ``seconds``, shifted by ``offset`` seconds (a time zone's days), from ``since`` on."""

    seconds: int
    offset: int
    since: datetime


def _bucket(conn: Connection, column: Any, buckets: Buckets) -> ColumnElement[Any]:
    """The bucket number of ``column`` (a UTC timestamp), computed by the database."""
    if conn.dialect.name == "postgresql":
        epoch: Expr[Any] = func.extract("epoch", column)
        return cast(func.floor((epoch + buckets.offset) / buckets.seconds), BigInteger)
    seconds = cast(func.strftime("%s", column), Integer)
    return (seconds + buckets.offset) // buckets.seconds  # SQLAlchemy 2: ``/`` would be true division


def traffic(conn: Connection, *, buckets: Buckets) -> dict[int, dict[str, int]]:
    """Per bucket number with any message: the ``TRAFFIC`` counts (buckets without messages are absent)."""
    bucket = _bucket(conn, messages.c.created_at, buckets).label("bucket")
    inbound = messages.c.direction == "in"
    outbound = messages.c.direction == "out"
    stmt = (
        select(
            bucket,
            func.sum(case((inbound, 1), else_=0)).label("inbound"),
            func.sum(case((and_(outbound, messages.c.status.not_in(NOT_SENT)), 1), else_=0)).label("outbound"),
            func.sum(case((and_(outbound, messages.c.status.in_(FAILED)), 1), else_=0)).label("failed"),
            func.sum(case((and_(inbound, messages.c.unmatched.is_(True)), 1), else_=0)).label("unmatched"),
        )
        .where(*message_filter(since=buckets.since))
        .group_by(bucket)
    )
    return {int(row["bucket"]): {k: int(row[k] or 0) for k in TRAFFIC} for row in conn.execute(stmt).mappings()}


def opt_outs(conn: Connection, *, buckets: Buckets) -> dict[int, int]:
    """Opt-outs per bucket number (buckets without any are absent)."""
    bucket = _bucket(conn, opt_out_events.c.created_at, buckets).label("bucket")
    stmt = (
        select(bucket, func.count())
        .where(opt_out_events.c.event == "opt_out", opt_out_events.c.created_at >= buckets.since)
        .group_by(bucket)
    )
    return {int(b): int(n) for b, n in conn.execute(stmt).all()}


def top_keywords(conn: Connection, *, since: datetime, limit: int) -> list[dict[str, Any]]:
    """The normalised texts that matched a rule most often since ``since``, with the rule they matched."""
    hits = func.count().label("hits")
    stmt = (
        select(messages.c.normalized_text, hits, func.max(messages.c.rule).label("rule"))
        .where(
            *message_filter(direction="in", since=since, unmatched=False),
            messages.c.rule.is_not(None),
            messages.c.normalized_text.is_not(None),
        )
        .group_by(messages.c.normalized_text)
        .order_by(hits.desc(), messages.c.normalized_text)
        .limit(limit)
    )
    return [dict(row) for row in conn.execute(stmt).mappings()]
