"""What to do after a send, decided from Tencent's answer by the one error table.

Pure: given the answer, how many attempts were made, the time and a random
source for jitter, it says "done" (sent or failed for good) or "try again at".
The outbox applies the plan; tests check every class with a frozen clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from bot.numbers import CHINA, next_china_time
from bot.tencent.errors import ErrorClass, Outcome, Wait, classify

MARKETING_OPENS = time(8, 0)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures."""

    max_attempts: int = 6
    base: timedelta = timedelta(seconds=5)
    cap: timedelta = timedelta(minutes=10)
    jitter: float = 0.2
    """Each delay is scaled by a random factor in [1 - jitter, 1 + jitter]."""


@dataclass(frozen=True)
class Final:
    status: str  # sent | failed | ambiguous | expired
    code: str | None
    error: str | None
    error_class: ErrorClass
    serial: str | None = None


@dataclass(frozen=True)
class Retry:
    at: datetime
    attempts: int
    code: str
    error: str


MARKETING_CLOSES = time(22, 0)


def marketing_hours(now: datetime) -> bool:
    """Whether marketing SMS may be sent now: 08:00-22:00 China time."""
    return MARKETING_OPENS <= now.astimezone(CHINA).time() < MARKETING_CLOSES


def next_marketing_opening(now: datetime) -> datetime:
    return next_china_time(now, MARKETING_OPENS)


DAILY_RESET = time(0, 5)
"""Tencent's daily limits start again at midnight China time; five minutes' margin for its clock."""

_WAITS: dict[Wait, Callable[[datetime], datetime]] = {
    Wait.THIRTY_SECONDS: lambda now: now + timedelta(seconds=30),
    Wait.ONE_HOUR: lambda now: now + timedelta(hours=1),
    Wait.NEXT_DAY: lambda now: next_china_time(now, DAILY_RESET),
    Wait.MARKETING_HOURS: lambda now: next_china_time(now, MARKETING_OPENS),
}


def plan(
    *,
    ok: bool,
    code: str,
    message: str,
    serial: str | None,
    attempts: int,
    now: datetime,
    policy: RetryPolicy,
    rng: random.Random,
    send_by: datetime | None = None,
) -> Final | Retry:
    """The next step for a reply whose ``attempts``-th send (counting this one) answered ``code``.

    Nothing is retried forever: every retryable class stops after the policy's
    attempts (or its own tighter bound), and a retry that would go out after
    ``send_by`` (the reply's ``reply_max_delay``) expires the reply instead: a
    late answer confuses the customer more than none.
    """
    if ok:
        return Final("sent", None, None, classify("Ok"), serial=serial)
    kind = classify(code)
    if kind.outcome is Outcome.AMBIGUOUS:
        # Tencent may have sent it: never resend blindly; a delivery report (SessionContext) or ops settles it.
        return Final("ambiguous", code or "NoAnswer", message or "no readable answer from Tencent", kind)
    if not kind.retryable:
        return Final("failed", code, message, kind)
    limit = min(policy.max_attempts, kind.max_attempts or policy.max_attempts)
    if attempts >= limit:
        return Final("failed", code, f"{message} (gave up after {attempts} attempts)", kind)
    if kind.wait is not None:
        at = _WAITS[kind.wait](now)
    else:
        delay = min(policy.cap, policy.base * (2 ** (attempts - 1)))
        at = now + delay * (1 + rng.uniform(-policy.jitter, policy.jitter))
    if send_by is not None and at > send_by:
        reason = f"{code}: the next try ({at.astimezone(CHINA):%Y-%m-%d %H:%M} China time) is past the reply's deadline"
        return Final("expired", code, f"{reason}; {message}" if message else reason, kind)
    return Retry(at, attempts, code, message)
