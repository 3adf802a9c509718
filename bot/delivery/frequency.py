"""Tencent's per-number frequency limits, enforced before calling Tencent.

Tencent refuses a send that breaks a number's limits (the same content twice
in 30 seconds, N per hour, N per China day) with a ``LimitExceeded`` code.
Sending anyway only burns a request and a failed attempt; worse, the reply
then waits for a retry plan guessed from the error. Knowing what we sent, we
can tell beforehand when a reply may go and hold it until then: it is
deferred, never dropped.

Pure: the outbox hands in what was sent to the number recently and the time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from bot.numbers import next_china_midnight


@dataclass(frozen=True)
class FrequencyLimits:
    """The limits Tencent applies to one phone number (``None`` or zero: no limit).

    The defaults are Tencent's defaults for a new account; accounts with other
    limits set in Tencent's console should set the same here.
    """

    same_content: timedelta | None = timedelta(seconds=30)
    per_hour: int | None = None
    per_day: int | None = 10

    @property
    def enabled(self) -> bool:
        return bool(self.same_content or self.per_hour or self.per_day)

    @property
    def lookback(self) -> timedelta:
        """How far back sends matter: a China day can be up to 24 hours long."""
        return max(
            timedelta(days=1) if self.per_day else timedelta(0),
            timedelta(hours=1) if self.per_hour else timedelta(0),
            self.same_content or timedelta(0),
        )


NO_LIMITS = FrequencyLimits(same_content=None, per_hour=None, per_day=None)


@dataclass(frozen=True)
class Sent:
    """One earlier send to the number: when, and what it said."""

    at: datetime
    content: str


def earliest_send(history: Sequence[Sent], content: str, now: datetime, limits: FrequencyLimits) -> datetime | None:
    """When a send of ``content`` to this number would keep within ``limits``: ``None`` if now is fine.

    ``history`` holds the number's earlier sends (any order, older ones are ignored).
    """
    wait_until: datetime | None = None

    def later(at: datetime) -> None:
        nonlocal wait_until
        if at > now and (wait_until is None or at > wait_until):
            wait_until = at

    if limits.same_content:
        for sent in history:
            if sent.content == content and now - sent.at < limits.same_content:
                later(sent.at + limits.same_content)
    if limits.per_hour:
        hour = sorted(sent.at for sent in history if now - sent.at < timedelta(hours=1))
        if len(hour) >= limits.per_hour:
            # The window frees up when the oldest of the last per_hour sends is an hour old.
            later(hour[len(hour) - limits.per_hour] + timedelta(hours=1))
    if limits.per_day:
        day_start = next_china_midnight(now) - timedelta(days=1)
        today = sum(1 for sent in history if sent.at >= day_start)
        if today >= limits.per_day:
            later(next_china_midnight(now))
    return wait_until
