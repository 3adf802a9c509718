"""What happens after each kind of Tencent answer: the plan (pure) and the rows it leaves (SQLite and Postgres)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.delivery.retry import Final, Retry, RetryPolicy, plan
from bot.delivery.senders import make_sender
from bot.numbers import CHINA
from bot.store.models import conversations, opt_out_events, outbox
from bot.tencent.config import session_contexts
from tests.fakes.tencent_sms import FakeTencentSms
from tests.support import FakeClock, Harness, tencent_settings, wait_until

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)  # 10:00 China time
POLICY = RetryPolicy()


def planned(code: str, *, attempts: int = 1, now: datetime = NOW, ok: bool = False, seed: int = 1) -> Final | Retry:
    return plan(
        ok=ok, code=code, message="msg", serial="5000:1" if ok else None,
        attempts=attempts, now=now, policy=POLICY, rng=random.Random(seed),
    )  # fmt: skip


def jittered(seconds: float, seed: int = 1) -> timedelta:
    return timedelta(seconds=seconds) * (1 + random.Random(seed).uniform(-POLICY.jitter, POLICY.jitter))


def test_sent() -> None:
    assert planned("Ok", ok=True) == Final("sent", None, None, planned("Ok", ok=True).error_class, serial="5000:1")  # type: ignore[union-attr]


@pytest.mark.parametrize(("attempts", "base_seconds"), [(1, 5), (2, 10), (3, 20), (5, 80)])
def test_transient_errors_back_off_exponentially_with_jitter(attempts: int, base_seconds: int) -> None:
    result = planned("InternalError.Timeout", attempts=attempts)
    assert result == Retry(NOW + jittered(base_seconds), attempts, "InternalError.Timeout", "msg")


def test_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=20)
    result = plan(ok=False, code="ServerNetworkError", message="", serial=None, attempts=15, now=NOW,
                  policy=policy, rng=random.Random(1))  # fmt: skip
    assert isinstance(result, Retry)
    assert result.at - NOW <= policy.cap * (1 + policy.jitter)


def test_transient_errors_give_up_after_the_last_attempt() -> None:
    result = planned("InternalError.Timeout", attempts=POLICY.max_attempts)
    assert isinstance(result, Final)
    assert (result.status, result.code) == ("failed", "InternalError.Timeout")
    assert "gave up after 6 attempts" in (result.error or "")


@pytest.mark.parametrize(
    ("code", "wait"),
    [
        ("LimitExceeded.PhoneNumberThirtySecondLimit", timedelta(seconds=30)),
        ("LimitExceeded.PhoneNumberOneHourLimit", timedelta(hours=1)),
    ],
)
def test_frequency_limits_wait_out_their_window(code: str, wait: timedelta) -> None:
    assert planned(code) == Retry(NOW + wait, 1, code, "msg")


def test_daily_limits_wait_for_the_next_china_day() -> None:
    result = planned("LimitExceeded.PhoneNumberDailyLimit")
    assert isinstance(result, Retry)
    assert result.at.astimezone(CHINA) == datetime(2026, 1, 6, 0, 5, tzinfo=CHINA)


@pytest.mark.parametrize(
    ("china_now", "opens"),
    [
        (datetime(2026, 1, 5, 23, 0, tzinfo=CHINA), datetime(2026, 1, 6, 8, 0, tzinfo=CHINA)),
        (datetime(2026, 1, 5, 6, 30, tzinfo=CHINA), datetime(2026, 1, 5, 8, 0, tzinfo=CHINA)),
    ],
)
def test_marketing_time_constraint_waits_for_08_00_china(china_now: datetime, opens: datetime) -> None:
    result = planned("FailedOperation.MarketingSendTimeConstraint", now=china_now.astimezone(UTC))
    assert isinstance(result, Retry)
    assert result.at == opens


def test_permanent_errors_fail_at_once() -> None:
    result = planned("FailedOperation.TemplateIncorrectOrUnapproved", attempts=1)
    assert isinstance(result, Final)
    assert (result.status, result.error_class.alert_ops) == ("failed", True)


def test_blacklisted_number_fails_and_means_opted_out() -> None:
    result = planned("FailedOperation.PhoneNumberInBlacklist")
    assert isinstance(result, Final)
    assert (result.status, result.error_class.opted_out) == ("failed", True)


def test_no_answer_is_ambiguous_never_retried() -> None:
    result = planned("ClientNetworkError")
    assert isinstance(result, Final)
    assert result.status == "ambiguous"


# ---------------------------------------------------------------- through the outbox, against the fake


@pytest.fixture
def fake() -> Iterator[FakeTencentSms]:
    templates = {"1490001": "Reply 1 for order status, 2 for opening hours. Reply TD to opt out."}
    with FakeTencentSms(secret_id="AKIDr", secret_key="k", templates=templates, signatures={"Acme Shop"}) as server:
        yield server


@pytest.fixture
def tencent(make_app: Callable[..., Harness], db_url: str, fake: FakeTencentSms) -> Harness:
    settings = tencent_settings(fake, tencent_timeout=1)
    return make_app(db_url, settings=settings, sender=make_sender(settings))


def attempted(h: Harness) -> None:
    """Wait until the first send attempt has been recorded (error code set, or the outbox row gone)."""
    wait_until(
        lambda: h.count(outbox) == 0 or any(r["error_code"] for r in h.outbound()),
        timeout=10,
        what="the first send attempt to be recorded",
    )


def test_transient_error_leaves_the_reply_queued_for_a_backed_off_retry(tencent: Harness, fake: FakeTencentSms) -> None:
    fake.fail_requests("InternalError.Timeout")
    h = tencent
    h.say("hi")
    attempted(h)
    [reply] = h.outbound()
    [row] = h.rows(outbox)
    assert (reply["status"], reply["error_code"]) == ("queued", "InternalError.Timeout")
    assert row["attempts"] == 1
    assert h.clock.now + timedelta(seconds=4) <= row["next_attempt_at"] <= h.clock.now + timedelta(seconds=6)
    assert fake.sends == []
    h.clock.advance(timedelta(seconds=7))  # past the backoff: the next round sends it
    [reply] = h.wait_settled()
    assert reply["status"] == "sent"
    assert len(fake.sends) == 1


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (lambda f: f.http_error(502, times=2), "ServerNetworkError"),  # a 5xx from a proxy or Tencent's edge
        (lambda f: f.fail_requests("RequestLimitExceeded", times=2), "RequestLimitExceeded"),  # API rate limit
        (lambda f: f.fail_requests("InternalError.SendAndRecvFail", times=2), "InternalError.SendAndRecvFail"),
    ],
    ids=["http-5xx", "rate-limited", "tencent-internal"],
)
def test_retryable_failures_back_off_longer_each_time_then_the_reply_goes_once(
    tencent: Harness, fake: FakeTencentSms, fault: Callable[[FakeTencentSms], None], code: str
) -> None:
    fault(fake)
    h = tencent
    h.say("hi")
    attempted(h)
    delays = []
    for attempt in (1, 2):
        wait_until(lambda n=attempt: h.rows(outbox)[0]["attempts"] == n, timeout=10, what=f"attempt {attempt}")
        [row] = h.rows(outbox)
        assert h.outbound()[0]["status"] == "queued"
        assert h.outbound()[0]["error_code"] == code
        delays.append(row["next_attempt_at"] - h.clock.now)
        h.clock.advance(delays[-1] + timedelta(seconds=1))
    assert timedelta(seconds=4) <= delays[0] <= timedelta(seconds=6)  # 5 s, then twice that, with 20% jitter
    assert timedelta(seconds=8) <= delays[1] <= timedelta(seconds=12)
    [reply] = h.wait_settled()
    assert reply["status"] == "sent"
    assert len(fake.sends) == 1


def test_a_retryable_failure_that_never_ends_fails_with_its_code_after_the_last_attempt(
    tencent: Harness, fake: FakeTencentSms
) -> None:
    fake.http_error(503, times=None)
    h = tencent
    h.say("hi")
    for attempt in range(1, 6):
        wait_until(
            lambda n=attempt: h.count(outbox) and h.rows(outbox)[0]["attempts"] == n,
            timeout=10,
            what=f"attempt {attempt}",
        )
        h.clock.advance(timedelta(minutes=11))  # past any backoff (capped at 10 minutes)
    [reply] = h.wait_settled()
    assert (reply["status"], reply["error_code"]) == ("failed", "ServerNetworkError")
    assert "gave up after 6 attempts" in reply["error_message"]
    assert fake.sends == []


def test_frequency_limit_defers_the_reply_by_its_window(tencent: Harness, fake: FakeTencentSms) -> None:
    fake.fail_number("+8613800000000", "LimitExceeded.PhoneNumberThirtySecondLimit")
    h = tencent
    h.say("hi")
    attempted(h)
    [row] = h.rows(outbox)
    assert row["next_attempt_at"] == h.clock.now + timedelta(seconds=30)
    assert h.outbound()[0]["status"] == "queued"


def test_blacklisted_number_fails_the_reply_and_opts_the_number_out(tencent: Harness, fake: FakeTencentSms) -> None:
    fake.fail_number("+8613800000000", "FailedOperation.PhoneNumberInBlacklist")
    h = tencent
    h.say("hi")
    [reply] = h.wait_settled()
    assert (reply["status"], reply["error_code"]) == ("failed", "FailedOperation.PhoneNumberInBlacklist")
    [convo] = h.rows(conversations)
    assert convo["opted_out"]
    [event] = h.rows(opt_out_events)
    assert (event["event"], event["source"], event["message_id"]) == ("opt_out", "provider", reply["id"])
    h.say("MENU")  # and the bot now stays silent
    assert [r["status"] for r in h.wait_settled()] == ["failed"]


def test_permanent_error_fails_at_once_with_tencents_code(tencent: Harness, fake: FakeTencentSms) -> None:
    fake.fail_requests("FailedOperation.TemplateIncorrectOrUnapproved")
    h = tencent
    h.say("hi")
    [reply] = h.wait_settled()
    assert (reply["status"], reply["error_code"]) == ("failed", "FailedOperation.TemplateIncorrectOrUnapproved")


@pytest.mark.slow
def test_no_answer_after_tencent_accepted_is_marked_ambiguous_not_resent(
    tencent: Harness, fake: FakeTencentSms
) -> None:
    fake.echo_session_context = True  # Tencent echoes SessionContext in reports only once support enables it
    fake.slow(2.5)  # accepted and recorded, the answer comes after our 1 s timeout
    h = tencent
    h.say("hi")
    [reply] = h.wait_settled(timeout=10)
    assert (reply["status"], reply["error_code"]) == ("ambiguous", "ClientNetworkError")
    h.clock.advance(timedelta(hours=1))
    assert h.count(outbox) == 0
    assert len(fake.sends) == 1  # sent once, never again
    assert "not resent" in reply["status_reason"]

    # Tencent's delivery report names our SessionContext (our marker for the reply): it settles the doubt.
    [send] = fake.sends
    contexts = session_contexts(tencent_settings(fake))
    assert contexts is not None
    assert contexts.message_id(send.session_context) == reply["id"]
    response = h.client.post("/sms/status", json=[fake.delivery_report(send)])
    assert response.json() == {"result": 0, "errmsg": "OK"}
    [after] = h.outbound()
    assert (after["status"], after["provider_serial"]) == ("delivered", send.serial_no)


# ---------------------------------------------------------------- marketing hours


@pytest.mark.parametrize(
    ("china", "allowed"),
    [((7, 59), False), ((8, 0), True), ((21, 59), True), ((22, 0), False), ((23, 30), False)],
)
def test_marketing_hours_are_08_to_22_china_time(china: tuple[int, int], allowed: bool) -> None:
    from bot.delivery.retry import marketing_hours

    assert marketing_hours(datetime(2026, 1, 5, *china, tzinfo=CHINA)) is allowed


def test_marketing_reply_waits_for_08_00_china_time_then_goes(
    make_app: Callable[..., Harness], db_url: str, rules_dir: Path
) -> None:
    shop = rules_dir / "acme-shop.yaml"
    text = shop.read_text(encoding="utf-8")
    marked = text.replace('menu:     {id: "1490001",', 'menu:     {marketing: true, id: "1490001",')
    assert marked != text
    shop.write_text("reply_max_delay: 12h\n" + marked, encoding="utf-8")  # this file lets replies wait the night
    late = FakeClock(datetime(2026, 1, 5, 23, 0, tzinfo=CHINA).astimezone(UTC))
    h = make_app(db_url, app_clock=late)
    h.say("hi")  # the menu template is a marketing template now
    wait_until(
        lambda: any(r["next_attempt_at"] > late.now for r in h.rows(outbox)),
        timeout=10,
        what="the marketing reply to be held",
    )
    [reply] = h.outbound()
    assert (reply["status"], reply["marketing"]) == ("queued", True)
    [row] = h.rows(outbox)
    assert row["next_attempt_at"] == datetime(2026, 1, 6, 8, 0, tzinfo=CHINA)
    assert h.sender.sent == []
    late.advance(timedelta(hours=9, minutes=1))  # 08:01 the next morning
    [reply] = h.wait_settled()
    assert reply["status"] == "sent"
    assert len(h.sender.sent) == 1
