"""Tencent's delivery-status callback: parsing, and replies marked delivered or failed (SQLite and Postgres)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, select

from bot.delivery.outbox import Settlement, settle
from bot.ingest.batch import handle_batch
from bot.ingest.delivery_reports import apply_reports
from bot.rules.loader import load_rules
from bot.sms import Inbound
from bot.store.db import WRITE_OPTIONS
from bot.store.models import messages, pending_reports
from bot.tencent.callbacks import BadReport, parse_status_callback, read_status_callback
from bot.tencent.session_context import SessionContexts
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


CONTEXTS = SessionContexts(b"this deployment's key")


def apply(engine: Engine, body: object) -> tuple[int, list[str]]:
    reports = parse_status_callback(json.dumps(body, ensure_ascii=False).encode())
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        outcome = apply_reports(conn, reports, now=NOW, contexts=CONTEXTS)
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


def test_report_matched_by_our_session_context_when_the_serial_is_unknown(engine: Engine) -> None:
    out_id = one_reply(engine, None)
    assert apply(engine, [delivery_report("5000:77", ext=CONTEXTS.context_for(out_id))]) == (1, [])
    row = reply_row(engine, out_id)
    assert (row["status"], row["provider_serial"]) == ("delivered", "5000:77")


@pytest.mark.parametrize(
    "context",
    [
        "{id}",  # another system's numeric context on the same SmsSdkAppId
        "smsbot:{id}",
        "smsbot:{id}:0000000000000000",  # a guessed tag
        "{ours_for_another}",  # our marker, but for another reply: the id was edited
    ],
)
def test_a_context_that_is_not_our_marker_never_marks_a_reply(engine: Engine, context: str) -> None:
    out_id = one_reply(engine, None)
    forged = CONTEXTS.context_for(out_id + 1).replace(f":{out_id + 1}:", f":{out_id}:")
    ext = context.format(id=out_id, ours_for_another=forged)
    assert apply(engine, [delivery_report("5000:77", ext=ext)]) == (0, ["5000:77"])
    assert reply_row(engine, out_id)["status"] == "sent"


def test_the_serial_is_matched_before_any_context(engine: Engine) -> None:
    first = one_reply(engine, "5000:1")
    assert apply(engine, [delivery_report("5000:1", ext=CONTEXTS.context_for(first + 99))]) == (1, [])
    assert reply_row(engine, first)["status"] == "delivered"


def test_a_marker_from_another_key_is_not_ours(engine: Engine) -> None:
    out_id = one_reply(engine, None)
    theirs = SessionContexts(b"another deployment").context_for(out_id)
    assert apply(engine, [delivery_report("5000:77", ext=theirs)]) == (0, ["5000:77"])


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
    ],
)
def test_unreadable_bodies_are_refused_naming_the_problem(body: bytes, words: str) -> None:
    with pytest.raises(BadReport) as caught:
        parse_status_callback(body)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ({"report_status": "SUCCESS"}, "field '[1].sid'"),
        (delivery_report("s", "MAYBE"), "field '[1].report_status'"),
        (delivery_report("s", user_receive_time="yesterday"), "field '[1].user_receive_time'"),
        (1, "[1]: expected a JSON object, got int"),
        ("SUCCESS", "[1]: expected a JSON object, got str"),
    ],
)
def test_an_unusable_item_is_skipped_naming_the_problem_and_the_others_kept(item: object, words: str) -> None:
    body = json.dumps([delivery_report("5000:1"), item, delivery_report("5000:2", "FAIL")]).encode()
    reports, skipped = read_status_callback(body)
    assert [(r.sid, r.report_status) for r in reports] == [("5000:1", "SUCCESS"), ("5000:2", "FAIL")]
    [why] = skipped
    assert (why.where, why.item) == ("[1]", item)
    assert words in why.reason


@pytest.mark.parametrize(
    ("changes", "status", "ext"),
    [
        ({"report_status": "success"}, "SUCCESS", None),
        ({"report_status": " Fail "}, "FAIL", None),
        ({"ext": 12345}, "SUCCESS", "12345"),
        ({"ext": {"campaign": 7}}, "SUCCESS", None),
        ({"ext": ["a"]}, "SUCCESS", None),
        ({"ext": None}, "SUCCESS", None),
        ({"ext": True}, "SUCCESS", None),
        ({"something_new": {"from": "tencent"}, "errmsg": 7}, "SUCCESS", None),
    ],
)
def test_odd_but_usable_items_are_read(changes: dict[str, object], status: str, ext: str | None) -> None:
    item = {**delivery_report("5000:1"), **changes}
    reports, skipped = read_status_callback(json.dumps([item]).encode())
    assert skipped == []
    [report] = reports
    assert (report.sid, report.report_status, report.ext) == ("5000:1", status, ext)


def test_odd_items_in_a_batch_never_stop_the_good_ones_being_applied(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    out_id = one_reply(engine, "5000:1")
    body = [{"sid": 5, "report_status": "SUCCESS", "mobile": "13912345678"}, {**delivery_report("5000:1"), "x": 1}]
    with caplog.at_level("WARNING", logger="smsbot.reports"):
        assert apply(engine, body) == (1, [])
    assert reply_row(engine, out_id)["status"] == "delivered"
    assert any("delivery report [0] skipped" in r.getMessage() for r in caplog.records)


def test_a_single_object_is_accepted_too() -> None:
    [parsed] = parse_status_callback(json.dumps(delivery_report("5000:9")).encode())
    assert (parsed.sid, parsed.report_status) == ("5000:9", "SUCCESS")


def test_a_report_that_overtakes_the_sends_own_answer_is_applied_when_the_send_is_recorded(engine: Engine) -> None:
    """Tencent's report can arrive before our record of the send commits: it must not be lost as unknown."""
    out_id = one_reply(engine, None)
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        conn.execute(messages.update().where(messages.c.id == out_id).values(status="queued"))
    assert apply(engine, [delivery_report("5000:early", "FAIL")]) == (0, ["5000:early"])
    assert reply_row(engine, out_id)["status"] == "queued"
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        settle(conn, [Settlement(0, out_id, "sent", serial="5000:early", sent_at=NOW)], NOW)
    row = reply_row(engine, out_id)
    assert (row["status"], row["provider_serial"], row["error_code"]) == ("failed", "5000:early", "MK:0001")
    with engine.connect() as conn:
        assert conn.execute(select(pending_reports)).all() == []  # taken, not kept forever


def test_reports_kept_for_unknown_serials_are_pruned_after_a_few_days(engine: Engine) -> None:
    apply(engine, [delivery_report("5000:never")])
    later = NOW + timedelta(days=4)
    with engine.connect().execution_options(**WRITE_OPTIONS) as conn, conn.begin():
        apply_reports(conn, parse_status_callback(json.dumps([delivery_report("5000:other")]).encode()), now=later)
    with engine.connect() as conn:
        assert [r.sid for r in conn.execute(select(pending_reports))] == ["5000:other"]
