"""What ops features cost on a grown database: a ``/metrics`` scrape and an export.

Fills a database with N messages spread over 30 days (a tenth as many
contacts, 100 replies waiting in the outbox), then times, best of 5:
the database part of a ``/metrics`` scrape (the 24-hour reply counts and the
outbox), the whole ``/metrics`` body, and for comparison the all-time count
by status that the scrape deliberately avoids; then one CSV and one JSONL
export of everything through ``bot.store.export.export_chunks`` (rows/s).

    .venv/bin/python bench/bench_ops.py [--messages 100000] [--database sqlite|postgres]

PostgreSQL uses (and wipes) the database ``smsbot_bench_ops`` on the local
server, created if missing; never the test database.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine, create_engine, func, insert, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import Settings
from bot.store.db import make_engine, upgrade
from bot.store.export import ExportFilter, export_chunks
from bot.store.models import contacts, conversations, messages, outbox
from bot.web.metrics import AppMetrics

POSTGRES_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"
POSTGRES_DB = "smsbot_bench_ops"


def database_url(kind: str) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tempfile.mkdtemp(prefix='smsbot-bench-ops-')}/bench.db"
    admin = create_engine(f"{POSTGRES_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {POSTGRES_DB}"))
            conn.execute(text(f"CREATE DATABASE {POSTGRES_DB}"))
    finally:
        admin.dispose()
    return f"{POSTGRES_SERVER}/{POSTGRES_DB}"


def fill(engine: Engine, n: int, now: datetime) -> None:
    rng = random.Random(1)
    people = max(1, n // 10)
    with engine.begin() as conn:
        conn.execute(
            insert(contacts),
            [{"id": i + 1, "nationcode": "86", "mobile": f"138{i:08d}", "created_at": now} for i in range(people)],
        )
        conn.execute(
            insert(conversations),
            [
                {"id": i + 1, "signature": "Acme Shop", "contact_id": i + 1, "state": None, "variables": {},
                 "opted_out": False, "created_at": now, "updated_at": now}
                for i in range(people)
            ],
        )  # fmt: skip
        rows = []
        for i in range(n):
            who = rng.randrange(people) + 1
            at = now - timedelta(seconds=rng.randrange(30 * 86400))
            out = i % 2 == 1
            rows.append(
                {"id": i + 1, "direction": "out" if out else "in", "conversation_id": who, "contact_id": who,
                 "signature": "Acme Shop", "text": "Reply 1 for order status" if out else "MENU",
                 "status": rng.choice(["sent", "delivered", "failed", "queued"]) if out else "received",
                 "rule": "acme-shop.yaml:32", "template_id": "1490001" if out else None,
                 "params": ["a"] if out else None, "created_at": at, "updated_at": at}
            )  # fmt: skip
            if len(rows) == 10_000:
                conn.execute(insert(messages), rows)
                rows = []
        if rows:
            conn.execute(insert(messages), rows)
        conn.execute(
            insert(outbox),
            [
                {"message_id": i * 2, "attempts": 0, "next_attempt_at": now, "created_at": now - timedelta(minutes=5)}
                for i in range(1, 101)
            ],
        )
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()


def best_of(fn: Callable[[], object], repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    args = parser.parse_args()
    url = database_url(args.database)
    upgrade(url)
    engine = make_engine(url)
    now = datetime.now(UTC).replace(microsecond=0)
    print(f"filling {args.database} with {args.messages:,} messages ...", flush=True)
    fill(engine, args.messages, now)

    def all_time() -> None:
        with engine.connect() as conn:
            query = select(messages.c.status, func.count()).where(messages.c.direction == "out")
            list(conn.execute(query.group_by(messages.c.status)))

    from prometheus_client import generate_latest

    metrics = AppMetrics(Settings(), engine=engine, clock=lambda: now, rules_status=lambda: {"version": "x"})
    print(f"{args.database}, {args.messages:,} messages (best of 5):")
    print(f"  /metrics database part (24 h replies + outbox): {best_of(metrics.database._read) * 1000:7.1f} ms")
    print(
        f"  /metrics whole body:                            {best_of(lambda: generate_latest(metrics.registry)) * 1000:7.1f} ms"
    )
    print(f"  replies by status over all time (not scraped):  {best_of(all_time) * 1000:7.1f} ms")
    everything = ExportFilter(since=now - timedelta(days=31), until=now + timedelta(days=1))
    for fmt in ("csv", "jsonl"):
        started = time.perf_counter()
        size = sum(len(chunk) for chunk in export_chunks(engine, everything, fmt))
        took = time.perf_counter() - started
        print(
            f"  export {fmt:5}: {args.messages:,} rows in {took:5.2f} s ({args.messages / took:,.0f} rows/s, {size / 1e6:.0f} MB)"
        )
    engine.dispose()


if __name__ == "__main__":
    main()
