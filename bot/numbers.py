"""Phone numbers as personal data, and China time: the two things every layer formats the same way.

Numbers are masked wherever they leave the database (logs, the console,
exports) in one form, ``138****0000``, so ops recognise a customer across all
of them. Times are stored in UTC but Tencent, the customers and the marketing
hours all live on China time (UTC+8, no daylight saving), so the pipeline's
day boundaries and Tencent's timestamps are computed here, once.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, time, timedelta, timezone

CHINA = timezone(timedelta(hours=8), "China time")
CHINA_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
"""How Tencent writes a China-time moment in its delivery-status callback."""


def mask_number(mobile: str) -> str:
    """138****0000: enough for ops to recognise a number in logs, not enough to misuse it."""
    if len(mobile) <= 4:
        return "*" * len(mobile)
    keep_head = 3 if len(mobile) >= 10 else 0
    return mobile[:keep_head] + "*" * (len(mobile) - keep_head - 4) + mobile[-4:]


_CN_MOBILE = re.compile(r"(?<![\d+])(?:86)?1[3-9]\d{9}(?!\d)")
"""Mainland mobiles, with or without the 86 country code: 11 digits from 13x to 19x."""
_E164 = re.compile(r"(?<![\w+])\+\d{7,15}(?!\d)")
"""Any number written the E.164 way (Tencent's PhoneNumber fields: +8613800000000)."""
_NAMED = re.compile(
    r"""(?ix)
    (\b(?:mobile|phone|phonenumber|phone_number|subscribernumber|msisdn)["']?\s*[:=]\s*["']?)
    (\d{5,15})(?!\d)
    """
)
"""A short international number stored without its country code (``mobile: 91234567``) is only
recognisable by the field it sits in."""


def mask_phone_numbers(text: str) -> str:
    """``text`` with every mobile-looking number masked the way the console shows it."""
    if not any(ch.isdigit() for ch in text):
        return text
    text = _E164.sub(lambda m: "+" + mask_number(m.group()[1:]), text)
    text = _CN_MOBILE.sub(lambda m: mask_number(m.group()), text)
    return _NAMED.sub(lambda m: m.group(1) + mask_number(m.group(2)), text)


def next_china_time(now: datetime, at: time) -> datetime:
    """The next moment after ``now`` when China's clocks read ``at`` (today's, or tomorrow's)."""
    local = now.astimezone(CHINA)
    candidate = local.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
    if candidate <= local:
        candidate += timedelta(days=1)
    return candidate


def next_china_midnight(now: datetime) -> datetime:
    """The start of the next China calendar day: when Tencent's daily limits start again."""
    local = now.astimezone(CHINA)
    return local.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def parse_china_time(text: str) -> datetime | None:
    """Tencent's ``'YYYY-MM-DD HH:MM:SS'`` China time as an aware UTC datetime, or None if it is not one."""
    try:
        return datetime.strptime(text.strip(), CHINA_TIME_FORMAT).replace(tzinfo=CHINA).astimezone(UTC)
    except ValueError:
        return None


def format_china_time(moment: datetime) -> str:
    """``moment`` the way Tencent writes China time (the inverse of ``parse_china_time``)."""
    return moment.astimezone(CHINA).strftime(CHINA_TIME_FORMAT)
