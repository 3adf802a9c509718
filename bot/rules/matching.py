"""Finding the first matching rule without looking at every rule.

A state may hold thousands of keywords (product codes, store names, campaign
words). Exact and first-word keywords live in hash tables, ``contains``
keywords in one Aho-Corasick automaton, so the cost of a lookup depends on the
message, not on how many keywords there are. Only regexes are tried one by
one, and only those listed before the best hash hit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import ahocorasick

from bot.rules.normalize import NormalizedText, normalize


@dataclass(frozen=True)
class MatcherSpec:
    """The match part of one rule, with keywords as written in the file."""

    keywords: tuple[str, ...] = ()
    first_word: tuple[str, ...] = ()
    contains: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None


@dataclass(frozen=True)
class Hit:
    """Which rule matched, and what it captured (``match`` in templates)."""

    index: int
    captures: dict[str, str] = field(default_factory=dict)


class RuleIndex:
    """The rules of one section (a state, ``anywhere``, opt-out ...) prepared for lookup."""

    def __init__(self, specs: Sequence[MatcherSpec]) -> None:
        self._exact: dict[str, tuple[int, str]] = {}
        self._first: dict[str, tuple[int, str]] = {}
        self._contains: ahocorasick.Automaton | None = None
        self._regexes: list[tuple[int, re.Pattern[str]]] = []
        # Every name a rule's templates may read from ``match``, "" unless the matcher that fired sets it.
        self._blank: list[dict[str, str]] = [
            {"keyword": "", **(dict.fromkeys(spec.regex.groupindex, "") if spec.regex else {})} for spec in specs
        ]
        automaton = ahocorasick.Automaton()
        for index, spec in enumerate(specs):
            for word in spec.keywords:
                self._exact.setdefault(normalize(word), (index, word))
            for word in spec.first_word:
                self._first.setdefault(normalize(word), (index, word))
            for word in spec.contains:
                key = normalize(word)
                if key and (not automaton.exists(key) or automaton.get(key)[0] > index):
                    automaton.add_word(key, (index, word))
            if spec.regex is not None:
                self._regexes.append((index, spec.regex))
        if len(automaton):
            automaton.make_automaton()
            self._contains = automaton

    def find(self, text: NormalizedText) -> Hit | None:
        """The first rule in file order that matches ``text``."""
        best: tuple[int, str] | None = self._exact.get(text.normalized)
        for word in (text.first_word, text.emoji_first_word) if text.emoji_first_word else (text.first_word,):
            first = self._first.get(word)
            if first is not None and (best is None or first[0] < best[0]):
                best = first
        searched = text.with_emoji or text.normalized
        if self._contains is not None and searched:
            for _end, value in self._contains.iter(searched):
                if best is None or value[0] < best[0]:
                    best = value
        for index, pattern in self._regexes:
            if best is not None and index > best[0]:
                break
            m = pattern.fullmatch(text.trimmed) or pattern.fullmatch(text.trimmed_bare)
            if m is not None:
                captures = dict(self._blank[index])
                captures.update({k: v if v is not None else "" for k, v in m.groupdict().items()})
                return Hit(index, captures)
        if best is None:
            return None
        return Hit(best[0], {**self._blank[best[0]], "keyword": best[1]})

    def covering(self, word: str, kind: str) -> int | None:
        """The first rule that takes every message a ``kind`` keyword ``word`` would match, if any.

        An exact keyword is taken by any rule matching that exact text; a
        first-word keyword only by an earlier first-word keyword or a contained
        substring; a ``contains`` keyword only by a shorter ``contains``.
        """
        if kind == "keywords":
            hit = self.find(NormalizedText.of(word))
            return hit.index if hit is not None else None
        key = normalize(word)
        found: list[int] = []
        if kind == "first_word" and key in self._first:
            found.append(self._first[key][0])
        if self._contains is not None and key:
            found.extend(value[0] for _end, value in self._contains.iter(key))
        return min(found) if found else None
