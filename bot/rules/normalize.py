"""Text normalisation shared by keywords (at load time) and messages (at match time).

Customers type on every kind of phone: full-width letters from a Chinese IME,
a trailing "。" or "!!", a keyword in lower case, an emoji after STOP. Both
sides of every comparison go through the same function so that what a
marketer writes in a rule file matches what a customer means.
"""

from __future__ import annotations

import re
import unicodedata
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
    start, end = 0, len(text)
    while start < end and _is_edge_junk(text[start]):
        start += 1
    while end > start and _is_edge_junk(text[end - 1]):
        end -= 1
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


def trim(text: str) -> str:
    """NFKC, surrounding whitespace removed and inner whitespace collapsed; case and punctuation kept.

    This is what regular expressions see, and what templates get as ``text``.
    """
    return _SPACE_RE.sub(" ", unicodedata.normalize("NFKC", clean(text))).strip()


def normalize(text: str) -> str:
    """The comparison form: NFKC, case-folded, edge punctuation/whitespace gone, spaces collapsed."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    return _SPACE_RE.sub(" ", _strip_edges(folded)).strip()


@dataclass(frozen=True)
class NormalizedText:
    """A message prepared once for every kind of matching."""

    raw: str
    trimmed: str
    trimmed_bare: str
    """``trimmed`` with surrounding punctuation removed too (a second chance for regexes)."""
    normalized: str
    first_word: str

    @classmethod
    def of(cls, text: str) -> NormalizedText:
        trimmed = trim(text)
        normalized = normalize(text)
        # ``normalized`` is already NFKC and case-folded: only the word's own edges need trimming.
        first = _strip_edges(normalized.split(" ", 1)[0]) if normalized else ""
        return cls(
            raw=text,
            trimmed=trimmed,
            trimmed_bare=_strip_edges(trimmed),
            normalized=normalized,
            first_word=first,
        )
