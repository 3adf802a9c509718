"""How many SMS a text costs.

Tencent bills per segment, and a long reply can silently triple the bill.
Rule files preview every reply with its length and segment count so marketers
see that before customers do. Counting follows GSM 03.38: a text made only of
GSM-7 characters is 160 per SMS (153 per segment when split), extension
characters count twice; any other text is UCS-2, 70 per SMS and 67 per
segment, counted in UTF-16 code units (an emoji outside the BMP costs two).

That is also Tencent's rule for global SMS (numbers outside the Chinese
mainland, no signature) since 2025-10-13, where "certain emoji, rare Chinese
characters and special symbols" count as two or more, and Malaysia (+60),
whose carriers add a 7-character prefix, splits at 153/146 and 63/60. Mainland
texts carry the 【signature】, which is never GSM-7: 70, then 67 per segment.
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


_SPLITS: dict[str, dict[Encoding, tuple[int, int, int]]] = {
    # nationcode -> encoding -> (one SMS up to, first segment, further segments)
    "60": {"GSM-7": (153, 146, 153), "UCS-2": (63, 60, 67)},
}
_DEFAULT_SPLIT: dict[Encoding, tuple[int, int, int]] = {"GSM-7": (160, 153, 153), "UCS-2": (70, 67, 67)}


def sms_length(text: str, *, nationcode: str = "86") -> SmsLength:
    """Measure ``text`` as one SMS body would be encoded and billed for a number in ``nationcode``."""
    encoding: Encoding
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text):
        units = sum(2 if ch in _GSM7_EXTENDED else 1 for ch in text)
        encoding = "GSM-7"
    else:
        units = len(text.encode("utf-16-le", "surrogatepass")) // 2
        encoding = "UCS-2"
    single, first, multi = _SPLITS.get(nationcode, _DEFAULT_SPLIT)[encoding]
    if units <= single:
        segments = 1 if units else 0
    else:
        segments = 1 + -(-(units - first) // multi)
    return SmsLength(encoding=encoding, length=units, segments=segments)
