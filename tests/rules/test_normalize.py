"""Text normalisation: what customers type on real phones must match what marketers wrote."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bot.rules.compiler import compile_file
from bot.rules.engine import decide
from bot.rules.model import CompiledFile, Conversation, InboundMessage
from bot.rules.normalize import NormalizedText, normalize, trim
from tests.support import CONTRACT, compile_text

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)

ZWJ_FAMILY = "👨\u200d👩\u200d👧\u200d👦"
RLM = "\u200f"


# Keywords are written in awkward forms on purpose: they are normalised at load time too.
RULES = """\
signature: N
templates:
  bye: {id: "1", text: "bye"}
  one: {id: "2", text: "one"}
  menu: {id: "3", text: "menu"}
  status: {id: "4", text: "status"}
  unknown: {id: "5", text: "unknown"}
opt_out: {keywords: [STOP, 退订, توقف], reply: bye}
start: main
states:
  main:
    on:
      - keywords: ["1"]
        reply: one
      - keywords: ["Ｍｅｎｕ。"]
        reply: menu
      - keywords: ["  order    STATUS! "]
        reply: status
otherwise: {reply: unknown}
"""


@pytest.fixture(scope="module")
def rules() -> CompiledFile:
    return compile_text(RULES)


@pytest.fixture(scope="module")
def contract() -> CompiledFile:
    result = compile_file(CONTRACT.read_text(encoding="utf-8"), path="contract.yaml", name="contract.yaml")
    assert result.compiled is not None
    return result.compiled


# ---------------------------------------------------------------- the functions


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        # NFKC: full-width letters, digits and spaces
        ("ＳＴＯＰ", "stop"),
        ("１", "1"),
        ("１２３", "123"),
        ("ｍｅｎｕ", "menu"),
        ("𝐒𝐓𝐎𝐏", "stop"),
        ("①", "1"),
        # case
        ("stop", "stop"),
        ("Stop", "stop"),
        ("sToP", "stop"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),
        # surrounding whitespace and punctuation, ASCII and CJK
        ("  STOP  ", "stop"),
        ("\tSTOP\n", "stop"),
        ("STOP!!!", "stop"),
        ("STOP.", "stop"),
        ("...STOP...", "stop"),
        ("¿STOP?", "stop"),
        ("STOP。", "stop"),
        ("STOP！", "stop"),
        ("STOP？", "stop"),
        ("，STOP，", "stop"),
        ("！？STOP。。", "stop"),
        ("「退订」", "退订"),
        ("【退订】", "退订"),
        ("“STOP”", "stop"),
        ("退订。", "退订"),
        ("\u3000退订\u3000", "退订"),
        # inner whitespace collapsed, inner punctuation kept
        ("order   status", "order status"),
        ("order\t\nstatus", "order status"),
        ("order\u3000status", "order status"),
        ("stop-now", "stop-now"),
        ("order, status", "order, status"),
        # emoji, joiners, keycaps, bidi marks
        ("STOP 😡", "stop"),
        ("😡STOP", "stop"),
        ("退订🙏", "退订"),
        (f"STOP {ZWJ_FAMILY}", "stop"),
        ("1️⃣", "1"),
        ("I 👍 it", "i 👍 it"),
        # a message made only of emoji is a word of its own: modifiers dropped, a run without spaces one word
        ("👍", "👍"),
        ("👍🏽", "👍"),
        ("👍🏿!!", "👍"),
        ("❤️", "❤"),
        ("❤", "❤"),
        ("✅", "✅"),
        ("🙏🏻", "🙏"),
        ("😀👍", "😀👍"),
        ("👍  👍", "👍 👍"),
        (ZWJ_FAMILY, ZWJ_FAMILY),
        ("👩🏽‍💻", "👩‍💻"),
        ("🇨🇳", "🇨🇳"),
        ("$", ""),
        ("#️⃣", ""),
        # right-to-left and mixed scripts
        ("توقف", "توقف"),
        (f"{RLM}توقف{RLM}", "توقف"),
        ("STOP توقف", "stop توقف"),
        ("עצור!", "עצור"),
        ("\u202eSTOP", "stop"),
        # nothing left
        ("", ""),
        ("   ", ""),
        ("!?。", ""),
    ],
)
def test_normalize(raw: str, normalized: str) -> None:
    assert normalize(raw) == normalized


@pytest.mark.parametrize("punct", list("。！？，!?.,;:…、") + ["!!", "。。。", " ! "])
@pytest.mark.parametrize("word", ["STOP", "退订", "1"])
def test_surrounding_punctuation_ignored(word: str, punct: str) -> None:
    expected = normalize(word)
    assert normalize(word + punct) == expected
    assert normalize(punct + word) == expected
    assert normalize(punct + word + punct) == expected


@pytest.mark.parametrize(
    ("raw", "trimmed"),
    [
        ("  Order   12  ", "Order 12"),
        ("ＯＲＤＥＲ　１２", "ORDER 12"),
        ("STOP!!!", "STOP!!!"),
        ("退订。", "退订。"),
        ("a\t\n b", "a b"),
    ],
)
def test_trim_keeps_case_and_punctuation(raw: str, trimmed: str) -> None:
    assert trim(raw) == trimmed


@pytest.mark.parametrize(
    ("raw", "first_word", "bare"),
    [
        ("STOP please", "stop", "STOP please"),
        ("stop, please", "stop", "stop, please"),
        ("ＳＴＯＰ　ｐｌｅａｓｅ", "stop", "STOP please"),
        ("  123456。", "123456", "123456"),
        ("😡 STOP now 😡", "stop", "STOP now"),
        ("退订", "退订", "退订"),
        ("", "", ""),
    ],
)
def test_normalized_text_fields(raw: str, first_word: str, bare: str) -> None:
    text = NormalizedText.of(raw)
    assert text.raw == raw
    assert text.first_word == first_word
    assert text.trimmed_bare == bare
    assert text.normalized == normalize(raw)


# ---------------------------------------------------------------- through the engine


@pytest.mark.parametrize(
    ("text", "template"),
    [
        ("ＳＴＯＰ", "bye"),
        ("stop", "bye"),
        ("Stop", "bye"),
        ("  STOP  ", "bye"),
        ("STOP!!!", "bye"),
        ("STOP。", "bye"),
        ("！STOP？", "bye"),
        ("，STOP，", "bye"),
        ("𝐒𝐓𝐎𝐏", "bye"),
        ("退订。", "bye"),
        ("退订！", "bye"),
        ("STOP 😡", "bye"),
        ("😡STOP", "bye"),
        ("退订🙏", "bye"),
        (f"STOP {ZWJ_FAMILY}", "bye"),
        ("توقف", "bye"),
        (f"{RLM}توقف{RLM}", "bye"),
        ("１", "one"),
        ("1.", "one"),
        ("1️⃣", "one"),
        ("menu", "menu"),
        ("MENU", "menu"),
        ("ｍｅｎｕ!", "menu"),
        ("order status", "status"),
        ("order   status", "status"),
        ("ORDER\tstatus", "status"),
        ("Order\u3000Status。", "status"),
        # no keyword left: the fallback answers, nothing crashes
        ("👍", "unknown"),
        (ZWJ_FAMILY, "unknown"),
        ("I 👍 it", "unknown"),
        ("STOP please", "unknown"),
        ("STOP توقف", "unknown"),
        ("stop-now", "unknown"),
        ("", "unknown"),
    ],
)
def test_engine_matches_normalised_text(rules: CompiledFile, text: str, template: str) -> None:
    decision = decide(rules, Conversation(), InboundMessage(text=text, sign="N"), NOW)
    assert [r.template for r in decision.replies] == [template]
    assert decision.opted_out is (template == "bye")
    assert decision.errors == ()


WEIRD = [
    "",
    " ",
    "\u200d",
    "\u200b\u200b",
    "\ufeff",
    "\u202e",
    "\x00",
    "😡" * 200,
    ZWJ_FAMILY,
    "🏳️\u200d🌈",
    "🇨🇳🇺🇸",
    "STOP 🇨🇳",
    "👍🏽",
    "1️⃣2️⃣3️⃣",
    "Z\u0351\u0355a\u0308\u0301l\u0362g\u0489o",
    "مرحبا hello 你好",
    f"{RLM}שלום{RLM} 123",
    "\U0010ffff",
    "\ue000",
    "e\u0301",
    "\U0001f600" * 3 + "123456",
    "\ud83d",  # half an emoji (a split surrogate pair)
]


@pytest.mark.parametrize("text", WEIRD)
@pytest.mark.parametrize("state", [None, "idle", "menu", "code"])
@pytest.mark.parametrize("opted_out", [False, True])
def test_emoji_and_mixed_scripts_never_crash(
    contract: CompiledFile, text: str, state: str | None, opted_out: bool
) -> None:
    conversation = Conversation(
        state=state, expires_at=NOW + timedelta(minutes=5) if state else None, opted_out=opted_out
    )
    decision = decide(contract, conversation, InboundMessage(text=text, sign="Acme Shop"), NOW)
    assert decision.errors == ()
    if opted_out:
        assert decision.replies == ()
    else:
        # an unrecognised message is answered by a fallback, never silently dropped
        assert len(decision.replies) == 1
        assert decision.replies[0].segments >= 1
    assert isinstance(decision.normalized_text, str)


@pytest.mark.parametrize("text", WEIRD + ["{{ 7*7 }} 😡", "退订🙏"])
def test_echoing_emoji_and_mixed_scripts_never_crashes(text: str) -> None:
    echo = compile_text(
        """\
signature: E
param_max_length: 500
templates:
  echo: {id: "1", text: "You said: {1}"}
otherwise: {reply: echo, params: ["{{ text }}"]}
"""
    )
    decision = decide(echo, Conversation(), InboundMessage(text=text, sign="E"), NOW)
    assert decision.errors == ()
    [reply] = decision.replies
    assert reply.text.startswith("You said: ")
    assert reply.encoding in ("GSM-7", "UCS-2")
    assert reply.segments >= 1
