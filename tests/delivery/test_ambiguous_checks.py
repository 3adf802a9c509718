"""Ambiguous sends settled by asking Tencent (PullSmsSendStatusByPhoneNumber), never by sending again.

Through the real SDK against the fake, whose clock is the app's: a send is
made ambiguous by closing the connection after the fake accepted it, then the
app's clock is moved by hand and a round is run on the app's own event loop
(``check_due``), or left to the delivery loop's own task. SQLite and Postgres.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import RowMapping, insert, update

from bot.config import Settings
from bot.delivery.deliverer import Deliverer, delivery_options
from bot.delivery.reconcile import (
    AmbiguousChecks,
    Reconciler,
    RoundResult,
    ambiguous_checks,
    examine,
)
from bot.delivery.senders import make_sender
from bot.runtime.live_rules import LiveRules
from bot.sms import ConsoleSender
from bot.store.db import make_engine
from bot.store.models import messages, outbox
from bot.store.writer import DbWriter
from bot.tencent.config import session_contexts, sms_client, tencent_config
from bot.tencent.pull import TencentPullClient
from bot.tencent.session_context import SessionContexts
from bot.web.app import create_app
from tests.fakes.tencent_sms import FakeTencentSms, FrequencyLimits, RecordedSend
from tests.support import (
    MOBILE,
    FakeClock,
    Harness,
    copy_rules,
    payload,
    rows,
    tencent_settings,
    wait_until,
    writing,
)

TEMPLATES = {
    "1490001": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
    "1490002": "Order {1}: {2}.",
}
PHONE = f"+86{MOBILE}"
LOOKUP = "PullSmsSendStatusByPhoneNumber"
CHECK_AFTER = timedelta(minutes=5)
INTERVAL = timedelta(minutes=5)


@pytest.fixture
def fake(clock: FakeClock) -> Iterator[FakeTencentSms]:
    """The fake on the app's clock, so a send's time at Tencent is its ``sent_at`` here."""
    with FakeTencentSms(
        secret_id="AKIDambiguous",
        secret_key="ambiguous-key",
        templates=TEMPLATES,
        signatures={"Acme Shop"},
        limits=FrequencyLimits.disabled(),
        clock=lambda: clock().timestamp(),
    ) as server:
        yield server


@pytest.fixture
def start(make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms) -> Callable[..., Harness]:
    """Start the app with the Tencent sender pointed at the fake; ``extra`` are more settings."""

    def factory(**extra: Any) -> Harness:
        settings = tencent_settings(fake, tencent_timeout=1, **extra)
        return make_app(db_url, settings=settings, sender=make_sender(settings))

    return factory


def reconciler(h: Harness) -> Reconciler:
    found: Reconciler | None = h.app.state.runtime.pipeline.deliverer.reconciler
    assert found is not None
    return found


def check_round(h: Harness) -> RoundResult | None:
    """A round now on the app's loop, if one is due (the loop's own task may have just run it: same rows)."""
    assert h.client.portal is not None
    result: RoundResult | None = h.client.portal.call(reconciler(h).check_due)
    return result


def later(h: Harness, delta: timedelta = INTERVAL) -> RoundResult | None:
    h.clock.advance(delta)
    return check_round(h)


def ambiguous(h: Harness, fake: FakeTencentSms, text: str = "hi", *, mobile: str = MOBILE) -> RowMapping:
    """A reply whose SendSms Tencent accepted but whose answer never came: the connection closed after it."""
    fake.disconnect(after_processing=True)
    before = {r["id"] for r in h.outbound()}
    h.say(text, mobile=mobile)
    new: list[RowMapping] = wait_until(
        lambda: [r for r in h.outbound() if r["id"] not in before and r["status"] == "ambiguous"],
        timeout=10,
        what="the reply to be marked ambiguous",
    )
    [reply] = new
    return reply


def lookups(fake: FakeTencentSms) -> list[dict[str, Any]]:
    return [call.params or {} for call in fake.calls if call.action == LOOKUP]


def reply_row(h: Harness, reply: RowMapping) -> RowMapping:
    [row] = h.rows(messages, messages.c.id == reply["id"])
    return row


def send_of(fake: FakeTencentSms, reply: RowMapping, settings: Settings) -> RecordedSend:
    contexts = session_contexts(settings)
    assert contexts is not None
    [send] = [s for s in fake.sends if contexts.message_id(s.session_context) == reply["id"]]
    return send


def foreign_send(fake: FakeTencentSms, *, context: str, phone: str = PHONE) -> RecordedSend:
    """A send by another system on the same SmsSdkAppId, with its own SessionContext."""
    from tencentcloud.sms.v20210111 import models  # type: ignore[import-untyped]

    config = tencent_config(tencent_settings(fake), purpose="send")
    request = models.SendSmsRequest()
    request.PhoneNumberSet = [phone]
    request.SmsSdkAppId = config.sdk_app_id
    request.TemplateId = "1490002"
    request.SignName = "Acme Shop"
    request.TemplateParamSet = ["A-7", "packed"]
    request.SessionContext = context
    [status] = sms_client(config).SendSms(request).SendStatusSet
    [send] = [s for s in fake.sends if s.serial_no == status.SerialNo]
    return send


# ---------------------------------------------------------------- settled from Tencent's status


def test_a_delivered_ambiguous_send_is_settled_by_our_marker_and_never_resent(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    fake.echo_session_context = True  # Tencent's support has switched the echo on
    h = start()
    reply = ambiguous(h, fake)
    send = send_of(fake, reply, h.settings)
    check_round(h)
    assert lookups(fake) == []  # younger than ambiguous_check_after: its report usually comes first

    later(h, CHECK_AFTER)

    after = reply_row(h, reply)
    assert (after["status"], after["provider_serial"], after["checks"]) == ("delivered", send.serial_no, 1)
    assert after["status_reason"] is None  # by our marker: nothing left to say
    assert after["delivered_at"] is not None
    [asked] = lookups(fake)
    sent_at = int(reply["sent_at"].timestamp())
    assert asked["PhoneNumber"] == PHONE
    assert (asked["Offset"], asked["Limit"], asked["SmsSdkAppId"]) == (0, 100, fake.app_id)
    assert asked["BeginTime"] == sent_at - 60
    assert asked["EndTime"] == int(h.clock().timestamp())  # the window's end, never in the future
    later(h, timedelta(hours=1))
    assert len(lookups(fake)) == 1  # settled: never asked again
    assert len(fake.sends) == 1  # and never sent again
    assert h.count(outbox) == 0


def test_with_no_echo_the_send_is_settled_by_number_and_time(
    start: Callable[..., Harness], fake: FakeTencentSms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smsbot.ambiguous")
    h = start()
    reply = ambiguous(h, fake)
    [send] = fake.sends
    assert send.session_context  # we sent our marker; Tencent just does not echo it (its default)

    later(h, CHECK_AFTER)

    after = reply_row(h, reply)
    assert (after["status"], after["provider_serial"]) == ("delivered", send.serial_no)
    assert "matched by number and time" in after["status_reason"]
    assert len(fake.sends) == 1
    assert f"ambiguous reply {reply['id']} to {PHONE} settled delivered" in caplog.text
    assert "number and time" in caplog.text


def test_a_send_tencent_reports_failed_is_settled_failed_with_tencents_description(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    fake.echo_session_context = True
    h = start()
    reply = ambiguous(h, fake)
    fake.set_send_status(send_of(fake, reply, h.settings), "FAIL", description="空号")

    later(h, CHECK_AFTER)

    after = reply_row(h, reply)
    assert (after["status"], after["error_code"], after["error_message"]) == ("failed", "FAIL", "空号")
    assert after["delivered_at"] is None
    assert len(fake.sends) == 1


def test_the_delivery_loop_checks_by_itself(start: Callable[..., Harness], fake: FakeTencentSms) -> None:
    h = start()
    reply = ambiguous(h, fake)
    h.clock.advance(CHECK_AFTER)
    wait_until(lambda: reply_row(h, reply)["status"] == "delivered", timeout=10, what="the loop's own check")
    assert len(fake.sends) == 1


# ---------------------------------------------------------------- bounded


def test_a_send_tencent_has_no_status_for_is_checked_a_few_times_then_left_to_ops(
    start: Callable[..., Harness], fake: FakeTencentSms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smsbot.ambiguous")
    h = start()
    reply = ambiguous(h, fake)
    fake.set_send_status(fake.sends[0], None)  # the carrier never reported (or Tencent never sent it)

    later(h, CHECK_AFTER)
    assert (reply_row(h, reply)["status"], reply_row(h, reply)["checks"]) == ("ambiguous", 1)
    check_round(h)  # the same interval: not asked again
    assert len(lookups(fake)) == 1
    later(h)
    assert reply_row(h, reply)["checks"] == 2
    assert reply_row(h, reply)["status_reason"] == reply["status_reason"]  # not given up yet
    later(h)

    after = reply_row(h, reply)
    assert (after["status"], after["checks"]) == ("ambiguous", 3)
    reason = after["status_reason"]
    assert reason.startswith("Tencent had no status for this send: asked 3 time(s)")
    assert "15 min after it was sent" in reason
    assert "Tencent's console" in reason
    assert reason.endswith("it was not resent")
    assert f"ambiguous reply {reply['id']} to {PHONE} left to ops" in caplog.text
    assert any(r.levelno == logging.WARNING and "left to ops" in r.getMessage() for r in caplog.records)
    for _ in range(3):
        later(h)
    assert len(lookups(fake)) == 3  # bounded: no more calls for it
    assert len(fake.sends) == 1


def test_a_resent_reply_that_is_ambiguous_again_gets_checks_of_its_own(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    h = start(ambiguous_check_max=1)
    reply = ambiguous(h, fake)
    fake.set_send_status(fake.sends[0], None)
    later(h, CHECK_AFTER)
    assert reply_row(h, reply)["checks"] == 1  # used up: left to ops
    with writing(h.engine) as conn:  # an admin resends it, as the console's retry does (checks untouched)
        conn.execute(
            update(messages).where(messages.c.id == reply["id"]).values(status="queued", status_reason="resent")
        )
        conn.execute(
            insert(outbox).values(message_id=reply["id"], attempts=0, next_attempt_at=h.clock(), created_at=h.clock())
        )
    fake.disconnect(after_processing=True)
    h.app.state.runtime.pipeline.wake_delivery()
    wait_until(lambda: len(fake.sends) == 2 and h.count(outbox) == 0, timeout=10, what="the resend")
    again = reply_row(h, reply)
    assert (again["status"], again["checks"], again["checked_at"]) == ("ambiguous", None, None)

    later(h, CHECK_AFTER)

    assert reply_row(h, reply)["provider_serial"] == fake.sends[1].serial_no  # the resend, delivered


def test_young_sends_wait_and_a_round_checks_at_most_its_batch(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    h = start(ambiguous_check_interval=timedelta(minutes=1), ambiguous_check_batch=2)
    replies = [ambiguous(h, fake, mobile=f"1380000000{n}") for n in range(3)]
    later(h, timedelta(minutes=4))
    assert lookups(fake) == []  # a round ran, but they are younger than ambiguous_check_after (5 min)

    later(h, timedelta(minutes=1))
    assert len(lookups(fake)) == 2
    assert sorted(reply_row(h, r)["status"] for r in replies) == ["ambiguous", "delivered", "delivered"]

    later(h, timedelta(minutes=1))  # the next round takes the one left
    assert len(lookups(fake)) == 3
    assert [reply_row(h, r)["status"] for r in replies] == ["delivered"] * 3


def test_a_tencent_error_is_logged_and_the_check_comes_again_next_interval(
    start: Callable[..., Harness], fake: FakeTencentSms, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="smsbot.ambiguous")
    h = start()
    reply = ambiguous(h, fake)
    fake.fail_requests("RequestLimitExceeded", action=LOOKUP)

    later(h, CHECK_AFTER)
    after = reply_row(h, reply)
    assert (after["status"], after["checks"]) == ("ambiguous", None)  # an error is no check
    assert "PullSmsSendStatusByPhoneNumber: RequestLimitExceeded" in caplog.text
    assert "asking again next interval" in caplog.text

    later(h)
    assert reply_row(h, reply)["status"] == "delivered"
    assert reconciler(h).counters.errors == 1


def test_an_unreachable_tencent_never_stops_the_loop(start: Callable[..., Harness], fake: FakeTencentSms) -> None:
    h = start()
    reply = ambiguous(h, fake)
    with fake.refused():
        h.clock.advance(CHECK_AFTER)
        wait_until(lambda: reconciler(h).counters.errors >= 1, timeout=10, what="the failed check")
    h.clock.advance(INTERVAL)
    wait_until(lambda: reply_row(h, reply)["status"] == "delivered", timeout=10, what="the next interval's check")


# ---------------------------------------------------------------- never someone else's send


def test_another_systems_send_with_its_own_session_context_is_not_taken_for_ours(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    fake.echo_session_context = True
    h = start()
    reply = ambiguous(h, fake)
    ours = send_of(fake, reply, h.settings)
    theirs = foreign_send(fake, context="crm:order-8842")
    fake.set_send_status(theirs, "FAIL", description="空号")

    later(h, CHECK_AFTER)

    after = reply_row(h, reply)
    assert (after["status"], after["provider_serial"]) == ("delivered", ours.serial_no)


def test_a_foreign_send_alone_does_not_settle_ours_when_tencent_echoes_session_context(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    fake.echo_session_context = True
    h = start()
    fake.disconnect(after_processing=False)  # ours never reached Tencent's send step
    h.say("hi")
    [reply] = h.wait_settled(timeout=10)
    assert reply["status"] == "ambiguous"
    assert fake.sends == []
    foreign_send(fake, context="crm:order-8842")

    later(h, CHECK_AFTER)

    after = reply_row(h, reply)
    assert (after["status"], after["checks"], after["provider_serial"]) == ("ambiguous", 1, None)


def test_two_ambiguous_replies_to_one_number_are_not_matched_by_number_alone(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    h = start()
    first = ambiguous(h, fake, "hi")
    second = ambiguous(h, fake, "1")
    assert len(fake.sends) == 2  # both reached Tencent, both delivered there

    later(h, CHECK_AFTER)

    for reply in (first, second):
        after = reply_row(h, reply)
        assert (after["status"], after["checks"], after["provider_serial"]) == ("ambiguous", 1, None)
    for _ in range(2):
        later(h)
    reason = reply_row(h, first)["status_reason"]
    assert reason.startswith("Tencent listed 2 sends to this number that could be this one")


def test_one_of_two_ambiguous_replies_listed_alone_is_still_not_matched_by_number(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    h = start()
    first = ambiguous(h, fake, "hi")
    second = ambiguous(h, fake, "1")
    fake.set_send_status(fake.sends[0], None)  # Tencent lists only one send: whose is it?

    later(h, CHECK_AFTER)

    for reply in (first, second):
        after = reply_row(h, reply)
        assert (after["status"], after["provider_serial"]) == ("ambiguous", None)
    for _ in range(2):
        later(h)
    assert reply_row(h, second)["status_reason"].startswith("2 sends of ours to this number in the window")


def test_a_send_of_ours_with_a_known_serial_is_never_taken_for_the_ambiguous_one(
    start: Callable[..., Harness], fake: FakeTencentSms
) -> None:
    h = start()
    reply = ambiguous(h, fake, "hi")
    h.say("1")  # answered normally: its SerialNo is recorded
    wait_until(lambda: any(r["status"] == "sent" for r in h.outbound()), timeout=10, what="the second reply")
    [sent] = [r for r in h.outbound() if r["status"] == "sent"]
    [ambiguous_send] = [s for s in fake.sends if s.serial_no != sent["provider_serial"]]

    later(h, CHECK_AFTER)

    after = reply_row(h, reply)
    assert (after["status"], after["provider_serial"]) == ("delivered", ambiguous_send.serial_no)


# ---------------------------------------------------------------- hosting and settings


def test_checks_run_only_with_the_tencent_sender_and_survive_pickling(fake: FakeTencentSms) -> None:
    assert ambiguous_checks(Settings()) is None  # the console sender: nothing is ever ambiguous
    assert ambiguous_checks(Settings(sender="tencent")) is None  # no credentials (make_sender refuses it)
    assert ambiguous_checks(tencent_settings(fake, ambiguous_check_max=0)) is None  # switched off
    options = delivery_options(tencent_settings(fake, ambiguous_check_batch=7))
    copy = pickle.loads(pickle.dumps(options))  # as it reaches the writer process
    checks = copy["ambiguous"]
    assert isinstance(checks, AmbiguousChecks)
    assert (checks.batch, checks.interval, checks.after, checks.max_checks) == (7, INTERVAL, CHECK_AFTER, 3)
    engine = make_engine("sqlite://")
    try:
        deliverer = Deliverer(DbWriter(engine), ConsoleSender(), **copy)
        assert deliverer.reconciler is not None
        assert isinstance(deliverer.reconciler.client, TencentPullClient)
        assert Deliverer(DbWriter(engine), ConsoleSender(), **delivery_options(Settings())).reconciler is None
    finally:
        engine.dispose()


@pytest.mark.slow
def test_the_writer_process_checks_too(db_url: str, tmp_path: Path) -> None:
    with FakeTencentSms(
        secret_id="AKIDambiguous", secret_key="ambiguous-key", templates=TEMPLATES, signatures={"Acme Shop"}
    ) as fake:
        settings = tencent_settings(
            fake,
            tencent_timeout=1,
            ambiguous_check_after=timedelta(seconds=1),
            ambiguous_check_interval=timedelta(seconds=1),
        )
        engine = make_engine(db_url)
        rules = LiveRules(copy_rules(tmp_path / "rules"))
        rules.load()
        app = create_app(
            settings,
            engine=engine,
            rules=rules,
            sender=make_sender(settings),
            writer_mode="process",
            watch_rules=False,
        )
        try:
            with TestClient(app) as client:
                fake.disconnect(after_processing=True)
                answer = client.post("/sms/callback", json=payload("hi", at=int(fake.now()) - 60))
                assert answer.json() == {"result": 0, "errmsg": "OK"}
                wait_until(
                    lambda: (
                        [r["status"] for r in rows(engine, messages, messages.c.direction == "out")] == ["delivered"]
                    ),
                    timeout=30,
                    what="the writer process to settle the ambiguous send",
                )
            [reply] = rows(engine, messages, messages.c.direction == "out")
            assert "matched by number and time" in reply["status_reason"]  # by the check: no report was posted
            assert reply["provider_serial"] == fake.sends[0].serial_no
            assert len(fake.sends) == 1
        finally:
            engine.dispose()


# ---------------------------------------------------------------- examine (pure)


def item(serial: str, context: str = "", *, phone: str = PHONE, status: str = "SUCCESS") -> dict[str, Any]:
    return {
        "UserReceiveTime": 1767578407,
        "CountryCode": "86",
        "SubscriberNumber": MOBILE,
        "PhoneNumber": phone,
        "SerialNo": serial,
        "ReportStatus": status,
        "Description": "用户短信接收成功" if status == "SUCCESS" else "空号",
        "SessionContext": context,
    }


CONTEXTS = SessionContexts(b"test-key")


def test_examine_sorts_tencents_items_for_one_reply() -> None:
    items = [
        item("5000:1", CONTEXTS.context_for(42), status="FAIL"),
        item("5000:2", CONTEXTS.context_for(43)),  # another reply of ours
        item("5000:3", "crm:42"),  # another system's
        item("5000:4"),  # no SessionContext: anyone's
        item("5000:5", phone="+8613800000009"),  # not this number
        {"SerialNo": "5000:6"},  # unreadable: no ReportStatus
    ]
    found = examine(items, message_id=42, phone_number=PHONE, contexts=CONTEXTS)
    assert found.marked is not None
    assert (found.marked.serial, found.marked.outcome.delivered, found.marked.outcome.error_message) == (
        "5000:1",
        False,
        "空号",
    )
    assert [s.serial for s in found.unmarked] == ["5000:4"]
    assert found.echoed
    assert found.listed == 4


def test_a_forged_marker_is_not_ours() -> None:
    forged = SessionContexts(b"someone else").context_for(42)
    found = examine([item("5000:1", forged)], message_id=42, phone_number=PHONE, contexts=CONTEXTS)
    assert (found.marked, found.unmarked, found.echoed) == (None, (), False)
