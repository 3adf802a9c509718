"""Replay throughput and memory: ``bot.replay.replay`` over 1,000,000 stored inbound messages.

Issue 14's target: at least 20,000 messages/s on SQLite on this 2-core machine, memory flat (streamed).
For each database this script:

1. makes a fresh database (a new SQLite file, or the PostgreSQL database of ``--postgres-url``
   with its ``public`` schema dropped and recreated) and runs the migrations;
2. seeds ``--count`` inbound messages (default 1,000,000) straight into the tables (one
   ``executemany`` transaction on SQLite, ``COPY`` on PostgreSQL): conversations of 1 to 7
   messages (4 on average), texts from the example rules' keywords plus free text and receipt
   codes, each row with the rule, states and reply the example rules give it (decided once per
   (state, text) by the real engine), and the reply rows ``in_reply_to`` it, as production stores them;
3. (in this process; the seeding ran in a child) replays every message with a candidate ruleset (the example rules with the menu's "2" answering
   other hours and "3" going back to idle), printing messages/s and memory at 10, 25, 50, 75 and
   100 %: the peak RSS so far (``resource.getrusage``) and the current RSS (``/proc/self/statm``).

Run it with ``.venv/bin/python bench/bench_replay.py [--count 1000000] [--databases sqlite,postgres]
[--postgres-url URL]``; the URL defaults to ``$SMSBOT_BENCH_POSTGRES_URL``, else ``test_replay_bench`` on
the local server (a database the benchmark may wipe). Exit status 1 when SQLite misses the target.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine

from bot.replay import replay
from bot.rules.compiler import compile_file
from bot.rules.engine import decide
from bot.rules.loader import load_rules
from bot.rules.model import Conversation, InboundMessage, Ruleset
from bot.store.db import make_engine, upgrade

TARGET = 20_000
REPO = Path(__file__).resolve().parent.parent
SIGN = "Acme Shop"
START = datetime(2026, 3, 1, tzinfo=UTC)
TEXTS = ["hi", "1", "2", "3", "123456", "MENU", "菜单", "TD", "START", "help", "order", "thanks!", "where is my parcel"]
WEIGHTS = [20, 14, 10, 8, 6, 8, 4, 3, 2, 3, 3, 10, 9]
COLUMNS = (
    "id, direction, conversation_id, contact_id, signature, text, normalized_text, in_reply_to_id, rule, rule_kind,"
    " unmatched, state_before, state_after, template_name, template_id, params, segments, status, marketing,"
    " created_at, updated_at"
)


def rss_mib() -> tuple[float, float]:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


def candidate() -> Ruleset:
    source = (REPO / "rules" / "acme-shop.yaml").read_text(encoding="utf-8")
    source = source.replace('params: ["9:00", "18:00"]', 'params: ["8:00", "20:00"]')
    source = source.replace(
        "        reply: ask_code\n        goto: code\n", "        reply: ask_code\n        goto: idle\n"
    )
    result = compile_file(source, path="acme-shop.yaml", name="acme-shop.yaml")
    assert result.compiled is not None
    return Ruleset.of((result.compiled,))


def rows(count: int, postgres: bool) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Contacts, conversations and messages (in and out) for ``count`` inbound messages."""
    loaded = load_rules(REPO / "rules")
    assert loaded.ruleset is not None
    live = loaded.ruleset
    rng = random.Random(14)
    memo: dict[tuple[str | None, str], Any] = {}
    contacts: list[tuple[Any, ...]] = []
    convos: list[tuple[Any, ...]] = []
    messages: list[tuple[Any, ...]] = []

    def ts(moment: datetime) -> Any:
        return moment if postgres else moment.replace(tzinfo=None).isoformat(" ", "microseconds")

    made = 0
    message_id = 0
    conversation = 0
    while made < count:
        conversation += 1
        mobile = f"139{conversation:08d}"
        contacts.append((conversation, "86", mobile, ts(START)))
        state: str | None = None
        at = START + timedelta(seconds=conversation % 86400 * 7)
        for _ in range(min(rng.randint(1, 7), count - made)):
            text = rng.choices(TEXTS, WEIGHTS)[0]
            key = (state, text)
            if key not in memo:
                d = decide(live, Conversation(state=state), InboundMessage(text=text, sign=SIGN, mobile=mobile), at)
                memo[key] = d
            d = memo[key]
            message_id += 1
            inbound = message_id
            messages.append(
                (
                    inbound,
                    "in",
                    conversation,
                    conversation,
                    SIGN,
                    text,
                    d.normalized_text,
                    None,
                    d.rule,
                    d.rule_kind,
                    d.unmatched,
                    state,
                    d.state,
                    None,
                    None,
                    None,
                    None,
                    "received",
                    False,
                    ts(at),
                    ts(at),
                )
            )
            for reply in d.replies:
                message_id += 1
                messages.append(
                    (
                        message_id,
                        "out",
                        conversation,
                        conversation,
                        SIGN,
                        reply.text,
                        None,
                        inbound,
                        d.rule,
                        d.rule_kind,
                        False,
                        state,
                        d.state,
                        reply.template,
                        reply.template_id,
                        json.dumps(list(reply.params)),
                        reply.segments,
                        "delivered",
                        False,
                        ts(at),
                        ts(at),
                    )
                )
            state = d.state
            made += 1
            at += timedelta(seconds=rng.randint(5, 600))
        convos.append((conversation, SIGN, conversation, state, "{}", False, ts(at), ts(at)))
    if not postgres:
        messages = [(*m[:10], int(m[10]), *m[11:18], int(m[18]), *m[19:]) for m in messages]
        convos = [(*c[:5], int(c[5]), *c[6:]) for c in convos]
    return contacts, convos, messages


