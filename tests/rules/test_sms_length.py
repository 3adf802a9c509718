"""SMS length and segment counting, alone and as the engine reports it on replies."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from bot.rules.compiler import compile_file
from bot.rules.engine import decide
from bot.rules.model import CompiledFile, Conversation, InboundMessage, Reply
from bot.rules.sms_length import sms_length

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
GRIN = "\U0001f600"  # 😀, outside the BMP: two UTF-16 units
ZWJ_FAMILY = "👨\u200d👩\u200d👧"


@pytest.mark.parametrize(
    ("text", "encoding", "length", "segments"),
    [
        # GSM-7: 160 in one SMS, 153 per segment beyond
        ("", "GSM-7", 0, 0),
        ("a", "GSM-7", 1, 1),
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),
        ("a" * 306, "GSM-7", 306, 2),
        ("a" * 307, "GSM-7", 307, 3),
        ("a" * 459, "GSM-7", 459, 3),
        ("a" * 460, "GSM-7", 460, 4),
        ("Hello, World! 0123456789 @£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉÄÖÑÜ§¿äöñüà", "GSM-7", 65, 1),
        ("line\nbreak", "GSM-7", 10, 1),
        # GSM-7 extension characters cost two
        ("€", "GSM-7", 2, 1),
        ("{}[]~|^\\", "GSM-7", 16, 1),
        ("€" * 80, "GSM-7", 160, 1),
        ("€" * 81, "GSM-7", 162, 2),
        ("a" * 159 + "[", "GSM-7", 161, 2),
        ("a" * 158 + "]", "GSM-7", 160, 1),
        # UCS-2: 70 in one SMS, 67 per segment beyond
        ("中", "UCS-2", 1, 1),
        ("中" * 70, "UCS-2", 70, 1),
        ("中" * 71, "UCS-2", 71, 2),
        ("中" * 134, "UCS-2", 134, 2),
        ("中" * 135, "UCS-2", 135, 3),
        ("a" * 69 + "中", "UCS-2", 70, 1),
        ("a" * 70 + "中", "UCS-2", 71, 2),
        ("【Acme】" + "a" * 64, "UCS-2", 70, 1),
        ("ç" * 70, "UCS-2", 70, 1),  # lower-case c-cedilla is not in the GSM basic set
        # emoji outside the BMP count as two UTF-16 units
        (GRIN, "UCS-2", 2, 1),
        (GRIN * 35, "UCS-2", 70, 1),
        (GRIN * 36, "UCS-2", 72, 2),
        ("a" * 68 + GRIN, "UCS-2", 70, 1),
        ("a" * 69 + GRIN, "UCS-2", 71, 2),
        (ZWJ_FAMILY, "UCS-2", 8, 1),
        ("👍🏽", "UCS-2", 4, 1),
        ("\u2764\ufe0f", "UCS-2", 2, 1),  # BMP heart + variation selector
    ],
)
def test_sms_length(text: str, encoding: str, length: int, segments: int) -> None:
    size = sms_length(text)
    assert (size.encoding, size.length, size.segments) == (encoding, length, segments)


@pytest.mark.parametrize(
    ("alphabet", "single", "per_segment"),
    [("a", 160, 153), ("中", 70, 67), (GRIN, 70, 67)],
)
def test_segment_boundaries(alphabet: str, single: int, per_segment: int) -> None:
    unit = sms_length(alphabet).length
    for count in range(1, 4 * single // unit):
        size = sms_length(alphabet * count)
        units = count * unit
        expected = 1 if units <= single else -(-units // per_segment)
        assert size.segments == expected, count


# ---------------------------------------------------------------- as the engine reports it

ECHO = """\
signature: Shop
param_max_length: 1000
templates:
  echo: {id: "1", text: "{1}"}
  fixed: {id: "2", text: "Order {1}: {2}."}
states:
  s:
    on:
      - keywords: [ORDER]
        reply: fixed
        params: ["A1", "sent"]
otherwise: {reply: echo, params: ["{{ text }}"]}
"""


@pytest.fixture(scope="module")
def echo() -> CompiledFile:
    result = compile_file(ECHO, path="e.yaml", name="e.yaml")
    assert [str(d) for d in result.diagnostics if d.is_error] == []
    assert result.compiled is not None
    return result.compiled


def reply_for(rules: CompiledFile, text: str, nationcode: str, sign: str = "Shop") -> Reply:
    decision = decide(rules, Conversation(), InboundMessage(text=text, sign=sign, nationcode=nationcode), NOW)
    assert decision.errors == ()
    [reply] = decision.replies
    return reply


@pytest.mark.parametrize(
    ("text", "encoding", "length", "segments"),
    [
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),
        ("€" * 80, "GSM-7", 160, 1),
        ("€" * 81, "GSM-7", 162, 2),
        ("中" * 70, "UCS-2", 70, 1),
        ("中" * 71, "UCS-2", 71, 2),
        (GRIN * 35, "UCS-2", 70, 1),
        (GRIN * 36, "UCS-2", 72, 2),
        ("a" * 69 + GRIN, "UCS-2", 71, 2),
    ],
)
def test_reply_length_outside_mainland_china(
    echo: CompiledFile, text: str, encoding: str, length: int, segments: int
) -> None:
    reply = reply_for(echo, text, nationcode="1")
    assert reply.text == text
    assert (reply.encoding, reply.length, reply.segments) == (encoding, length, segments)


@pytest.mark.parametrize(
    ("text", "length", "segments"),
    [
        ("a" * 64, 70, 1),  # 【Shop】 (6) + 64 = 70: one SMS
        ("a" * 65, 71, 2),  # one more character and the reply costs two
        ("中" * 64, 70, 1),
        ("中" * 128, 134, 2),
        ("中" * 129, 135, 3),
        (GRIN * 32, 70, 1),
        (GRIN * 33, 72, 2),
    ],
)
@pytest.mark.parametrize("nationcode", ["86", "+86"])
def test_reply_length_in_mainland_china_includes_the_signature(
    echo: CompiledFile, nationcode: str, text: str, length: int, segments: int
) -> None:
    reply = reply_for(echo, text, nationcode=nationcode)
    assert reply.text == text  # the preview is the template text; the signature is only billed
    assert reply.encoding == "UCS-2"  # 【】 are not GSM-7 characters
    assert (reply.length, reply.segments) == (length, segments)


def test_same_reply_costs_more_in_mainland_china(echo: CompiledFile) -> None:
    abroad = reply_for(echo, "ORDER", nationcode="44")
    home = reply_for(echo, "ORDER", nationcode="86")
    assert abroad.text == home.text == "Order A1: sent."
    assert (abroad.encoding, abroad.length, abroad.segments) == ("GSM-7", 15, 1)
    assert (home.encoding, home.length, home.segments) == ("UCS-2", 15 + len("【Shop】"), 1)


def test_signature_given_with_brackets_is_billed_once(echo: CompiledFile) -> None:
    """Tencent may report the sign as 【Shop】; the file still answers it and the bill must not double the brackets."""
    plain = reply_for(echo, "a" * 64, nationcode="86", sign="Shop")
    bracketed = reply_for(echo, "a" * 64, nationcode="86", sign="【Shop】")
    assert (bracketed.length, bracketed.segments) == (plain.length, plain.segments) == (70, 1)
