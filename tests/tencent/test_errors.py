"""The error table against the SDK's own list of codes, and the classes the issue names.

A code Tencent adds reaches us first as a new constant in the SDK's
``errorcodes.py``; this test fails until the table says what it means, so it
is never silently "permanent".
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from tencentcloud.sms.v20210111 import errorcodes  # type: ignore[import-untyped]

from bot.delivery.retry import Final, Retry, RetryPolicy, plan
from bot.numbers import CHINA
from bot.tencent.errors import EXACT, NOT_SENT, UNKNOWN, UNREADABLE, Outcome, Wait, classify

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)  # 10:00 China time


def step(code: str, *, attempts: int) -> Final | Retry:
    return plan(
        ok=False, code=code, message="slow down", serial=None, attempts=attempts, now=NOW, policy=RetryPolicy(),
        rng=random.Random(attempts),
    )  # fmt: skip


def sdk_codes() -> list[str]:
    return sorted(value for name, value in vars(errorcodes).items() if name.isupper() and isinstance(value, str))


def test_the_sdk_lists_codes_at_all() -> None:
    assert len(sdk_codes()) > 80  # the import really found the SDK's table


def test_every_code_the_sdk_knows_has_an_explicit_row() -> None:
    missing = [code for code in sdk_codes() if code not in EXACT]
    assert missing == [], f"classify these in bot/tencent/errors.py: {missing}"


@pytest.mark.parametrize(
    "code",
    [
        "InternalError",
        "InternalError.SomethingNew",
        "ServiceUnavailable",
        "ServiceUnavailable.Maintenance",
        "ResourceUnavailable",
        "ResourceUnavailable.Busy",
        "RequestLimitExceeded",
        "RequestLimitExceeded.UinLimitExceeded",
        "ServerNetworkError",
        NOT_SENT,
    ],
)
def test_tencents_common_codes_and_sends_that_never_left_are_retried(code: str) -> None:
    assert classify(code).outcome is Outcome.TRANSIENT
    assert classify(code).retryable


@pytest.mark.parametrize(
    ("code", "wait"),
    [
        ("LimitExceeded.PhoneNumberThirtySecondLimit", Wait.THIRTY_SECONDS),
        ("LimitExceeded.PhoneNumberOneHourLimit", Wait.ONE_HOUR),
        ("LimitExceeded.PhoneNumberDailyLimit", Wait.NEXT_DAY),
        ("LimitExceeded.PhoneNumberSameContentDailyLimit", Wait.NEXT_DAY),
    ],
)
def test_per_number_windows_wait_for_their_window(code: str, wait: Wait) -> None:
    found = classify(code)
    assert (found.outcome, found.wait, found.alert_ops) == (Outcome.FREQUENCY, wait, False)


@pytest.mark.parametrize(
    "code",
    [
        "LimitExceeded.AppDailyLimit",
        "LimitExceeded.AppMainlandChinaDailyLimit",
        "LimitExceeded.AppGlobalDailyLimit",
        "LimitExceeded.AppCountryOrRegionDailyLimit",
        "LimitExceeded.DailyLimit",
    ],
)
def test_account_wide_caps_wait_for_the_next_day_and_alert_ops(code: str) -> None:
    found = classify(code)
    assert (found.outcome, found.wait, found.alert_ops) == (Outcome.ACCOUNT_LIMIT, Wait.NEXT_DAY, True)
    result = plan(ok=False, code=code, message="cap", serial=None, attempts=1, now=NOW, policy=RetryPolicy(),
                  rng=random.Random(1))  # fmt: skip
    assert isinstance(result, Retry)
    assert result.at.astimezone(CHINA) == datetime(2026, 1, 6, 0, 5, tzinfo=CHINA)


@pytest.mark.parametrize("code", ["LimitExceeded.AppCountryOrRegionInBlacklist", "LimitExceeded.PhoneNumberCountLimit"])
def test_these_limits_are_permanent(code: str) -> None:
    assert classify(code).outcome is Outcome.PERMANENT


@pytest.mark.parametrize("code", ["LimitExceeded.DeliveryFrequencyLimit", "LimitExceeded.GlobalSmsSendingRateLimit"])
def test_rate_limits_back_off_with_a_capped_number_of_attempts(code: str) -> None:
    policy = RetryPolicy()
    found = classify(code)
    assert found.outcome is Outcome.TRANSIENT
    assert found.max_attempts is not None
    assert found.max_attempts < policy.max_attempts
    steps = [step(code, attempts=n) for n in range(1, found.max_attempts + 1)]
    assert all(isinstance(s, Retry) for s in steps[:-1])
    assert isinstance(steps[-1], Final)
    assert steps[-1].status == "failed"
    first = steps[0]
    assert isinstance(first, Retry)
    assert first.at - NOW < timedelta(minutes=1)  # a backoff, not an hour's window


@pytest.mark.parametrize(
    "code",
    [
        "InternalError.Timeout",
        "LimitExceeded.PhoneNumberThirtySecondLimit",
        "LimitExceeded.PhoneNumberDailyLimit",
        "LimitExceeded.AppDailyLimit",
        "FailedOperation.MarketingSendTimeConstraint",
    ],
)
def test_nothing_is_retried_forever(code: str) -> None:
    policy = RetryPolicy()
    result = plan(ok=False, code=code, message="again", serial=None, attempts=policy.max_attempts, now=NOW,
                  policy=policy, rng=random.Random(1))  # fmt: skip
    assert isinstance(result, Final)
    assert result.status == "failed"
    assert "gave up after 6 attempts" in (result.error or "")


@pytest.mark.parametrize("code", ["ClientNetworkError", UNREADABLE, ""])
def test_a_send_that_may_have_gone_out_is_ambiguous(code: str) -> None:
    assert classify(code).outcome is Outcome.AMBIGUOUS


def test_a_retry_past_the_replys_deadline_expires_it() -> None:
    send_by = NOW + timedelta(hours=1)
    result = plan(ok=False, code="LimitExceeded.PhoneNumberDailyLimit", message="daily", serial=None, attempts=1,
                  now=NOW, policy=RetryPolicy(), rng=random.Random(1), send_by=send_by)  # fmt: skip
    assert isinstance(result, Final)
    assert (result.status, result.code) == ("expired", "LimitExceeded.PhoneNumberDailyLimit")
    assert "past the reply's deadline" in (result.error or "")
    soon = plan(ok=False, code="LimitExceeded.PhoneNumberThirtySecondLimit", message="", serial=None, attempts=1,
                now=NOW, policy=RetryPolicy(), rng=random.Random(1), send_by=send_by)  # fmt: skip
    assert isinstance(soon, Retry)


def test_a_code_nobody_has_seen_is_permanent_and_shown_to_ops() -> None:
    assert classify("FailedOperation.BrandNewThing") is UNKNOWN
    assert UNKNOWN.alert_ops
