"""Events out: queued with their cause, signed, in order per conversation, retried for 24 hours."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from bot.config import ConfigError, Settings, load_settings
from bot.events.dispatcher import EventDispatcher, backoff
from bot.events.endpoints import Endpoint, EventEndpoints, config_endpoints
from bot.events.signing import verify
from bot.ingest.batch import handle_batch
from bot.rules.model import Ruleset
from bot.sms import Inbound
from bot.store.models import events
from bot.store.writer import DbWriter
from tests.fakes.receiver import Receiver
from tests.support import FakeClock, compile_text, rows, writing

SECRET = "whsec_test"
RULES = """
signature: Acme
templates:
  menu: {id: "1", text: "Reply 1 or TD."}
  bye: {id: "2", text: "Bye."}
opt_out: {keywords: [TD], reply: bye}
start: idle
states:
  idle:
    on:
      - keywords: [HI]
        reply: menu
        goto: menu
  menu:
    on:
      - keywords: ["1"]
        reply: menu
        goto: idle
"""


@pytest.fixture
def ruleset() -> Ruleset:
    return Ruleset.of((compile_text(RULES, "acme.yaml"),))


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def endpoints_for(receiver: Receiver, kinds: frozenset[str] | None = None) -> EventEndpoints:
    from bot.events.endpoints import ALL_KINDS

    endpoint = Endpoint("crm", receiver.url + "/hooks", kinds or ALL_KINDS, SECRET.encode())
    return EventEndpoints((endpoint,))


def say(
    engine: Engine,
    ruleset: Ruleset,
    clock: FakeClock,
    texts: list[str],
    endpoints: EventEndpoints | None,
    mobile: str = "13800000001",
) -> None:
    base = int(clock().timestamp())
    with writing(engine) as conn:
        batch = [Inbound("86", mobile, "Acme", t, base + i) for i, t in enumerate(texts)]
        handle_batch(conn, ruleset=ruleset, batch=batch, now=clock(), events=endpoints)


def run(coro_fn: object) -> None:
    asyncio.run(coro_fn)  # type: ignore[arg-type]


@pytest.fixture
def writer(engine: Engine) -> Iterator[DbWriter]:
    w = DbWriter(engine)
    w.start()
    yield w
    w.stop()


def test_events_are_queued_with_their_cause_and_arrive_signed(
    engine: Engine, ruleset: Ruleset, receiver: Receiver, writer: DbWriter
) -> None:
    clock = FakeClock()
    endpoints = endpoints_for(receiver)
    say(engine, ruleset, clock, ["HI", "what?", "TD"], endpoints)
    queued = rows(engine, events)
    assert [r["kind"] for r in queued] == ["state_entered", "unmatched", "opted_out", "state_entered"]
    assert {r["status"] for r in queued} == {"pending"}

    dispatcher = EventDispatcher(writer, lambda: endpoints, clock=clock)
    total = 0

    async def drain() -> None:
        nonlocal total
        total = await dispatcher.drain()
        await dispatcher.close()

    run(drain())
    assert total == 4
    got = receiver.received
    assert [r.json()["type"] for r in got] == ["state_entered", "unmatched", "opted_out", "state_entered"]
    for r in got:
        assert verify(SECRET, r.headers, r.body)
        assert not verify("another secret", r.headers, r.body)
        assert r.headers["X-Smsbot-Event"] == r.json()["type"]
        assert int(r.headers["X-Smsbot-Event-Id"]) == r.json()["id"]
    first = got[0].json()
    assert first["state"] == "menu"
    assert first["signature"] == "Acme"
    assert first["mobile"] == "13800000001"
    assert first["state_before"] is None
    assert first["vars"] == {}
    assert got[1].json()["text"] == "what?"
    # The stored body is exactly what was signed and sent.
    assert [r.body.decode() for r in got] == [r["body"] for r in rows(engine, events)]
    assert {r["status"] for r in rows(engine, events)} == {"delivered"}
    assert all(r["last_status"] == 200 and r["attempts"] == 1 for r in rows(engine, events))


def test_kinds_select_the_events_an_endpoint_gets(engine: Engine, ruleset: Ruleset, receiver: Receiver) -> None:
    clock = FakeClock()
    say(engine, ruleset, clock, ["HI", "what?", "TD"], endpoints_for(receiver, frozenset({"opted_out"})))
    assert [r["kind"] for r in rows(engine, events)] == ["opted_out"]


def test_a_receiver_that_is_down_for_a_while_gets_every_event_in_order_per_conversation(
    engine: Engine, ruleset: Ruleset, receiver: Receiver, writer: DbWriter
) -> None:
    clock = FakeClock()
    endpoints = endpoints_for(receiver)
    for mobile in ("13800000001", "13800000002"):
        say(engine, ruleset, clock, ["HI", "1", "HI", "1"], endpoints, mobile=mobile)
    assert len(rows(engine, events)) == 8
    receiver.status = 503
    dispatcher = EventDispatcher(writer, lambda: endpoints, clock=clock)

    async def scenario() -> None:
        for _ in range(4):  # down: each round tries only each conversation's oldest event
            await dispatcher.drain()
            clock.advance(timedelta(minutes=2))
        receiver.status = 200
        for _ in range(20):
            clock.advance(timedelta(hours=1))
            await dispatcher.drain()
        await dispatcher.close()

    run(scenario())
    failed_tries = [r for r in receiver.received if r.json()["type"]][: 4 * 2]
    assert {r.json()["id"] for r in failed_tries} == {
        min(e["id"] for e in rows(engine, events) if e["conversation_id"] == c)
        for c in {e["conversation_id"] for e in rows(engine, events)}
    }
    stored = rows(engine, events)
    assert {r["status"] for r in stored} == {"delivered"}
    delivered = [r.json() for r in receiver.received[8:]]
    assert sorted(d["id"] for d in delivered) == sorted(r["id"] for r in stored)  # each exactly once after recovery
    for conversation in {r["conversation_id"] for r in stored}:
        ids = [d["id"] for d in delivered if d["conversation_id"] == conversation]
        assert ids == sorted(ids)
    heads = [r for r in stored if r["attempts"] > 1]
    assert len(heads) == 2
    assert all(r["last_status"] == 200 for r in heads)


def test_connection_refused_is_retried_with_backoff(engine: Engine, ruleset: Ruleset, writer: DbWriter) -> None:
    clock = FakeClock()
    closed = Receiver()
    closed.close()  # nothing listens on its port any more
    endpoints = endpoints_for(closed)
    say(engine, ruleset, clock, ["HI"], endpoints)
    dispatcher = EventDispatcher(writer, lambda: endpoints, clock=clock, timeout=1)

    async def once() -> None:
        await dispatcher.drain()
        await dispatcher.close()

    run(once())
    (row,) = rows(engine, events)
    assert row["status"] == "pending"
    assert row["attempts"] == 1
    assert row["last_status"] is None
    assert "Connect" in row["last_error"]
    assert row["next_attempt_at"] == clock() + backoff(1)


def test_after_24_hours_of_failure_an_event_is_failed(
    engine: Engine, ruleset: Ruleset, receiver: Receiver, writer: DbWriter
) -> None:
    clock = FakeClock()
    endpoints = endpoints_for(receiver)
    say(engine, ruleset, clock, ["HI"], endpoints)
    receiver.status = 500
    dispatcher = EventDispatcher(writer, lambda: endpoints, clock=clock)

    async def scenario() -> None:
        for _ in range(40):
            await dispatcher.drain()
            clock.advance(timedelta(hours=1))
        await dispatcher.close()

    run(scenario())
    (row,) = rows(engine, events)
    assert row["status"] == "failed"
    assert row["last_status"] == 500
    assert row["last_error"].startswith("HTTP 500")
    assert 20 < row["attempts"] < 35
    assert len(receiver.received) == row["attempts"]


def test_no_endpoint_means_no_event_rows_and_no_extra_statements(tmp_path: object, ruleset: Ruleset) -> None:
    from bot.store.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    engine = make_engine(url)
    clock = FakeClock()

    def statements(endpoints: EventEndpoints | None, mobile: str) -> list[str]:
        seen: list[str] = []
        with writing(engine) as conn:
            raw = conn.connection.driver_connection
            raw.set_trace_callback(seen.append)  # type: ignore[union-attr]
            try:
                batch = [
                    Inbound("86", mobile, "Acme", t, int(clock().timestamp()) + i)
                    for i, t in enumerate(["HI", "x", "TD"])
                ]
                handle_batch(conn, ruleset=ruleset, batch=batch, now=clock(), events=endpoints)
            finally:
                raw.set_trace_callback(None)  # type: ignore[union-attr]
        return [s for s in seen if not s.startswith(("BEGIN", "COMMIT"))]

    without = statements(None, "13800000001")
    empty = statements(EventEndpoints(), "13800000002")
    closed = Receiver()
    closed.close()
    wants_nothing_here = statements(endpoints_for(closed, frozenset({"reply_failed"})), "13800000003")
    assert len(without) == len(empty) == len(wants_nothing_here)
    assert not any(" events " in s or "('events'" in s for s in without + empty + wants_nothing_here)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(events)).scalar() == 0
    engine.dispose()


def test_config_endpoints_need_their_secret_from_the_environment(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    config = Path(str(tmp_path)) / "config.yaml"
    config.write_text("events:\n  crm-prod:\n    url: https://crm.example.com/hooks\n    kinds: [opted_out]\n")
    with pytest.raises(ConfigError, match="SMSBOT_EVENT_SECRET_CRM_PROD"):
        load_settings(config)
    monkeypatch.setenv("SMSBOT_EVENT_SECRET_CRM_PROD", "s3cret")
    settings = load_settings(config)
    (endpoint,) = config_endpoints(settings.events)
    assert endpoint.name == "crm-prod"
    assert endpoint.kinds == frozenset({"opted_out"})
    assert endpoint.secret == b"s3cret"
    config.write_text("events:\n  crm:\n    url: https://x\n    kinds: [nope]\n")
    with pytest.raises(ConfigError, match="kinds"):
        load_settings(config)
    assert Settings().events == {}


def test_the_body_is_frozen_at_queue_time(engine: Engine, ruleset: Ruleset, receiver: Receiver) -> None:
    clock = FakeClock()
    say(engine, ruleset, clock, ["HI"], endpoints_for(receiver))
    (row,) = rows(engine, events)
    body = json.loads(row["body"])
    assert body["id"] == row["id"]
    assert body["type"] == "state_entered"
    assert body["created_at"] == clock().isoformat()


def test_the_verify_snippet_in_the_docs_accepts_what_the_dispatcher_signs() -> None:
    import re
    import time
    from pathlib import Path

    from bot.events.signing import signed_headers

    text = (Path(__file__).parents[2] / "docs" / "events.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict[str, object] = {}
    exec(snippet, namespace)
    verify_from_docs = namespace["verify"]
    body = b'{"id":1,"type":"opted_out"}'
    headers = signed_headers(b"k", body, kind="opted_out", event_id=1, timestamp=int(time.time()))
    assert verify_from_docs(b"k", headers, body)  # type: ignore[operator]
    assert not verify_from_docs(b"k", headers, body + b" ")  # type: ignore[operator]
    old = signed_headers(b"k", body, kind="opted_out", event_id=1, timestamp=int(time.time()) - 3600)
    assert not verify_from_docs(b"k", old, body)  # type: ignore[operator]
