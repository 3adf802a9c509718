"""How many SMS a text costs.

Tencent bills per segment, and a long reply can silently triple the bill.
Rule files preview every reply with its length and segment count so marketers
see that before customers do. Counting follows GSM 03.38: a text made only of
GSM-7 characters is 160 per SMS (153 per segment when split), extension
characters count twice; any other text is UCS-2, 70 per SMS and 67 per
segment, counted in UTF-16 code units (an emoji outside the BMP costs two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")

Encoding = Literal["GSM-7", "UCS-2"]


@dataclass(frozen=True)
class SmsLength:
    """Length in the units the network counts, and the number of SMS it takes."""

    encoding: Encoding
    length: int
    segments: int


def sms_length(text: str) -> SmsLength:
    """Measure ``text`` as one SMS body would be encoded."""
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text):
        units = sum(2 if ch in _GSM7_EXTENDED else 1 for ch in text)
        single, multi = 160, 153
        encoding: Encoding = "GSM-7"
    else:
        units = len(text.encode("utf-16-le", "surrogatepass")) // 2
        single, multi = 70, 67
        encoding = "UCS-2"
    if units <= single:
        segments = 1 if units else 0
    else:
        segments = -(-units // multi)
    return SmsLength(encoding=encoding, length=units, segments=segments)