def seed(url: str, count: int) -> int:
    postgres = url.startswith("postgresql")
    contacts, convos, messages = rows(count, postgres)
    engine = make_engine(url)
    with engine.begin() as conn:
        raw: Any = conn.connection.driver_connection
        cursor = raw.cursor()
        if postgres:
            with cursor.copy("COPY contacts (id, nationcode, mobile, created_at) FROM STDIN") as copy:
                for row in contacts:
                    copy.write_row(row)
            with cursor.copy(
                "COPY conversations (id, signature, contact_id, state, variables, opted_out, created_at, updated_at)"
                " FROM STDIN"
            ) as copy:
                for row in convos:
                    copy.write_row(row)
            with cursor.copy(f"COPY messages ({COLUMNS}) FROM STDIN") as copy:
                for row in messages:
                    copy.write_row(row)
            for table in ("contacts", "conversations", "messages"):
                cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        else:
            cursor.executemany(
                "INSERT INTO contacts (id, nationcode, mobile, created_at) VALUES (?, ?, ?, ?)", contacts
            )
            cursor.executemany(
                "INSERT INTO conversations (id, signature, contact_id, state, variables, opted_out, created_at,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                convos,
            )
            cursor.executemany(f"INSERT INTO messages ({COLUMNS}) VALUES ({', '.join('?' * 21)})", messages)
    if postgres:
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return len(messages)


def bench(name: str, url: str, count: int) -> float:
    started = time.perf_counter()
    # Seeded in a child process, so this process's memory is the replay's alone.
    with multiprocessing.get_context("fork").Pool(1) as pool:
        stored = pool.apply(seed, (url, count))
    print(
        f"{name}: seeded {count:,} inbound messages ({stored:,} rows with the replies) in "
        f"{time.perf_counter() - started:.1f}s",
        flush=True,
    )
    rules = candidate()
    engine = make_engine(url)
    marks = [int(count * p) for p in (0.10, 0.25, 0.50, 0.75)]
    begin = time.perf_counter()

    def progress(done: int) -> None:
        while marks and done >= marks[0]:
            marks.pop(0)
            peak, current = rss_mib()
            rate = done / (time.perf_counter() - begin)
            print(
                f"  {done:>9,} replayed: {rate:>8,.0f} messages/s, peak RSS {peak:.0f} MiB, RSS now {current:.0f} MiB",
                flush=True,
            )

    with engine.connect() as conn:
        report = replay(conn, rules, START - timedelta(days=1), progress=progress)
    seconds = time.perf_counter() - begin
    engine.dispose()
    rate = report.messages / seconds
    peak, current = rss_mib()
    print(
        f"  {report.messages:>9,} replayed: {rate:>8,.0f} messages/s, peak RSS {peak:.0f} MiB, RSS now {current:.0f} MiB"
        f" ({seconds:.1f}s; {report.conversations:,} conversations, {report.replies_changed:,} replies and"
        f" {report.states_changed:,} states would change)",
        flush=True,
    )
    assert report.messages == count, (report.messages, count)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000, help="inbound messages to seed and replay")
    parser.add_argument("--databases", default="sqlite", help="comma-separated: sqlite, postgres")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "SMSBOT_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test_replay_bench"
        ),
    )
    args = parser.parse_args()
    print(
        f"bench_replay: {platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} cores, "
        f"{args.count:,} messages",
        flush=True,
    )
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.databases.split(","):
            if name == "sqlite":
                url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            elif name == "postgres":
                url = args.postgres_url
                admin = create_engine(url, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    conn.exec_driver_sql("DROP SCHEMA public CASCADE")
                    conn.exec_driver_sql("CREATE SCHEMA public")
                admin.dispose()
            else:
                parser.error(f"unknown database {name!r}")
            upgrade(url)
            rates[name] = bench(name, url, args.count)
    if "sqlite" in rates:
        met = rates["sqlite"] >= TARGET
        print(f"SQLite: {rates['sqlite']:,.0f} messages/s, target {TARGET:,}: {'met' if met else 'NOT met'}")
        return 0 if met else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
