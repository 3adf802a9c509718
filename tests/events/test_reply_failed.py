"""``reply_failed`` reaches the business however a reply ends badly (SQLite and PostgreSQL).

Tencent refusing the send (``send_failed``), a delivery report saying the
handset never got it, pushed, pulled, kept until the send was recorded or found
by the ambiguous-send check (``delivery_failed``), and a reply that could not
go out before its deadline (``expired``): each sends one signed event, queued
in the transaction that recorded it. Without endpoints nothing more is run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from bot.config import Settings
from bot.delivery.outbox import Settlement, claim_due, settle
from bot.delivery.senders import make_sender
from bot.events.endpoints import ALL_KINDS, Endpoint, EventEndpoints
from bot.events.signing import verify
from bot.ingest.batch import handle_batch
from bot.ingest.delivery_reports import apply_reports
from bot.numbers import CHINA
from bot.rules.loader import load_rules
from bot.sms import Inbound, OutboundSms, SendResult
from bot.store.db import WRITE_OPTIONS
from bot.store.models import events, messages, outbox
from bot.tencent.callbacks import parse_status_callback
from tests.fakes.receiver import Receiver
from tests.fakes.tencent_sms import FakeTencentSms, FrequencyLimits
from tests.support import (
    REPO,
    FakeClock,
    Harness,
    RecordingSender,
    delivery_report,
    rows,
    serve_process,
    tencent_settings,
    wait_until,
)

SECRET = "whsec_reply_failed"
TEMPLATES = {
    "1490001": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
    "1490002": "Order {1}: {2}.",
    "1490007": "You will get no more messages from us. Reply START to rejoin.",
}
EVENING = datetime(2026, 1, 5, 23, 0, tzinfo=CHINA).astimezone(UTC)
MORNING = datetime(2026, 1, 5, 10, 0, tzinfo=CHINA).astimezone(UTC)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("SMSBOT_EVENT_SECRET_CRM", SECRET)
    r = Receiver()
    yield r
    r.close()


def crm(receiver: Receiver) -> dict[str, Any]:
    """The ``events`` setting: one endpoint, ``crm``, wanting only ``reply_failed`` (nothing else in the way)."""
    return {"crm": {"url": receiver.url + "/hooks", "kinds": ["reply_failed"]}}


def with_events(receiver: Receiver) -> Settings:
    return Settings(events=crm(receiver))


def arrived(receiver: Receiver, n: int = 1) -> list[dict[str, Any]]:
    """The first ``n`` events the receiver got (waiting for them), each checked to be signed with our secret."""
    wait_until(lambda: len(receiver.received) >= n, timeout=15, what=f"{n} reply_failed event(s)")
    got = receiver.received
    for r in got:
        assert verify(SECRET, r.headers, r.body)
        assert r.headers["X-Smsbot-Event"] == "reply_failed"
    return [r.json() for r in got]


def queued(engine: Engine) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in rows(engine, events) if r["kind"] == "reply_failed"]


def post_status(h: Harness, items: list[dict[str, Any]]) -> None:
    response = h.client.post("/sms/status", json=items)
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- delivery reports


def test_a_failed_delivery_report_sends_reply_failed_once_with_tencents_error(
    make_app: Callable[..., Harness], db_url: str, receiver: Receiver
) -> None:
    h = make_app(db_url, settings=with_events(receiver))
    h.say("hi")
    h.say("hi", mobile="13900000000")
    failed, delivered = sorted(h.wait_settled(), key=lambda r: r["contact_id"])
    assert queued(h.engine) == []  # sent is not failed
    report = delivery_report(failed["provider_serial"], "FAIL")
    post_status(h, [report, delivery_report(delivered["provider_serial"])])
    post_status(h, [report])  # Tencent calls again (it got no answer in time): the reply already failed

    [event] = arrived(receiver)
    assert event["type"] == "reply_failed"
    assert event["reason"] == "delivery_failed"
    assert (event["error_code"], event["error_message"]) == ("MK:0001", "空号")
    assert event["message_id"] == failed["id"]
    assert event["text"] == failed["text"]
    assert event["in_reply_to_id"] == failed["in_reply_to_id"]
    assert event["mobile"] == "13800000000"
    assert event["signature"] == "Acme Shop"
    assert len(queued(h.engine)) == 1


def test_a_report_kept_until_its_send_is_recorded_sends_reply_failed_then(engine: Engine) -> None:
    """A report that overtakes the send's own answer is applied when the send is recorded, and so is its event."""
    endpoints = crm_endpoints()
    out_id = one_reply(engine)
    apply(engine, [delivery_report("5000:early", "FAIL")], endpoints)  # no reply has this serial yet: kept
    assert queued(engine) == []
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        settle(conn, [Settlement(0, out_id, "sent", serial="5000:early", sent_at=NOW)], NOW, endpoints)
    [event] = queued(engine)
    assert (event["message_id"], event["reason"], event["error_code"]) == (out_id, "delivery_failed", "MK:0001")


