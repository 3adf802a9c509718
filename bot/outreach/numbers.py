"""Phone numbers as people type them on the command line: ``+85291234567``, ``13800138000`` (= +86).

The country code of an E.164 number has 1 to 3 digits and no separator, so
splitting it takes the country-code table: Google's libphonenumber
(``phonenumbers``) knows it.
"""

from __future__ import annotations

import phonenumbers

from bot.outreach.check import StartRefused, check_number


def parse_number(text: str, *, field_name: str = "number") -> tuple[str, str]:
    """``(nationcode, mobile)`` of ``text``; without ``+`` (or ``00``) it is a Chinese mainland number."""
    raw = text.strip()
    if raw.startswith("00"):
        raw = "+" + raw[2:]
    try:
        parsed = phonenumbers.parse(raw, None if raw.startswith("+") else "CN")
    except phonenumbers.NumberParseException as exc:
        raise StartRefused(field_name, f"{text!r} is not a phone number ({exc})") from None
    if not phonenumbers.is_possible_number(parsed):
        raise StartRefused(field_name, f"{text!r} is not a possible phone number for +{parsed.country_code}")
    return check_number(str(parsed.country_code), phonenumbers.national_significant_number(parsed))
