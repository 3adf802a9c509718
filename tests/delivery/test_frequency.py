"""Tencent's per-number frequency limits, kept before calling Tencent: replies are deferred, never dropped."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from bot.config import Settings
from bot.delivery.deliverer import frequency_limits
from bot.delivery.frequency import FrequencyLimits, Sent, earliest_send
from bot.numbers import CHINA
from bot.store.models import outbox
from tests.support import Harness, wait_until

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)  # 10:00 China time
TENCENT = FrequencyLimits()


def test_defaults_are_tencents() -> None:
    assert frequency_limits(Settings()) == FrequencyLimits(
        same_content=timedelta(seconds=30), per_hour=None, per_day=10
    )


def test_limits_from_the_environment_where_0_turns_one_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMSBOT_FREQUENCY_SAME_CONTENT", "45s")
    monkeypatch.setenv("SMSBOT_FREQUENCY_PER_HOUR", "5")
    monkeypatch.setenv("SMSBOT_FREQUENCY_PER_DAY", "0")
    assert frequency_limits(Settings()) == FrequencyLimits(timedelta(seconds=45), per_hour=5, per_day=None)
    monkeypatch.setenv("SMSBOT_FREQUENCY_SAME_CONTENT", "0")
    assert frequency_limits(Settings()).same_content is None


def test_a_first_send_goes_at_once() -> None:
    assert earliest_send([], "hello", NOW, TENCENT) is None


def test_same_content_waits_30_seconds_from_the_last_copy() -> None:
    history = [Sent(NOW - timedelta(seconds=10), "hello")]
    assert earliest_send(history, "hello", NOW, TENCENT) == NOW + timedelta(seconds=20)
    assert earliest_send(history, "something else", NOW, TENCENT) is None
    assert earliest_send([Sent(NOW - timedelta(seconds=30), "hello")], "hello", NOW, TENCENT) is None


def test_hourly_limit_waits_until_the_oldest_send_of_the_window_is_an_hour_old() -> None:
    limits = FrequencyLimits(same_content=None, per_hour=3, per_day=None)
    history = [Sent(NOW - timedelta(minutes=m), f"text {m}") for m in (50, 20, 5)]
    assert earliest_send(history, "new", NOW, limits) == NOW + timedelta(minutes=10)
    assert earliest_send(history[1:], "new", NOW, limits) is None  # two in the last hour: room for one


def test_daily_limit_waits_for_the_next_china_day() -> None:
    limits = FrequencyLimits(same_content=None, per_hour=None, per_day=2)
    today = [Sent(NOW - timedelta(hours=1), "a"), Sent(NOW - timedelta(hours=2), "b")]
    assert earliest_send(today, "c", NOW, limits) == datetime(2026, 1, 6, 0, 0, tzinfo=CHINA)
    # Sends before midnight China time (yesterday, 16:00 UTC) do not count against today.
    yesterday = [Sent(datetime(2026, 1, 4, 15, 59, tzinfo=UTC), "a"), Sent(NOW - timedelta(hours=1), "b")]
    assert earliest_send(yesterday, "c", NOW, limits) is None


def test_the_latest_of_several_limits_wins() -> None:
    limits = FrequencyLimits(same_content=timedelta(seconds=30), per_hour=1, per_day=None)
    history = [Sent(NOW - timedelta(seconds=5), "hello")]
    assert earliest_send(history, "hello", NOW, limits) == NOW - timedelta(seconds=5) + timedelta(hours=1)


def test_no_limits() -> None:
    limits = FrequencyLimits(same_content=None, per_hour=None, per_day=None)
    assert not limits.enabled
    history = [Sent(NOW, "hello")] * 50
    assert earliest_send(history, "hello", NOW, limits) is None


# ---------------------------------------------------------------- in the delivery loop (SQLite and Postgres)


@pytest.fixture
def limited(make_app: Callable[..., Harness], db_url: str) -> Callable[..., Harness]:
    def start(**settings: object) -> Harness:
        return make_app(db_url, settings=Settings(**settings), frequency_limits=True)  # type: ignore[arg-type]

    return start


def test_the_same_reply_twice_within_30s_is_deferred_then_sent(limited: Callable[..., Harness]) -> None:
    h = limited()
    h.say("hi")
    h.wait_settled()
    h.say("MENU")  # the same menu again, at the same (frozen) moment
    [held] = wait_until(
        lambda: [r for r in h.rows(outbox) if r["next_attempt_at"] > h.clock()], what="the second menu to be held"
    )
    assert len(h.sender.sent) == 1  # the first was sent before the second was said
    first, second = h.outbound()
    assert first["sent_at"] == h.clock()
    assert held["next_attempt_at"] == h.clock() + timedelta(seconds=30)
    assert (second["status"], second["error_code"]) == ("queued", None)
    assert held["attempts"] == 0  # nothing was tried at Tencent

    h.clock.advance(timedelta(seconds=31))
    h.wait_settled()
    assert [m["status"] for m in h.outbound()] == ["sent", "sent"]
    assert len(h.sender.sent) == 2


def test_daily_limit_holds_replies_until_the_next_china_day(limited: Callable[..., Harness]) -> None:
    h = limited(frequency_per_day=2, frequency_same_content=None, reply_max_delay=timedelta(days=2))
    h.clock.now = NOW
    h.say("hi")
    h.say("1")
    h.say("MENU")
    [held] = wait_until(
        lambda: len(h.sender.sent) == 2 and [r for r in h.rows(outbox) if r["next_attempt_at"] > h.clock()],
        what="two replies sent and the third held",
    )
    assert held["next_attempt_at"] == datetime(2026, 1, 6, 0, 0, tzinfo=CHINA)
    other = h.say("hi", mobile="13900000000")  # another number has its own allowance
    assert other.status_code == 200
    wait_until(lambda: len(h.sender.sent) == 3, what="the other number's reply")

    h.clock.now = datetime(2026, 1, 6, 0, 0, 1, tzinfo=CHINA)
    h.wait_settled()
    assert [sms.template_id for sms in h.sender.sent if sms.mobile != "13900000000"][-1] == "1490001"
    assert {m["status"] for m in h.outbound()} == {"sent"}