def test_a_pulled_failed_send_status_sends_reply_failed(
    make_app: Callable[..., Harness],
    db_url: str,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SMSBOT_PULL_UNSTORED_FILE", str(tmp_path / "unstored.jsonl"))
    with FakeTencentSms(
        secret_id="AKIDpull",
        secret_key="pull-key",
        templates=TEMPLATES,
        signatures={"Acme Shop"},
        report_sends=False,
        limits=FrequencyLimits.disabled(),
    ) as fake:
        settings = tencent_settings(fake, pull=True, pull_interval=0.05, events=crm(receiver))
        h = make_app(db_url, settings=settings, sender=make_sender(settings))
        h.say("hi")
        [reply] = h.wait_settled()
        [send] = fake.sends
        fake.enqueue_send_status(send, status="FAIL", description="用户关机")
        [event] = arrived(receiver)
    assert (event["message_id"], event["reason"], event["error_message"]) == (
        reply["id"],
        "delivery_failed",
        "用户关机",
    )


def test_the_writer_process_sends_reply_failed_for_a_failed_report(
    db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    env = {
        "SMSBOT_EVENTS": json.dumps(crm(receiver)),
        "SMSBOT_EVENT_SECRET_CRM": SECRET,
    }
    with serve_process(db_url, tmp_path, env=env) as server:
        server.say("hi")
        server.wait_settled()
        [reply] = rows(server.engine, messages, messages.c.direction == "out")
        report = delivery_report(reply["provider_serial"], "FAIL")
        response = httpx.post(f"{server.base}/sms/status", json=[report], timeout=10)
        assert response.status_code == 200, response.text
        [event] = arrived(receiver)
    assert (event["message_id"], event["reason"], event["error_code"]) == (reply["id"], "delivery_failed", "MK:0001")


# ---------------------------------------------------------------- sends refused, ambiguous sends, deadlines


class RefusingSender(RecordingSender):
    """Tencent refuses every send for good: the number is not a phone number."""

    def send(self, sms: OutboundSms) -> SendResult:
        return SendResult(ok=False, code="InvalidParameterValue.IncorrectPhoneNumber", message="bad number")


def test_a_send_refused_for_good_sends_reply_failed_with_reason_send_failed(
    make_app: Callable[..., Harness], db_url: str, receiver: Receiver
) -> None:
    h = make_app(db_url, settings=with_events(receiver), sender=RefusingSender())
    h.say("hi")
    [reply] = h.wait_settled()
    assert reply["status"] == "failed"
    [event] = arrived(receiver)
    assert (event["message_id"], event["reason"]) == (reply["id"], "send_failed")
    assert (event["error_code"], event["error_message"]) == ("InvalidParameterValue.IncorrectPhoneNumber", "bad number")


def test_an_ambiguous_send_tencent_lists_as_failed_sends_reply_failed(
    make_app: Callable[..., Harness], db_url: str, receiver: Receiver, clock: FakeClock
) -> None:
    with FakeTencentSms(
        secret_id="AKIDambiguous",
        secret_key="ambiguous-key",
        templates=TEMPLATES,
        signatures={"Acme Shop"},
        limits=FrequencyLimits.disabled(),
        clock=lambda: clock().timestamp(),
    ) as fake:
        fake.echo_session_context = True
        settings = tencent_settings(fake, tencent_timeout=1, events=crm(receiver))
        h = make_app(db_url, settings=settings, sender=make_sender(settings))
        fake.disconnect(after_processing=True)  # Tencent takes the send; its answer never comes
        h.say("hi")
        [reply] = wait_until(
            lambda: [r for r in h.outbound() if r["status"] == "ambiguous"], timeout=10, what="an ambiguous send"
        )
        assert queued(h.engine) == []  # it may have gone out: not a failure yet
        [send] = fake.sends
        fake.set_send_status(send, "FAIL", description="空号")
        h.clock.advance(timedelta(minutes=10))
        reconciler = h.app.state.runtime.pipeline.deliverer.reconciler
        assert h.client.portal is not None
        h.client.portal.call(reconciler.check_due)
        [event] = arrived(receiver)
    assert (event["message_id"], event["reason"]) == (reply["id"], "delivery_failed")
    assert (event["error_code"], event["error_message"]) == ("FAIL", "空号")


def test_a_reply_held_past_its_deadline_sends_reply_failed_with_reason_expired(
    make_app: Callable[..., Harness], db_url: str, receiver: Receiver, rules_dir: Path
) -> None:
    shop = rules_dir / "acme-shop.yaml"
    text = shop.read_text(encoding="utf-8")
    marked = text.replace('menu:     {id: "1490001",', 'menu:     {marketing: true, id: "1490001",')
    assert marked != text
    shop.write_text(marked, encoding="utf-8")
    h = make_app(db_url, settings=with_events(receiver), app_clock=FakeClock(EVENING))
    h.say("hi")
    [reply] = h.wait_settled()
    assert reply["status"] == "expired"
    [event] = arrived(receiver)
    assert (event["message_id"], event["reason"], event["error_code"]) == (reply["id"], "expired", None)
    assert "marketing SMS go out only 08:00-22:00 China time" in event["error_message"]
    assert event["error_message"] == reply["status_reason"]
    assert h.sender.sent == []


def test_a_retry_past_the_deadline_sends_reply_failed_with_reason_expired(
    make_app: Callable[..., Harness], db_url: str, receiver: Receiver
) -> None:
    with FakeTencentSms(
        secret_id="AKIDexpired",
        secret_key="expired-key",
        templates=TEMPLATES,
        signatures={"Acme Shop"},
        limits=FrequencyLimits.disabled(),
    ) as fake:
        fake.fail_number("+8613800000000", "LimitExceeded.PhoneNumberDailyLimit")
        settings = tencent_settings(fake, tencent_timeout=2, events=crm(receiver))
        h = make_app(db_url, settings=settings, sender=make_sender(settings), app_clock=FakeClock(MORNING))
        h.say("hi")
        [reply] = h.wait_settled(timeout=10)
        assert reply["status"] == "expired"
        [event] = arrived(receiver)
    assert (event["message_id"], event["reason"]) == (reply["id"], "expired")
    assert event["error_code"] == "LimitExceeded.PhoneNumberDailyLimit"
    assert "past the reply's deadline" in event["error_message"]


# ---------------------------------------------------------------- no endpoints: nothing more runs

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


def crm_endpoints(kinds: frozenset[str] = ALL_KINDS) -> EventEndpoints:
    return EventEndpoints((Endpoint("crm", "http://127.0.0.1:9/hooks", kinds, SECRET.encode()),))


def one_reply(engine: Engine, mobile: str = "13800000000", serial: str | None = None) -> int:
    """'hi' from a customer, its reply 'menu' queued (status left ``queued``); the reply's id."""
    ruleset = load_rules(REPO / "rules").ruleset
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        handle_batch(conn, ruleset=ruleset, batch=[Inbound("86", mobile, "Acme Shop", "hi", 1767578400)], now=NOW)
        out_id = conn.execute(
            select(messages.c.id).where(messages.c.direction == "out").order_by(messages.c.id.desc()).limit(1)
        ).scalar_one_or_none()
        assert out_id is not None
        if serial is not None:  # sent: out of the outbox, with Tencent's serial
            conn.execute(messages.update().where(messages.c.id == out_id).values(status="sent", provider_serial=serial))
            conn.execute(outbox.delete().where(outbox.c.message_id == out_id))
    return int(out_id)


def apply(engine: Engine, items: list[dict[str, Any]], endpoints: EventEndpoints | None) -> None:
    reports = parse_status_callback(json.dumps(items, ensure_ascii=False).encode())
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        apply_reports(conn, reports, now=NOW, events=endpoints)


def test_without_an_endpoint_for_reply_failed_reports_and_expiry_run_no_more_statements(tmp_path: Path) -> None:
    from bot.store.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    engine = make_engine(url)

    def statements(endpoints: EventEndpoints | None, mobile: str) -> list[str]:
        """What a failed report and an expiry at claim time run: a reply per step, on a number of its own."""
        reported = one_reply(engine, mobile, serial=f"5000:{mobile}")
        expiring = one_reply(engine, mobile[:-1] + "9")
        seen: list[str] = []
        with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
            raw = conn.connection.driver_connection
            raw.set_trace_callback(seen.append)  # type: ignore[union-attr]
            try:
                reports = parse_status_callback(json.dumps([delivery_report(f"5000:{mobile}", "FAIL")]).encode())
                apply_reports(conn, reports, now=NOW, events=endpoints)
                claim_due(conn, now=NOW + timedelta(days=1), limit=10, owner="test", events=endpoints)
            finally:
                raw.set_trace_callback(None)  # type: ignore[union-attr]
        [reported_row] = rows(engine, messages, messages.c.id == reported)
        [expired_row] = rows(engine, messages, messages.c.id == expiring)
        assert (reported_row["status"], expired_row["status"]) == ("failed", "expired")
        return [s for s in seen if not s.startswith(("BEGIN", "COMMIT"))]

    try:
        without = statements(None, "13800000010")
        empty = statements(EventEndpoints(), "13800000020")
        other_kinds = statements(crm_endpoints(frozenset({"opted_out"})), "13800000030")
        assert len(without) == len(empty) == len(other_kinds)
        assert not any("events" in s.split("FROM")[0] or "INTO events" in s for s in without + empty + other_kinds)
        assert queued(engine) == []
        wanted = statements(crm_endpoints(), "13800000040")
        assert len(wanted) > len(without)
        assert sorted(e["reason"] for e in queued(engine)) == ["delivery_failed", "expired"]
    finally:
        engine.dispose()
