"""What to do after a send, decided from Tencent's answer by the one error table.

Pure: given the answer, how many attempts were made, the time and a random
source for jitter, it says "done" (sent or failed for good) or "try again at".
The outbox applies the plan; tests check every class with a frozen clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from bot.numbers import CHINA, next_china_time
from bot.tencent.errors import ErrorClass, Outcome, classify

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
    status: str  # sent | failed | ambiguous
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


FREQUENCY_WAITS: dict[str, timedelta] = {
    "LimitExceeded.PhoneNumberThirtySecondLimit": timedelta(seconds=30),
    "LimitExceeded.PhoneNumberOneHourLimit": timedelta(hours=1),
    "LimitExceeded.DeliveryFrequencyLimit": timedelta(hours=1),
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
) -> Final | Retry:
    """The next step for a reply whose ``attempts``-th send (counting this one) answered ``code``."""
    if ok:
        return Final("sent", None, None, classify("Ok"), serial=serial)
    kind = classify(code)
    if kind.outcome is Outcome.AMBIGUOUS:
        # Tencent may have sent it: never resend blindly; a delivery report (SessionContext) or ops settles it.
        return Final("ambiguous", code or "NoAnswer", message or "no readable answer from Tencent", kind)
    if kind.outcome is Outcome.FREQUENCY:
        if code == "FailedOperation.MarketingSendTimeConstraint":
            return Retry(next_china_time(now, MARKETING_OPENS), attempts, code, message)
        wait = FREQUENCY_WAITS.get(code)
        at = now + wait if wait is not None else next_china_time(now, time(0, 5))  # daily limits reset at midnight
        return Retry(at, attempts, code, message)
    if kind.outcome is Outcome.TRANSIENT and attempts < policy.max_attempts:
        delay = min(policy.cap, policy.base * (2 ** (attempts - 1)))
        factor = 1 + rng.uniform(-policy.jitter, policy.jitter)
        return Retry(now + delay * factor, attempts, code, message)
    if kind.outcome is Outcome.TRANSIENT:
        return Final("failed", code, f"{message} (gave up after {attempts} attempts)", kind)
    return Final("failed", code, message, kind)
