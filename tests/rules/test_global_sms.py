"""Replies to numbers outside the Chinese mainland: international templates, no signature, Tencent's lengths.

Tencent refuses a mainland template sent abroad
(``UnsupportedOperation.ChineseMainlandTemplateToGlobalPhone``), so a rule
file gives a template its international twin (``intl_id``); without one the
reply is refused at decision time with a reason ops can act on, instead of
failing at Tencent.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from bot.rules.compiler import compile_file
from bot.rules.engine import decide
from bot.rules.model import CompiledFile, Conversation, InboundMessage
from bot.rules.sms_length import sms_length

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)

RULES = """\
signature: Acme Shop
sender_id: ACME
reply_max_delay: 20m
templates:
  menu:  {id: "1490001", intl_id: "2490001", text: "Reply 1 for status"}
  hours: {id: "1490002", text: "We open at 9"}
opt_out: {keywords: [STOP], reply: menu}
start: idle
states:
  idle:
    on:
      - keywords: [HI]
        reply: menu
      - keywords: [HOURS]
        reply: hours
"""


def compiled(source: str = RULES) -> tuple[CompiledFile, list[str]]:
    result = compile_file(source, path="acme.yaml", name="acme.yaml")
    assert result.compiled is not None, [str(d) for d in result.diagnostics]
    return result.compiled, [str(d) for d in result.diagnostics]


def say(rules: CompiledFile, text: str, nationcode: str) -> tuple[str, str, str | None, str | None, int]:
    decision = decide(rules, Conversation(), InboundMessage(text=text, sign="Acme Shop", nationcode=nationcode), NOW)
    [reply] = decision.replies
    return reply.template_id, reply.text, reply.refused, reply.sender_id, reply.length


def test_a_mainland_number_gets_the_mainland_template_with_the_signature_counted() -> None:
    rules, _ = compiled()
    template_id, _text, refused, sender_id, length = say(rules, "hi", "86")
    assert (template_id, refused, sender_id) == ("1490001", None, None)
    assert length == len("【Acme Shop】Reply 1 for status")


def test_a_number_abroad_gets_the_international_template_no_signature_and_the_sender_id() -> None:
    rules, _ = compiled()
    template_id, text, refused, sender_id, length = say(rules, "hi", "852")
    assert (template_id, text, refused, sender_id) == ("2490001", "Reply 1 for status", None, "ACME")
    assert length == len("Reply 1 for status")


def test_without_an_intl_id_the_reply_abroad_is_refused_with_a_reason() -> None:
    rules, _ = compiled()
    template_id, _, refused, _, _ = say(rules, "hours", "44")
    assert template_id == "1490002"
    assert refused is not None
    assert "'hours' has no intl_id" in refused
    assert "+44" in refused
    _, _, at_home, _, _ = say(rules, "hours", "86")
    assert at_home is None


def test_rules_check_warns_about_templates_without_an_intl_id_once_a_signature_answers_abroad() -> None:
    _, diagnostics = compiled()
    [warning] = [d for d in diagnostics if "intl_id" in d]
    assert "warning: template 'hours' has no intl_id" in warning
    assert warning.startswith("acme.yaml:6:")


def test_a_mainland_only_file_gets_no_such_warning() -> None:
    source = RULES.replace("sender_id: ACME\n", "").replace(', intl_id: "2490001"', "")
    _, diagnostics = compiled(source)
    assert not [d for d in diagnostics if "intl_id" in d]
    declared = compiled(source.replace("signature: Acme Shop\n", "signature: Acme Shop\ninternational: true\n"))[1]
    assert len([d for d in declared if "has no intl_id" in d]) == 2


def test_an_intl_id_must_be_digits() -> None:
    result = compile_file(RULES.replace('intl_id: "2490001"', 'intl_id: "abc"'), path="a.yaml", name="a.yaml")
    errors = [str(d) for d in result.diagnostics if d.is_error]
    assert any("intl_id 'abc' must be digits" in e for e in errors)


def test_the_files_reply_max_delay_reaches_the_decision() -> None:
    rules, _ = compiled()
    decision = decide(rules, Conversation(), InboundMessage(text="hi", sign="Acme Shop"), NOW)
    assert decision.reply_max_delay == timedelta(minutes=20)


@pytest.mark.parametrize(
    ("text", "nationcode", "segments"),
    [
        ("a" * 160, "44", 1),  # GSM-7: 160 in one
        ("a" * 161, "44", 2),  # then 153 a segment
        ("a" * 306, "44", 2),
        ("a" * 307, "44", 3),
        ("{" * 80, "44", 1),  # extension characters count two
        ("{" * 81, "44", 2),
        ("é" * 70, "33", 1),  # é is GSM-7
        ("ł" * 70, "48", 1),  # ł is not: 70, then 67
        ("ł" * 71, "48", 2),
        ("😀" * 35, "1", 1),  # an emoji counts two
        ("😀" * 36, "1", 2),
        ("a" * 153, "60", 1),  # Malaysia: 153, then 146/153
        ("a" * 154, "60", 2),
        ("a" * 299, "60", 2),
        ("a" * 300, "60", 3),
        ("ł" * 63, "60", 1),  # and 63, then 60/67
        ("ł" * 64, "60", 2),
        ("ł" * 127, "60", 2),
        ("ł" * 128, "60", 3),
    ],
)
def test_global_sms_segments_follow_tencents_rule(text: str, nationcode: str, segments: int) -> None:
    assert sms_length(text, nationcode=nationcode).segments == segments
