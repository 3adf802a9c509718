"""RuleIndex: the first rule in file order wins, whatever kind of match it is, at any size."""

from __future__ import annotations

import itertools
import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from bot.rules.compiler import compile_file
from bot.rules.engine import decide
from bot.rules.matching import MatcherSpec, RuleIndex
from bot.rules.model import Conversation, InboundMessage
from bot.rules.normalize import NormalizedText

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)


def find(specs: list[MatcherSpec], text: str) -> int | None:
    hit = RuleIndex(specs).find(NormalizedText.of(text))
    return None if hit is None else hit.index


def rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)  # as the compiler does


# Each of these matches the message "stop now" in its own way.
KINDS: dict[str, MatcherSpec] = {
    "keywords": MatcherSpec(keywords=("STOP NOW",)),
    "first_word": MatcherSpec(first_word=("stop",)),
    "contains": MatcherSpec(contains=("now",)),
    "regex": MatcherSpec(regex=rx(r"stop\s+\w+")),
}
MISS = MatcherSpec(keywords=("nothing",), first_word=("never",), contains=("zzz",), regex=rx("x+"))


@pytest.mark.parametrize("order", list(itertools.permutations(KINDS)), ids="-".join)
def test_first_rule_in_file_order_wins_whatever_the_kinds(order: tuple[str, ...]) -> None:
    specs = [KINDS[kind] for kind in order]
    assert find(specs, "stop now") == 0
    assert find([MISS, *specs], "stop now") == 1
    assert find([MISS, MISS, *specs[::-1]], "STOP   NOW!") == 2


@pytest.mark.parametrize(
    ("specs", "text", "index"),
    [
        # the same keyword twice: the first rule keeps it
        ([MatcherSpec(keywords=("hi",)), MatcherSpec(keywords=("HI",))], "hi", 0),
        ([MatcherSpec(first_word=("hi",)), MatcherSpec(first_word=("Hi",))], "hi there", 0),
        ([MatcherSpec(contains=("退订",)), MatcherSpec(contains=("退订",))], "我要退订", 0),
        # a later rule's contains word appearing earlier in the text does not win
        ([MatcherSpec(contains=("订",)), MatcherSpec(contains=("我要",))], "我要退订", 0),
        (
            [MatcherSpec(contains=("zzz",)), MatcherSpec(contains=("退订",)), MatcherSpec(contains=("我",))],
            "我要退订",
            1,
        ),
        # a regex listed after a keyword hit is not preferred; one listed before is
        ([MatcherSpec(keywords=("123456",)), MatcherSpec(regex=rx(r"\d{6}"))], "123456", 0),
        ([MatcherSpec(regex=rx(r"\d{6}")), MatcherSpec(keywords=("123456",))], "123456", 0),
        ([MatcherSpec(regex=rx(r"\d{5}")), MatcherSpec(keywords=("123456",))], "123456", 1),
        ([MatcherSpec(regex=rx(r"a+")), MatcherSpec(regex=rx(r"\w+"))], "aaa", 0),
        ([MatcherSpec(regex=rx(r"b+")), MatcherSpec(regex=rx(r"\w+"))], "aaa", 1),
        # regex is a full match on the trimmed text
        ([MatcherSpec(regex=rx(r"\d{6}"))], "code 123456", None),
        ([MatcherSpec(regex=rx(r"\d{6}"))], "  123456。", 0),
        # nothing matches
        ([MatcherSpec(keywords=("a",)), MatcherSpec(contains=("b",))], "ccc", None),
        ([], "anything", None),
    ],
)
def test_rule_order_cases(specs: list[MatcherSpec], text: str, index: int | None) -> None:
    assert find(specs, text) == index


@pytest.mark.parametrize(
    ("spec", "text", "captures"),
    [
        (MatcherSpec(regex=rx(r"(?P<code>\d{6})")), "123456", {"code": "123456", "keyword": ""}),
        (MatcherSpec(regex=rx(r"(?P<a>\d+)(?:-(?P<b>\d+))?")), "12", {"a": "12", "b": "", "keyword": ""}),
        # a rule with both kinds: the side that did not fire reads as "" (never undefined)
        (
            MatcherSpec(keywords=("ORDER",), regex=rx(r"order (?P<n>\d+)")),
            "order 42",
            {"n": "42", "keyword": ""},
        ),
        (MatcherSpec(keywords=("ORDER",), regex=rx(r"order (?P<n>\d+)")), "order", {"n": "", "keyword": "ORDER"}),
        (MatcherSpec(keywords=("Ｍｅｎｕ",)), "menu", {"keyword": "Ｍｅｎｕ"}),
        (MatcherSpec(contains=("退订",)), "我要退订", {"keyword": "退订"}),
    ],
)
def test_captures(spec: MatcherSpec, text: str, captures: dict[str, str]) -> None:
    hit = RuleIndex([spec]).find(NormalizedText.of(text))
    assert hit is not None
    assert hit.captures == captures


