"""Text normalisation shared by keywords (at load time) and messages (at match time).

Customers type on every kind of phone: full-width letters from a Chinese IME,
a trailing "。" or "!!", a keyword in lower case, an emoji after STOP. Both
sides of every comparison go through the same function so that what a
marketer writes in a rule file matches what a customer means.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

_SPACE_RE = re.compile(r"\s+")


@lru_cache(maxsize=4096)
def _is_edge_junk(ch: str) -> bool:
    """Characters ignored at either end of a message: whitespace, punctuation, symbols, emoji parts."""
    if ch.isspace():
        return True
    cat = unicodedata.category(ch)
    if cat[0] in ("P", "S", "Z") or cat in ("Cc", "Cf", "Cn", "Co"):
        return True
    # Variation selectors and combining enclosing keycaps belong to emoji.
    return "\ufe00" <= ch <= "\ufe0f" or ch == "\u20e3"


def _strip_edges(text: str) -> str:
    start, end = _strip(text, _is_edge_junk)
    return text[start:end]


def clean(text: str) -> str:
    """``text`` with lone UTF-16 surrogates (half an emoji from a broken client) and NUL replaced by U+FFFD.

    Such text cannot be encoded as UTF-8 or stored in PostgreSQL, so it could
    never be stored or sent; refusing it would make Tencent retry forever.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored as it is (a NUL, a lone UTF-16 surrogate), or None when it can.

    For input whose sender can correct it (the start API, console forms), which is
    refused with this reason rather than repaired by ``clean``.
    """
    if "\x00" in text:
        return "contains a NUL character (U+0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (half of a character), which is not text"
    return None


def trim(text: str) -> str:
    """NFKC, surrounding whitespace removed and inner whitespace collapsed; case and punctuation kept.

    This is what regular expressions see, and what templates get as ``text``.
    """
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFKC", clean(text))).strip()


_DROPPED = {
    **dict.fromkeys(range(0xFE00, 0xFE10)),  # variation selectors: ❤️ and ❤ are one heart
    **dict.fromkeys(range(0x1F3FB, 0x1F400)),  # skin tones: 👍🏽 is a 👍
}
"""Emoji modifiers that change how a symbol looks, not what the customer says."""


@lru_cache(maxsize=4096)
def _is_edge_space(ch: str) -> bool:
    """What is ignored at the edges even of a message made only of emoji: everything but the symbols."""
    return _is_edge_junk(ch) and unicodedata.category(ch) != "So"


def _strip(text: str, junk: Callable[[str], bool]) -> tuple[int, int]:
    start, end = 0, len(text)
    while start < end and junk(text[start]):
        start += 1
    while end > start and junk(text[end - 1]):
        end -= 1
    return start, end


def _strip_wide(text: str) -> str:
    start, end = _strip(text, _is_edge_space)
    return text[start:end]


def _forms(text: str) -> tuple[str, str]:
    """The comparison form, and the same with the emoji at its edges kept (what ``contains`` searches).

    Emoji and other pictographs (Unicode category So) at the edges are
    decoration of a worded message (``STOP 😡`` is ``stop``), but a message
    made only of them is a word like any other (``👍``): then the comparison
    form is the pictographs themselves, spaces collapsed, so a run without
    spaces is one word (``😀👍`` is not ``👍``).
    """
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    if not folded.isascii() and max(folded) >= "\ufe00":  # (C-speed checks: this runs for every message)
        folded = folded.translate(_DROPPED)
    start, end = _strip(folded, _is_edge_junk)
    words = _SPACE_RE.sub(" ", folded[start:end]).strip()
    if (start == 0 and end == len(folded)) or folded.isascii():
        return words, words  # nothing stripped, or nothing that could be a pictograph (the usual message)
    wide_start, wide_end = _strip(folded, _is_edge_space)
    if (wide_start, wide_end) == (start, end):
        return words, words
    wide = _SPACE_RE.sub(" ", folded[wide_start:wide_end]).strip()
    return words or wide, wide


def normalize(text: str) -> str:
    """The comparison form: NFKC, case-folded, emoji modifiers and edge punctuation/whitespace gone, spaces collapsed.

    A message made only of emoji keeps them (see ``_forms``).
    """
    return _forms(text)[0]


@dataclass(frozen=True)
class NormalizedText:
    """A message prepared once for every kind of matching."""

    raw: str
    trimmed: str
    trimmed_bare: str
    """``trimmed`` with surrounding punctuation removed too (a second chance for regexes)."""
    normalized: str
    first_word: str
    with_emoji: str = ""
    """``normalized`` with the emoji at its edges kept: ``contains`` finds 👍 in ``thanks 👍``."""
    emoji_first_word: str = ""
    """The first word when emoji count as words (``👍`` in ``👍 thanks``), if it differs from ``first_word``."""

    @classmethod
    def of(cls, text: str) -> NormalizedText:
        trimmed = trim(text)
        normalized, with_emoji = _forms(text)
        # ``normalized`` is already NFKC and case-folded: only the word's own edges need trimming.
        head = normalized.split(" ", 1)[0]
        first = _strip_edges(head) or _strip_wide(head)  # the second: a message made only of emoji
        emoji_first = ""
        if with_emoji is not normalized and with_emoji:
            candidate = _strip_wide(with_emoji.split(" ", 1)[0])
            emoji_first = candidate if candidate != first else ""
        return cls(
            raw=text,
            trimmed=trimmed,
            trimmed_bare=_strip_edges(trimmed),
            normalized=normalized,
            first_word=first,
            with_emoji=with_emoji,
            emoji_first_word=emoji_first,
        )
