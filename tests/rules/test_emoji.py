"""Customers answer with emoji: a keyword made of emoji is a word like any other.

What a marketer notices: ``👍`` in ``keywords``, ``first_word``, ``contains``
and the opt-out list fires for the customer's 👍, 👍🏽 or 👍🏿 (skin tones and
variation selectors match their base emoji), a run of emoji without spaces is
one word (``😀👍`` is not ``👍``), and emoji at the edges of a worded message
stay decoration (``STOP 😡`` still opts out).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.rules.compiler import compile_file
from bot.rules.engine import decide
from bot.rules.matching import MatcherSpec, RuleIndex
from bot.rules.model import CompiledFile, Conversation, InboundMessage
from bot.rules.normalize import NormalizedText, normalize
from tests.support import compile_text

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)

RULES = """\
signature: Emoji Shop
templates:
  liked: {id: "1", text: "Glad you like it"}
  loved: {id: "2", text: "We love you too"}
  done:  {id: "3", text: "Marked as done"}
  thanks: {id: "4", text: "Thank you"}
  bye:   {id: "5", text: "No more messages. Reply START to rejoin."}
  menu:  {id: "6", text: "Reply 1 or 2"}
  other: {id: "7", text: "Sorry?"}
opt_out: {keywords: [STOP, TD, 退订, 🛑], reply: bye}
start: idle
states:
  idle:
    on:
      - keywords: [👍, "👌"]
        reply: liked
      - keywords: [❤️]
        reply: loved
      - first_word: [✅]
        reply: done
      - contains: [🙏]
        reply: thanks
      - keywords: [MENU]
        reply: menu
    otherwise: {reply: other}
"""


@pytest.fixture(scope="module")
def rules() -> CompiledFile:
    return compile_text(RULES, "emoji.yaml", warnings=False)


def answer(rules: CompiledFile, text: str) -> str | None:
    decision = decide(rules, Conversation(), InboundMessage(text=text, sign="Emoji Shop"), NOW)
    return decision.replies[0].template if decision.replies else None


@pytest.mark.parametrize(
    ("text", "template"),
    [
        # keywords: the emoji, with any skin tone, variation selector or punctuation around it
        ("👍", "liked"),
        ("👍🏻", "liked"),
        ("👍🏽", "liked"),
        ("👍🏿", "liked"),
        (" 👍! ", "liked"),
        ("👌", "liked"),
        ("❤️", "loved"),
        ("❤", "loved"),
        ("❤\ufe0e", "loved"),
        # a run of emoji is one word, and two emoji apart are two words: neither is the keyword
        ("😀👍", "other"),
        ("👍👍", "other"),
        ("👍 👍", "other"),
        ("👍 thanks", "other"),
        # first_word: the first word may be an emoji, the rest is anything
        ("✅", "done"),
        ("✅ all good", "done"),
        ("✅🏾 all good", "done"),
        ("✅✅ all good", "other"),
        # contains: anywhere, edges included
        ("great, 🙏", "thanks"),
        ("🙏🏼 great", "thanks"),
        ("many thanks 🙏🙏", "thanks"),
        # emoji at the edges of a worded message are still decoration
        ("MENU 😀", "menu"),
        ("😀 menu", "menu"),
        ("😀", "other"),
    ],
)
def test_emoji_keywords_in_every_kind_of_match(rules: CompiledFile, text: str, template: str) -> None:
    assert answer(rules, text) == template


@pytest.mark.parametrize("text", ["🛑", "🛑🏻", " 🛑 ", "STOP 😡", "退订🙏"])
def test_an_emoji_in_the_opt_out_list_opts_out(rules: CompiledFile, text: str) -> None:
    decision = decide(rules, Conversation(), InboundMessage(text=text, sign="Emoji Shop"), NOW)
    assert decision.opt_change == "opt_out"
    assert [r.template for r in decision.replies] == ["bye"]


def test_two_emoji_opt_out_words_run_together_are_not_an_opt_out(rules: CompiledFile) -> None:
    decision = decide(rules, Conversation(), InboundMessage(text="🛑🛑", sign="Emoji Shop"), NOW)
    assert decision.opt_change is None


@pytest.mark.parametrize(
    ("text", "first_word", "emoji_first_word", "with_emoji"),
    [
        ("👍", "👍", "", "👍"),
        ("👍🏽 thanks", "thanks", "👍", "👍 thanks"),
        ("thanks 👍", "thanks", "", "thanks 👍"),
        ("STOP now", "stop", "", "stop now"),
    ],
)
def test_what_the_matchers_see(text: str, first_word: str, emoji_first_word: str, with_emoji: str) -> None:
    seen = NormalizedText.of(text)
    assert (seen.first_word, seen.emoji_first_word, seen.with_emoji) == (first_word, emoji_first_word, with_emoji)


def test_skin_tones_in_the_rule_file_match_every_tone_too() -> None:
    index = RuleIndex([MatcherSpec(keywords=("👍🏾",)), MatcherSpec(contains=("🙏🏻",))])
    for text in ("👍", "👍🏻", "👍🏾"):
        hit = index.find(NormalizedText.of(text))
        assert hit is not None
        assert hit.index == 0
    hit = index.find(NormalizedText.of("thanks 🙏🏿"))
    assert hit is not None
    assert hit.index == 1
    assert normalize("👍🏾") == normalize("👍")


def test_a_repeated_emoji_keyword_is_reported_like_a_repeated_word() -> None:
    source = RULES.replace('keywords: [👍, "👌"]', 'keywords: [👍, "👍🏽"]')
    result = compile_file(source, path="emoji.yaml", name="emoji.yaml")
    errors = [str(d) for d in result.diagnostics if d.is_error]
    assert len(errors) == 1
    assert "appears twice in this rule" in errors[0]


def test_rules_check_accepts_emoji_keywords_and_still_refuses_empty_ones(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "emoji.yaml").write_text(RULES, encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["rules", "check", str(good)])
    assert result.exit_code == 0, result.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "emoji.yaml").write_text(RULES.replace("[❤️]", '["!?"]'), encoding="utf-8")
    result = runner.invoke(app, ["rules", "check", str(bad)])
    assert result.exit_code == 1
    assert "keyword '!?' is empty once spaces and punctuation are ignored" in result.output