# ---------------------------------------------------------------- 10,000 keywords

N = 10_000


@pytest.fixture(scope="module")
def big_indexes() -> dict[str, RuleIndex]:
    return {
        "keywords": RuleIndex([MatcherSpec(keywords=(f"kw{i}",)) for i in range(N)]),
        "first_word": RuleIndex([MatcherSpec(first_word=(f"fw{i}",)) for i in range(N)]),
        "contains": RuleIndex([MatcherSpec(contains=(f"c{i:05d}",)) for i in range(N)]),
        "one_rule": RuleIndex([MatcherSpec(keywords=tuple(f"w{i}" for i in range(N)))]),
    }


@pytest.mark.parametrize(
    ("index", "text", "expected"),
    [
        ("keywords", "kw0", 0),
        ("keywords", "KW5000", 5000),
        ("keywords", "kw9999!", 9999),
        ("keywords", "kw10000", None),
        ("keywords", "kw1 kw2", None),
        ("first_word", "fw9999 please", 9999),
        ("first_word", "FW42", 42),
        ("first_word", "please fw1", None),
        ("contains", "xxc07777yy", 7777),
        ("contains", "c09999 and c00003", 3),
        ("contains", "c5", None),
        ("contains", "c10000", None),
        ("one_rule", "w9999", 0),
        ("one_rule", "w0", 0),
        ("one_rule", "w10000", None),
    ],
)
def test_ten_thousand_keywords(big_indexes: dict[str, RuleIndex], index: str, text: str, expected: int | None) -> None:
    hit = big_indexes[index].find(NormalizedText.of(text))
    assert (None if hit is None else hit.index) == expected


def test_ten_thousand_keywords_in_a_rule_file() -> None:
    keywords = ", ".join(f"P{i}" for i in range(N))
    text = f"""\
signature: Big
templates:
  hit: {{id: "1", text: "product {{1}}"}}
  miss: {{id: "2", text: "unknown product"}}
states:
  s:
    on:
      - keywords: [{keywords}]
        reply: hit
        params: ["{{{{ match.keyword }}}}"]
otherwise: {{reply: miss}}
"""
    result = compile_file(text, path="big.yaml", name="big.yaml")
    assert [str(d) for d in result.diagnostics if d.is_error] == []
    assert result.compiled is not None
    got = [
        decide(result.compiled, Conversation(), InboundMessage(text=t, sign="Big"), NOW).replies[0].text
        for t in ("p0", "P4321", "ｐ９９９９", "P10000")
    ]
    assert got == ["product P0", "product P4321", "product P9999", "unknown product"]


def _lookup_seconds(index: RuleIndex, texts: list[NormalizedText]) -> float:
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for text in texts:
            index.find(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("kind", ["keywords", "first_word", "contains"])
def test_lookup_cost_does_not_grow_with_the_number_of_keywords(kind: str) -> None:
    def spec(i: int) -> MatcherSpec:
        fields: dict[str, Any] = {kind: (f"k{i:05d}",)}
        return MatcherSpec(**fields)

    def build(n: int) -> RuleIndex:
        return RuleIndex([spec(i) for i in range(n)])

    small, big = build(10), build(N)
    texts = [
        NormalizedText.of(t) for t in ("k00003", "hello there", "k00009 now", "退订", "👍", "no match at all")
    ] * 300
    # the same answers ...
    assert [small.find(t) for t in texts[:6]] == [big.find(t) for t in texts[:6]]
    # ... at about the same cost: a scan of every rule would be hundreds of times slower
    ratio = _lookup_seconds(big, texts) / _lookup_seconds(small, texts)
    assert ratio < 3, ratio


@pytest.mark.parametrize(
    ("spec", "text", "hit"),
    [
        (MatcherSpec(keywords=("👍",)), "👍🏽", True),  # a skin tone is its base emoji
        (MatcherSpec(keywords=("❤️",)), "❤", True),  # so is a variation selector
        (MatcherSpec(keywords=("👍",)), "😀👍", False),  # a run of emoji is one word
        (MatcherSpec(first_word=("✅",)), "✅ done, thanks", True),
        (MatcherSpec(first_word=("✅",)), "done ✅", False),
        (MatcherSpec(contains=("🙏",)), "thank you 🙏🏼", True),
        (MatcherSpec(keywords=("STOP",)), "STOP 😡", True),  # edge emoji stay decoration of a worded message
    ],
)
def test_emoji_keywords_are_words(spec: MatcherSpec, text: str, hit: bool) -> None:
    assert (find([spec], text) == 0) is hit
