"""Tencent's delivery-status callback: parsing, and replies marked delivered or failed (SQLite and Postgres)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine, select

from bot.ingest.batch import handle_batch
from bot.ingest.delivery_reports import apply_reports
from bot.rules.loader import load_rules
from bot.sms import Inbound
from bot.store.db import WRITE_OPTIONS
from bot.store.models import messages
from bot.tencent.callbacks import BadReport, parse_status_callback
from tests.support import REPO, delivery_report

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


def one_reply(engine: Engine, serial: str | None) -> int:
    """Store 'hi' from a customer (queued reply 'menu'); give the reply a Tencent serial; return its id."""
    ruleset = load_rules(REPO / "rules").ruleset
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        handle_batch(
            conn, ruleset=ruleset, batch=[Inbound("86", "13800000000", "Acme Shop", "hi", 1767578400)], now=NOW
        )
        out_id = conn.execute(select(messages.c.id).where(messages.c.direction == "out")).scalar_one()
        conn.execute(messages.update().where(messages.c.id == out_id).values(status="sent", provider_serial=serial))
    return int(out_id)


def reply_row(engine: Engine, out_id: int) -> dict[str, object]:
    with engine.connect() as conn:
        return dict(conn.execute(select(messages).where(messages.c.id == out_id)).mappings().one())


def apply(engine: Engine, body: object) -> tuple[int, list[str]]:
    reports = parse_status_callback(json.dumps(body, ensure_ascii=False).encode())
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        outcome = apply_reports(conn, reports, now=NOW)
    return outcome.updated, outcome.unknown


def test_success_report_marks_the_reply_delivered_with_the_handset_time(engine: Engine) -> None:
    out_id = one_reply(engine, "5000:1045710669157053657849499619")
    assert apply(engine, [delivery_report("5000:1045710669157053657849499619")]) == (1, [])
    row = reply_row(engine, out_id)
    assert row["status"] == "delivered"
    assert row["delivered_at"] == datetime(2026, 1, 5, 2, 0, 7, tzinfo=UTC)  # 10:00:07 China time


def test_fail_report_marks_it_failed_with_tencents_code_and_text(engine: Engine) -> None:
    out_id = one_reply(engine, "5000:1")
    assert apply(engine, [delivery_report("5000:1", "FAIL")]) == (1, [])
    row = reply_row(engine, out_id)
    assert (row["status"], row["error_code"], row["error_message"]) == ("failed", "MK:0001", "空号")


def test_report_matched_by_session_context_when_the_serial_is_unknown(engine: Engine) -> None:
    out_id = one_reply(engine, None)
    assert apply(engine, [delivery_report("5000:77", ext=str(out_id))]) == (1, [])
    row = reply_row(engine, out_id)
    assert (row["status"], row["provider_serial"]) == ("delivered", "5000:77")


def test_unknown_sids_are_reported_not_refused(engine: Engine) -> None:
    out_id = one_reply(engine, "5000:1")
    assert apply(engine, [delivery_report("5000:nope"), delivery_report("5000:1")]) == (1, ["5000:nope"])
    assert reply_row(engine, out_id)["status"] == "delivered"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b"[]", "empty"),
        (json.dumps([delivery_report(f"s{i}") for i in range(101)]).encode(), "at most 100"),
        (json.dumps([{"report_status": "SUCCESS"}]).encode(), "field '[0].sid'"),
        (json.dumps([delivery_report("s", "MAYBE")]).encode(), "field '[0].report_status'"),
        (json.dumps([delivery_report("s", user_receive_time="yesterday")]).encode(), "user_receive_time"),
        (json.dumps([1]).encode(), "[0]: expected a JSON object"),
    ],
)
def test_bad_bodies_are_refused_naming_the_problem(body: bytes, words: str) -> None:
    with pytest.raises(BadReport) as caught:
        parse_status_callback(body)
    assert words in str(caught.value)


def test_a_single_object_is_accepted_too() -> None:
    [parsed] = parse_status_callback(json.dumps(delivery_report("5000:9")).encode())
    assert (parsed.sid, parsed.report_status) == ("5000:9", "SUCCESS")
