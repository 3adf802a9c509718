"""A reply that cannot go out soon is worse than none: ``reply_max_delay`` expires it (SQLite and PostgreSQL).

"Reply 1 for status" answered the next morning confuses the customer. A reply
held past its deadline, by quiet hours, a frequency limit, a retry or a queue
that stood still, is recorded as ``expired`` with the reason and never sent;
opt-out confirmations too. Account-wide caps hold every reply and are noted
for ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.config import Settings
from bot.delivery.senders import make_sender
from bot.numbers import CHINA
from bot.store.models import account_limits, opt_out_events, outbox
from tests.fakes.tencent_sms import FakeTencentSms, FrequencyLimits
from tests.support import FakeClock, Harness, tencent_settings, wait_until

EVENING = datetime(2026, 1, 5, 23, 0, tzinfo=CHINA).astimezone(UTC)
MORNING = datetime(2026, 1, 5, 10, 0, tzinfo=CHINA).astimezone(UTC)


def marketing_menu(rules_dir: Path, extra: str = "") -> None:
    shop = rules_dir / "acme-shop.yaml"
    text = shop.read_text(encoding="utf-8")
    marked = text.replace('menu:     {id: "1490001",', 'menu:     {marketing: true, id: "1490001",')
    assert marked != text
    shop.write_text(extra + marked, encoding="utf-8")


def expired(h: Harness) -> list[dict[str, object]]:
    return [dict(r) for r in h.outbound() if r["status"] == "expired"]


def test_a_marketing_reply_held_overnight_expires_instead_of_going_out_in_the_morning(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    marketing_menu(rules_dir)
    h = make_app(db_url, app_clock=FakeClock(EVENING))
    h.say("hi")
    [reply] = h.wait_settled()
    assert reply["status"] == "expired"
    assert "marketing SMS go out only 08:00-22:00 China time" in reply["status_reason"]
    assert "reply_max_delay" in reply["status_reason"]
    assert h.sender.sent == []
    h.clock.advance(timedelta(hours=10))
    assert h.sender.sent == []  # never sent late


def test_a_rule_file_may_let_its_replies_wait_longer(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    marketing_menu(rules_dir, "reply_max_delay: 12h\n")
    h = make_app(db_url, app_clock=FakeClock(EVENING))
    h.say("hi")
    wait_until(lambda: any(r["next_attempt_at"] > EVENING for r in h.rows(outbox)), what="the reply held")
    [row] = h.rows(outbox)
    assert row["send_by"] == EVENING + timedelta(hours=12)
    h.clock.advance(timedelta(hours=9, minutes=1))
    [reply] = h.wait_settled()
    assert reply["status"] == "sent"


def test_the_setting_sets_every_replys_deadline(make_app: Callable[..., Harness], db_url: str) -> None:
    h = make_app(db_url, settings=Settings(reply_max_delay=timedelta(minutes=20)), deliver=False)
    h.say("hi")
    [row] = h.rows(outbox)
    assert row["send_by"] == h.clock() + timedelta(minutes=20)


def test_a_reply_that_waited_in_a_stopped_queue_expires(make_app: Callable[..., Harness], db_url: str) -> None:
    stopped = make_app(db_url, deliver=False)  # say every delivery worker was down
    stopped.say("hi")
    assert stopped.count(outbox) == 1
    later = FakeClock(stopped.clock() + timedelta(hours=2))
    h = make_app(db_url, app_clock=later)
    [reply] = h.wait_settled()
    assert reply["status"] == "expired"
    assert "waited in the queue" in reply["status_reason"]
    assert h.sender.sent == []


def test_an_opt_out_confirmation_follows_the_same_rule(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    shop = rules_dir / "acme-shop.yaml"
    text = shop.read_text(encoding="utf-8")
    shop.write_text(text.replace('bye:      {id: "1490007",', 'bye:      {marketing: true, id: "1490007",'))
    h = make_app(db_url, app_clock=FakeClock(EVENING))
    h.say("TD")
    [reply] = h.wait_settled()
    assert (reply["template_name"], reply["status"]) == ("bye", "expired")
    [event] = h.rows(opt_out_events)
    assert event["event"] == "opt_out"  # the opt-out itself stands; only the late confirmation is not sent


def test_the_daily_limit_of_two_expires_the_third_reply_of_the_day(
    make_app: Callable[..., Harness], db_url: str
) -> None:
    h = make_app(
        db_url,
        settings=Settings(frequency_per_day=2, frequency_same_content=None),
        frequency_limits=True,
        app_clock=FakeClock(MORNING),
    )
    h.say("hi")
    h.say("1")
    h.say("MENU")
    replies = h.wait_settled()
    assert [r["status"] for r in replies] == ["sent", "sent", "expired"]
    assert "the number's frequency limits" in replies[2]["status_reason"]
    assert len(h.sender.sent) == 2


# ---------------------------------------------------------------- against the fake Tencent


@pytest.fixture
def fake() -> Iterator[FakeTencentSms]:
    templates = {
        "1490001": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
        "1490002": "Order {1}: {2}.",
    }
    with FakeTencentSms(
        secret_id="AKIDd", secret_key="k", templates=templates, signatures={"Acme Shop"},
        limits=FrequencyLimits.disabled(),
    ) as server:  # fmt: skip
        yield server


def tencent_app(make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, **extra: object) -> Harness:
    settings = tencent_settings(fake, tencent_timeout=2, **extra)
    return make_app(db_url, settings=settings, sender=make_sender(settings), app_clock=FakeClock(MORNING))


def test_a_retry_past_the_deadline_expires_the_reply(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    fake.fail_number("+8613800000000", "LimitExceeded.PhoneNumberDailyLimit")  # Tencent's own count says no
    h = tencent_app(make_app, db_url, fake)
    h.say("hi")
    [reply] = h.wait_settled(timeout=10)
    assert (reply["status"], reply["error_code"]) == ("expired", "LimitExceeded.PhoneNumberDailyLimit")
    assert "past the reply's deadline" in reply["status_reason"]
    assert fake.sends == []


def test_an_account_wide_cap_holds_every_reply_and_is_noted_for_ops(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, caplog: pytest.LogCaptureFixture
) -> None:
    fake.account_daily_limit = 1
    h = tencent_app(make_app, db_url, fake)
    h.say("hi")
    h.wait_settled(timeout=10)
    with caplog.at_level("ERROR", logger="smsbot.outbox"):
        h.say("hi", mobile="13900000001")
        [_, capped] = h.wait_settled(timeout=10)
    assert (capped["status"], capped["error_code"]) == ("expired", "LimitExceeded.AppDailyLimit")
    [limit] = h.rows(account_limits)
    assert (limit["code"], limit["nationcode"]) == ("LimitExceeded.AppDailyLimit", "")
    assert limit["until"] == datetime(2026, 1, 6, 0, 5, tzinfo=CHINA)
    assert "account-wide cap LimitExceeded.AppDailyLimit" in caplog.text
    calls = len(fake.calls)
    h.say("hi", mobile="13900000002")  # held by the cap: not even tried at Tencent
    [*_, held] = h.wait_settled(timeout=10)
    assert held["status"] == "expired"
    assert "account-wide daily cap" in held["status_reason"]
    assert len(fake.calls) == calls


def test_a_reply_abroad_goes_with_the_international_template_no_signature_and_the_sender_id(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, rules_dir: Path
) -> None:
    from tests.fakes.tencent_sms import FakeTemplate

    fake.templates["2490001"] = FakeTemplate("Reply 1 for order status, 2 for opening hours.", international=True)
    shop = rules_dir / "acme-shop.yaml"
    text = shop.read_text(encoding="utf-8")
    shop.write_text(
        "sender_id: ACME\n"
        + text.replace('menu:     {id: "1490001",', 'menu:     {intl_id: "2490001", id: "1490001",'),
        encoding="utf-8",
    )
    h = tencent_app(make_app, db_url, fake)
    h.say("hi", nationcode="852", mobile="61234567")
    [reply] = h.wait_settled(timeout=10)
    assert (reply["status"], reply["template_id"]) == ("sent", "2490001")
    [sent] = fake.sends
    assert (sent.phone_number, sent.template_id, sent.sign_name, sent.sender_id) == (
        "+85261234567", "2490001", None, "ACME",
    )  # fmt: skip
    h.say("STOP", nationcode="852", mobile="61234567")  # 'bye' has no intl_id
    [_, refused] = h.wait_settled(timeout=10)
    assert refused["status"] == "failed"
    assert "'bye' has no intl_id" in refused["status_reason"]
    assert len(fake.sends) == 1  # refused before Tencent could refuse it


def test_a_carrier_or_customer_blacklist_opts_the_number_out_with_the_reason(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms
) -> None:
    fake.blacklist("+8613800000000", source="carrier")
    h = tencent_app(make_app, db_url, fake)
    h.say("hi")
    [reply] = h.wait_settled(timeout=10)
    assert (reply["status"], reply["error_code"]) == ("failed", "FailedOperation.PhoneNumberInBlacklist")
    [event] = h.rows(opt_out_events)
    assert (event["event"], event["source"]) == ("opt_out", "provider")
    assert "carrier" in event["raw_text"]
    assert "not an opt-out keyword" in event["raw_text"]


def test_tencents_english_faq_cap_of_two_a_day_expires_the_third_reply_instead_of_sending_it_tomorrow(
    make_app: Callable[..., Harness], db_url: str
) -> None:
    """smsbot's own per_day limit set higher than the account's (the usual mistake): Tencent refuses the third."""
    templates = {
        "1490001": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out.",
        "1490002": "Order {1}: {2}.",
        "1490003": "We are open {1} to {2} today.",
    }
    with FakeTencentSms(
        secret_id="AKIDd", secret_key="k", templates=templates, signatures={"Acme Shop"},
        limits=FrequencyLimits.english_faq(),
    ) as fake:  # fmt: skip
        h = tencent_app(make_app, db_url, fake)
        for text in ("hi", "1", "2"):  # three different texts: only the daily cap stands in the way
            h.say(text)
            h.wait_settled(timeout=10)
        statuses = [(r["status"], r["error_code"]) for r in h.outbound()]
        assert statuses[:2] == [("sent", None), ("sent", None)]
        assert statuses[2] == ("expired", "LimitExceeded.PhoneNumberDailyLimit")
        assert len(fake.sends) == 2


@pytest.mark.parametrize("kind", ["extra_fields", "ext_number", "ext_object", "ext_array", "ext_null", "status_lower"])
def test_tencents_odd_report_items_still_mark_the_reply(
    make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms, kind: str
) -> None:
    h = tencent_app(make_app, db_url, fake)
    h.say("hi")
    [reply] = h.wait_settled(timeout=10)
    [send] = fake.sends
    odd = fake.odd_delivery_reports(send, [kind, "no_sid", "not_object", "unknown_sid"])  # type: ignore[list-item]
    response = h.client.post("/sms/status", json=list(odd.values()))
    assert response.json() == {"result": 0, "errmsg": "OK"}  # the batch is not refused for its odd items
    [after] = h.outbound()
    assert (after["id"], after["status"]) == (reply["id"], "delivered")
