"""The engine's semantics, as the rule-language issue lists them.

Every test feeds messages to the pure ``decide()`` with a fixed clock and
checks what a customer or a marketer would notice: which template is sent
with which parameters, which rule (file:line) fired, the state and variables
the conversation is left with, opt-out and expiry.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import pytest

from bot.rules.engine import decide
from bot.rules.loader import load_rules
from bot.rules.model import CompiledFile, Conversation, Decision, InboundMessage, Reply, Ruleset
from tests.support import CONTRACT, compile_text

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
SIGN = "Acme Shop"


@pytest.fixture(scope="module")
def contract() -> CompiledFile:
    return compile_text(CONTRACT.read_text(encoding="utf-8"), name="contract.yaml")


def msg(text: str, sign: str = SIGN, nationcode: str = "86", mobile: str = "13800001234") -> InboundMessage:
    return InboundMessage(text=text, sign=sign, nationcode=nationcode, mobile=mobile)


def converse(
    rules: CompiledFile | Ruleset,
    texts: Iterable[str],
    *,
    sign: str = SIGN,
    start: Conversation | None = None,
    gap: timedelta = timedelta(seconds=1),
) -> list[Decision]:
    """Feed messages one ``gap`` apart, carrying the conversation along."""
    conversation = start or Conversation()
    at = NOW
    decisions = []
    for text in texts:
        decision = decide(rules, conversation, msg(text, sign=sign), at)
        decisions.append(decision)
        conversation = decision.conversation()
        at += gap
    return decisions


def template_of(decision: Decision) -> str | None:
    assert len(decision.replies) <= 1
    return decision.replies[0].template if decision.replies else None


# ---------------------------------------------------------------- precedence

PRECEDENCE = """\
signature: P
templates:
  t_out: {id: "1", text: "opted out"}
  t_in: {id: "2", text: "opted in"}
  t_help: {id: "3", text: "help"}
  t_on1: {id: "4", text: "first on rule"}
  t_on2: {id: "5", text: "second on rule"}
  t_any: {id: "6", text: "anywhere"}
  t_state_other: {id: "7", text: "state otherwise"}
  t_file_other: {id: "8", text: "file otherwise"}
opt_out: {keywords: [STOP], reply: t_out}
opt_in: {keywords: [START], contains: [TO], reply: t_in}
help: {keywords: [HELP], contains: [TA, OP], reply: t_help}
start: s
states:
  s:
    on:
      - keywords: [ONE]
        reply: t_on1
      - regex: '[a-z]+'
        reply: t_on2
        goto: s
    otherwise: {reply: t_state_other}
  bare:
    on:
      - regex: '[a-z]+'
        reply: t_on2
anywhere:
  - keywords: [TWO, "42"]
    reply: t_any
    goto: bare
otherwise: {reply: t_file_other}
"""
# Every message below also matches every section after the one expected to win:
#   STOP  -> opt_in (contains TO), help (contains OP), state regex
#   START -> help (contains TA), state regex
#   HELP  -> state regex
#   ONE   -> second state rule (regex)
#   TWO   -> anywhere keyword
#   42    -> state otherwise, file otherwise
#   99    -> file otherwise


@pytest.mark.parametrize(
    ("state", "text", "template", "kind", "line"),
    [
        ("s", "STOP", "t_out", "opt_out", 11),
        ("s", "START", "t_in", "opt_in", 12),
        ("s", "HELP", "t_help", "help", 13),
        ("s", "ONE", "t_on1", "on", 18),
        ("s", "TWO", "t_on2", "on", 20),
        ("s", "42", "t_any", "anywhere", 29),
        ("s", "99", "t_state_other", "state_otherwise", 23),
        ("bare", "99", "t_file_other", "otherwise", 32),
        ("bare", "42", "t_any", "anywhere", 29),
    ],
)
def test_precedence(state: str, text: str, template: str, kind: str, line: int) -> None:
    rules = compile_text(PRECEDENCE)
    decision = decide(rules, Conversation(state=state), msg(text, sign="P"), NOW)
    assert template_of(decision) == template
    assert decision.rule_kind == kind
    assert decision.rule == f"t.yaml:{line}"


def test_on_rules_fire_in_file_order_whatever_their_match_kind() -> None:
    rules = compile_text(
        """\
signature: O
templates:
  a: {id: "1", text: "a"}
  b: {id: "2", text: "b"}
  c: {id: "3", text: "c"}
states:
  s:
    on:
      - regex: 'order \\d+'
        reply: a
      - first_word: [ORDER]
        reply: b
      - contains: [RDER]
        reply: c
"""
    )
    table = {"order 12": "a", "order now": "b", "reorder": "c", "ORDER": "b"}
    got = {text: template_of(decide(rules, Conversation(), msg(text, sign="O"), NOW)) for text in table}
    assert got == table


# ---------------------------------------------------------------- opt-out / opt-in


@pytest.mark.parametrize("text", ["TD", "MENU", "HELP", "帮助", "hi", "1", "2", "123456", "anything", "", "👍"])
def test_opted_out_number_gets_no_reply(contract: CompiledFile, text: str) -> None:
    opted_out = Conversation(state="idle", opted_out=True)
    decision = decide(contract, opted_out, msg(text), NOW)
    assert decision.replies == ()
    assert decision.rule is None
    assert decision.opted_out is True
    assert decision.opt_change is None


@pytest.mark.parametrize("keyword", ["START", "start", "订阅"])
def test_opt_in_resubscribes_and_answers_once(contract: CompiledFile, keyword: str) -> None:
    opted_out = Conversation(state="idle", vars={"name": "Li"}, opted_out=True)
    decision = decide(contract, opted_out, msg(keyword), NOW)
    assert decision.opted_out is False
    assert decision.opt_change == "opt_in"
    assert decision.rule == "contract.yaml:13"
    assert [(r.template, r.params, r.text) for r in decision.replies] == [("back", ("Li",), "Welcome back, Li!")]
    # and from then on the number is answered normally
    after = decide(contract, decision.conversation(), msg("MENU"), NOW + timedelta(seconds=1))
    assert template_of(after) == "menu"
    assert after.opt_change is None


def test_opt_out_confirmation_is_sent_once(contract: CompiledFile) -> None:
    decisions = converse(contract, ["hi", "TD", "TD", "STOP", "退订", "MENU", "START", "START"])
    assert [template_of(d) for d in decisions] == ["menu", "bye", None, None, None, None, "back", "back"]
    assert [d.opt_change for d in decisions] == [None, "opt_out", None, None, None, None, "opt_in", None]
    assert [d.opted_out for d in decisions] == [False, True, True, True, True, True, False, False]


def test_opt_out_resets_the_conversation_to_start(contract: CompiledFile) -> None:
    decisions = converse(contract, ["hi", "3", "STOP"])
    assert [d.state for d in decisions] == ["menu", "code", "idle"]
    assert decisions[-1].expires_at is None


def test_contract_example_opt_out_silences_until_start(contract: CompiledFile) -> None:
    decisions = converse(contract, ["TD", "MENU", "START"])
    assert [template_of(d) for d in decisions] == ["bye", None, "back"]


# ---------------------------------------------------------------- expiry


@pytest.mark.parametrize(
    ("silence", "expired", "template", "state"),
    [
        (timedelta(minutes=1), False, "status", "menu"),
        (timedelta(minutes=29, seconds=59), False, "status", "menu"),
        (timedelta(minutes=30, seconds=1), True, "unknown", "idle"),
        (timedelta(hours=5), True, "unknown", "idle"),
    ],
)
def test_menu_expires_after_30_minutes_of_silence(
    contract: CompiledFile, silence: timedelta, expired: bool, template: str, state: str
) -> None:
    first = decide(contract, Conversation(), msg("hi"), NOW)
    assert first.state == "menu"
    assert first.expires_at == NOW + timedelta(minutes=30)
    second = decide(contract, first.conversation(), msg("1"), NOW + silence)
    assert second.expired is expired
    assert second.state_before == "menu"
    assert template_of(second) == template
    assert second.state == state


def test_expiry_counts_silence_from_the_last_message(contract: CompiledFile) -> None:
    # hi at 0m, 1 at 20m (menu again, clock restarts), 1 at 45m: still within 30m of the last message
    decisions = converse(contract, ["hi", "1", "1"], gap=timedelta(minutes=20, seconds=30))
    assert [template_of(d) for d in decisions] == ["menu", "status", "status"]
    assert not any(d.expired for d in decisions)
    assert decisions[1].expires_at == NOW + timedelta(minutes=20, seconds=30) + timedelta(minutes=30)


def test_code_state_expires_after_10_minutes(contract: CompiledFile) -> None:
    asked = converse(contract, ["hi", "3"])[-1]
    assert asked.state == "code"
    late = decide(contract, asked.conversation(), msg("123456"), NOW + timedelta(minutes=11))
    assert late.expired is True
    assert template_of(late) == "unknown"
    assert late.state == "idle"
    in_time = decide(contract, asked.conversation(), msg("123456"), NOW + timedelta(minutes=9))
    assert template_of(in_time) == "thanks"


def test_expired_conversation_still_answers_start_state_keywords(contract: CompiledFile) -> None:
    in_menu = Conversation(state="menu", expires_at=NOW - timedelta(seconds=1))
    decision = decide(contract, in_menu, msg("hi"), NOW)
    assert decision.expired is True
    assert decision.rule == "contract.yaml:19"  # idle's own rule, not 'anywhere'
    assert decision.state == "menu"


# ---------------------------------------------------------------- variables and regex groups

VARIABLES = """\
signature: V
param_max_length: 20
templates:
  saved: {id: "1", text: "Saved {1}."}
  hello: {id: "2", text: "Hello {1}, size {2}."}
  unknown: {id: "3", text: "?"}
start: main
states:
  main:
    on:
      - regex: 'name (?P<name>\\w+)'
        set: {name: "{{ match.name }}"}
        reply: saved
        params: ["{{ vars.name }}"]
      - regex: 'size (?P<size>\\w+)'
        set: {size: "{{ match.size | upper }}"}
        reply: saved
        params: ["{{ vars.size }}"]
      - keywords: [HELLO]
        reply: hello
        params: ["{{ vars.name | default('you') }}", "{{ vars.size | default('?') }}"]
otherwise: {reply: unknown}
"""


def test_set_variables_persist_and_are_used_later() -> None:
    rules = compile_text(VARIABLES)
    decisions = converse(
        rules, ["HELLO", "name Ann", "what?", "size m", "HELLO", "name Bob", "HELLO"], sign="V", start=None
    )
    texts = [d.replies[0].text for d in decisions]
    assert texts == [
        "Hello you, size ?.",
        "Saved Ann.",  # params see the value set by the same rule
        "?",
        "Saved M.",
        "Hello Ann, size M.",
        "Saved Bob.",
        "Hello Bob, size M.",
    ]
    assert [dict(d.vars) for d in decisions][-1] == {"name": "Bob", "size": "M"}
    assert decisions[2].vars == {"name": "Ann"}  # an unrelated message keeps them


def test_variables_survive_opt_out_and_opt_in(contract: CompiledFile) -> None:
    decisions = converse(contract, ["TD", "START"], start=Conversation(state="idle", vars={"name": "Wang"}))
    assert decisions[-1].replies[0].text == "Welcome back, Wang!"


@pytest.mark.parametrize(
    ("text", "template", "params", "receipt"),
    [
        ("123456", "thanks", ("123456",), "123456"),
        ("  123456 ", "thanks", ("123456",), "123456"),
        ("123456。", "thanks", ("123456",), "123456"),
        ("１２３４５６", "thanks", ("123456",), "123456"),
        ("12345", "ask_code", (), None),
        ("1234567", "ask_code", (), None),
        ("code 123456", "ask_code", (), None),
    ],
)
def test_regex_named_group_is_match_name(
    contract: CompiledFile, text: str, template: str, params: tuple[str, ...], receipt: str | None
) -> None:
    in_code = Conversation(state="code", expires_at=NOW + timedelta(minutes=5))
    decision = decide(contract, in_code, msg(text), NOW)
    assert template_of(decision) == template
    assert decision.replies[0].params == params
    assert decision.vars.get("receipt") == receipt
    if receipt is not None:
        assert decision.replies[0].text == f"Thanks! Code {receipt} is registered."
        assert decision.state == "idle"
        # the variable persists after the conversation moves on
        later = decide(contract, decision.conversation(), msg("hi"), NOW + timedelta(minutes=1))
        assert later.vars["receipt"] == receipt


def test_unmatched_optional_group_renders_empty() -> None:
    rules = compile_text(
        """\
signature: G
templates:
  got: {id: "1", text: "[{1}|{2}]"}
states:
  s:
    on:
      - regex: '(?P<a>\\d{1,3})(?:-(?P<b>\\d{1,3}))?'
        reply: got
        params: ["{{ match.a }}", "{{ match.b }}"]
"""
    )
    texts = [decide(rules, Conversation(), msg(t, sign="G"), NOW).replies[0].text for t in ("12-34", "12")]
    assert texts == ["[12|34]", "[12|]"]


# ---------------------------------------------------------------- customer text is never template source

ECHO = """\
signature: E
param_max_length: 100
templates:
  echo: {id: "1", text: "You said: {1}"}
  saved: {id: "2", text: "Saved {1}"}
states:
  s:
    on:
      - regex: 'note (?P<note>.+)'
        set: {note: "{{ match.note }}"}
        reply: saved
        params: ["{{ match.note }}"]
      - keywords: [RECALL]
        reply: echo
        params: ["{{ vars.note }}"]
otherwise: {reply: echo, params: ["{{ text }}"]}
"""


@pytest.mark.parametrize(
    "payload",
    [
        "{{ 7*7 }}",
        "{{ ''.__class__.__mro__ }}",
        "{% for i in range(3) %}x{% endfor %}",
        "{{ vars }}",
        "{# comment #}",
    ],
)
def test_customer_text_is_rendered_literally(payload: str) -> None:
    rules = compile_text(ECHO)
    decision = decide(rules, Conversation(), msg(payload, sign="E"), NOW)
    assert decision.errors == ()
    assert decision.replies[0].params == (payload,)
    assert decision.replies[0].text == f"You said: {payload}"


def test_customer_text_stays_literal_through_regex_groups_and_variables() -> None:
    rules = compile_text(ECHO)
    decisions = converse(rules, ["note {{ 7*7 }}", "RECALL"], sign="E")
    assert [d.replies[0].text for d in decisions] == ["Saved {{ 7*7 }}", "You said: {{ 7*7 }}"]
    assert "49" not in decisions[1].replies[0].text


# ---------------------------------------------------------------- sandbox and strict undefined


def _single_param_file(expression: str) -> CompiledFile:
    import json

    return compile_text(
        f"""\
signature: X
param_max_length: 100
templates:
  t: {{id: "1", text: "value={{1}}"}}
otherwise: {{reply: t, params: [{json.dumps(expression)}]}}
"""
    )


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ text.__class__.__base__ }}",
        "{{ vars.__class__.__init__.__globals__ }}",
        "{{ vars._data }}",
        "{{ now.__class__ }}",
        "{{ text | attr('__class__') }}",
        "{{ '{0.__class__}'.format(text) }}",
        "{{ [].append(1) }}",
        "{{ 'a' * 10**6 }}",  # would build a huge string: refused by the sandbox's size limit
        "{{ 7 ** 100000 }}",  # a huge power: refused too
        "{{ 1 / 0 }}",
        "{{ text.encode('no-such-codec') }}",
        "{{ '%(missing)s' % {} }}",
    ],
)
def test_unsafe_or_failing_rule_expression_fails_safely(expression: str) -> None:
    rules = _single_param_file(expression)
    decision = decide(rules, Conversation(), msg("hello", sign="X"), NOW)
    assert decision.replies == ()
    assert len(decision.errors) == 1
    assert decision.errors[0].startswith("t.yaml:5: params of reply 't'")


@pytest.mark.parametrize(
    ("expression", "rendered"),
    [
        ("{{ vars.nickname | default('friend') }}", "friend"),
        ("{{ text | upper }}", "HELLO"),
        ("{{ text[:3] }}", "hel"),
    ],
)
def test_safe_expressions_render(expression: str, rendered: str) -> None:
    decision = decide(_single_param_file(expression), Conversation(), msg("hello", sign="X"), NOW)
    assert decision.errors == ()
    assert decision.replies[0].params == (rendered,)


def test_undefined_variable_without_default_is_an_error_not_an_empty_string() -> None:
    rules = _single_param_file("{{ vars.nickname }}")
    decision = decide(rules, Conversation(), msg("hello", sign="X"), NOW)
    assert decision.replies == ()
    assert len(decision.errors) == 1
    assert "undefined" in decision.errors[0]
    assert "nickname" in decision.errors[0]
    assert decision.rule == "t.yaml:5"
    # with the variable set the same rule answers
    known = decide(rules, Conversation(vars={"nickname": "Mei"}), msg("hello", sign="X"), NOW)
    assert known.errors == ()
    assert known.replies[0].text == "value=Mei"


def test_undefined_variable_in_set_is_recorded() -> None:
    rules = compile_text(
        """\
signature: X
templates:
  t: {id: "1", text: "ok"}
otherwise: {reply: t, set: {copy: "{{ vars.nothing }}"}}
"""
    )
    decision = decide(rules, Conversation(), msg("hello", sign="X"), NOW)
    assert any("set copy" in e and "undefined" in e for e in decision.errors)
    assert "copy" not in decision.vars


# ---------------------------------------------------------------- template context


@pytest.mark.parametrize(
    ("expression", "rendered"),
    [
        ("{{ text }}", "Hello there"),
        ("{{ signature }}", "Ctx"),
        ("{{ contact.nationcode }}", "86"),
        ("{{ contact.mobile[-4:] }}", "1234"),
        ("{{ now.strftime('%H:%M') }}", "02:00"),
        ("{{ now.year }}", "2026"),
    ],
)
def test_template_context(expression: str, rendered: str) -> None:
    import json

    rules = compile_text(
        f"""\
signature: Ctx
param_max_length: 100
templates:
  t: {{id: "1", text: "{{1}}"}}
otherwise: {{reply: t, params: [{json.dumps(expression)}]}}
"""
    )
    decision = decide(rules, Conversation(), msg("  Hello   there ", sign="Ctx"), NOW)
    assert decision.errors == ()
    assert decision.replies[0].params == (rendered,)


# ---------------------------------------------------------------- signatures and the default file

ACME = """\
signature: Acme Shop
templates:
  hi: {id: "11", text: "Acme says hi"}
otherwise: {reply: hi}
"""
DEFAULT = """\
signature: "*"
templates:
  hi: {id: "99", text: "Default says hi"}
otherwise: {reply: hi}
"""


def _ruleset(tmp_path: Path, files: dict[str, str]) -> Ruleset:
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = load_rules(tmp_path)
    assert result.errors == []
    assert result.ruleset is not None
    return result.ruleset


@pytest.mark.parametrize(
    ("sign", "rules_file", "template_id"),
    [
        ("Acme Shop", "acme.yaml", "11"),
        ("acme shop", "acme.yaml", "11"),
        ("【Acme Shop】", "acme.yaml", "11"),
        ("Other Shop", "default.yaml", "99"),
        ("腾讯云", "default.yaml", "99"),
    ],
)
def test_default_file_answers_unknown_signatures(tmp_path: Path, sign: str, rules_file: str, template_id: str) -> None:
    ruleset = _ruleset(tmp_path, {"acme.yaml": ACME, "default.yaml": DEFAULT})
    decision = decide(ruleset, Conversation(), msg("hello", sign=sign), NOW)
    assert decision.rules_file == rules_file
    assert [r.template_id for r in decision.replies] == [template_id]


def test_unknown_signature_without_default_gets_nothing(tmp_path: Path) -> None:
    ruleset = _ruleset(tmp_path, {"acme.yaml": ACME})
    conversation = Conversation(state="somewhere", vars={"k": "v"})
    decision = decide(ruleset, conversation, msg("hello", sign="Other Shop"), NOW)
    assert decision.replies == ()
    assert decision.rule is None
    assert decision.rules_file is None
    assert decision.errors == ()
    assert decision.conversation() == conversation
    # the known signature is still answered by the same ruleset
    assert decide(ruleset, Conversation(), msg("hello", sign="Acme Shop"), NOW).replies[0].template_id == "11"


# ---------------------------------------------------------------- the Decision


def test_decision_for_first_message(contract: CompiledFile) -> None:
    decision = decide(contract, Conversation(), msg("hi"), NOW)
    text = "Reply 1 for order status, 2 for opening hours. Reply TD to opt out."
    assert decision == Decision(
        rule="contract.yaml:19",
        rule_kind="on",
        state_before=None,
        state="menu",
        vars={},
        expires_at=NOW + timedelta(minutes=30),
        replies=(
            Reply(
                template="menu",
                template_id="1490001",
                params=(),
                text=text,
                length=len("【Acme Shop】") + len(text),
                segments=2,
                encoding="UCS-2",
            ),
        ),
        opted_out=False,
        opt_change=None,
        unmatched=False,
        expired=False,
        normalized_text="hi",
        rules_file="contract.yaml",
    )


@pytest.mark.parametrize(
    ("state", "text", "rule", "kind", "state_after", "template", "template_id", "params", "preview"),
    [
        (None, "TD", "contract.yaml:12", "opt_out", "idle", "bye", "1490007", (), None),
        ("menu", "HELP", "contract.yaml:14", "help", "menu", "help", "1490009", (), None),
        ("idle", "你好", "contract.yaml:19", "on", "menu", "menu", "1490001", (), None),
        ("menu", "1", "contract.yaml:25", "on", "menu", "status", "1490002", ("none", "sent"), "Order none: sent."),
        (
            "menu",
            "2",
            "contract.yaml:28",
            "on",
            "idle",
            "hours",
            "1490003",
            ("9:00", "18:00"),
            "We are open 9:00 to 18:00 today.",
        ),
        ("menu", "code", "contract.yaml:32", "on", "code", "ask_code", "1490004", (), None),
        ("code", "654321", "contract.yaml:38", "on", "idle", "thanks", "1490005", ("654321",), None),
        ("code", "what", "contract.yaml:43", "state_otherwise", "code", "ask_code", "1490004", (), None),
        ("menu", "菜单", "contract.yaml:45", "anywhere", "menu", "menu", "1490001", (), None),
        ("code", "MENU", "contract.yaml:45", "anywhere", "menu", "menu", "1490001", (), None),
        ("idle", "1", "contract.yaml:48", "otherwise", "idle", "unknown", "1490006", (), None),
    ],
)
def test_decision_names_the_rule_and_reply(
    contract: CompiledFile,
    state: str | None,
    text: str,
    rule: str,
    kind: str,
    state_after: str,
    template: str,
    template_id: str,
    params: tuple[str, ...],
    preview: str | None,
) -> None:
    conversation = Conversation(state=state, expires_at=NOW + timedelta(minutes=1) if state else None)
    decision = decide(contract, conversation, msg(text), NOW)
    assert decision.rule == rule
    assert decision.rule_kind == kind
    assert decision.state_before == state
    assert decision.state == state_after
    assert decision.unmatched is (kind in ("otherwise", "state_otherwise"))
    [reply] = decision.replies
    assert (reply.template, reply.template_id, reply.params) == (template, template_id, params)
    assert "{" not in reply.text
    if preview is not None:
        assert reply.text == preview
    assert reply.length > len(reply.text)  # 【Acme Shop】 is billed on Chinese-mainland numbers
    assert reply.segments >= 1


@pytest.mark.parametrize(
    ("state_after", "expires_at"),
    [("menu", NOW + timedelta(minutes=30)), ("code", NOW + timedelta(minutes=10)), ("idle", None)],
)
def test_decision_expiry_follows_the_new_state(
    contract: CompiledFile, state_after: str, expires_at: datetime | None
) -> None:
    text = {"menu": "hi", "code": "3", "idle": "2"}[state_after]
    start = Conversation() if state_after == "menu" else Conversation(state="menu", expires_at=NOW + timedelta(1))
    decision = decide(contract, start, msg(text), NOW)
    assert decision.state == state_after
    assert decision.expires_at == expires_at


# ---------------------------------------------------------------- first_word and contains

WORDS = """\
signature: W
templates:
  bye: {id: "1", text: "bye"}
  unknown: {id: "2", text: "?"}
opt_out: {first_word: [STOP, TD], contains: [退订, 取消订阅], reply: bye}
otherwise: {reply: unknown}
"""


@pytest.mark.parametrize(
    ("text", "opted_out"),
    [
        ("STOP please", True),
        ("stop, please", True),
        ("ＳＴＯＰ　please", True),
        ("STOP", True),
        ("td now", True),
        ("please STOP", False),
        ("STOPPED", False),
        ("unstoppable", False),
        ("我要退订", True),
        ("请帮我退订。", True),
        ("退订", True),
        ("我想取消订阅谢谢", True),
        ("订退", False),
        ("我要订阅", False),
    ],
)
def test_first_word_and_contains(text: str, opted_out: bool) -> None:
    rules = compile_text(WORDS)
    decision = decide(rules, Conversation(), msg(text, sign="W"), NOW)
    assert decision.opted_out is opted_out
    assert template_of(decision) == ("bye" if opted_out else "unknown")


# ---------------------------------------------------------------- purity


def test_decide_is_pure(contract: CompiledFile) -> None:
    conversation = Conversation(
        state="code", vars=MappingProxyType({"name": "Li"}), expires_at=NOW + timedelta(minutes=5)
    )
    before = copy.deepcopy(dict(conversation.vars)), conversation.state, conversation.expires_at
    first = decide(contract, conversation, msg("123456"), NOW)
    second = decide(contract, conversation, msg("123456"), NOW)
    assert first == second
    assert first.vars == {"name": "Li", "receipt": "123456"}
    assert (dict(conversation.vars), conversation.state, conversation.expires_at) == before
    assert first.vars is not conversation.vars


def test_decide_uses_the_given_time_not_the_clock(contract: CompiledFile) -> None:
    past = datetime(1999, 12, 31, 23, 59, tzinfo=UTC)
    future = datetime(2099, 6, 1, tzinfo=UTC)
    assert decide(contract, Conversation(), msg("hi"), past).expires_at == past + timedelta(minutes=30)
    assert decide(contract, Conversation(), msg("hi"), future).expires_at == future + timedelta(minutes=30)


def test_decisions_do_not_share_mutable_state(contract: CompiledFile) -> None:
    conversation = Conversation(state="idle", vars={"name": "Li"})
    decision = decide(contract, conversation, msg("hi"), NOW)
    assert isinstance(decision.vars, dict)
    decision.vars["name"] = "changed"
    assert conversation.vars == {"name": "Li"}
    assert decide(contract, conversation, msg("hi"), NOW).vars == {"name": "Li"}


EMOJI_RULES = """\
signature: E
templates:
  bye: {id: "1", text: "bye"}
  yes: {id: "2", text: "yes"}
opt_out: {keywords: [STOP, 🛑], reply: bye}
otherwise: {reply: yes}
"""


@pytest.mark.parametrize(("text", "opted_out"), [("🛑", True), ("🛑🏿", True), ("🛑🛑", False), ("👍", False)])
def test_an_emoji_opt_out_word_opts_out_through_decide(text: str, opted_out: bool) -> None:
    [decision] = converse(compile_text(EMOJI_RULES), [text], sign="E")
    assert (decision.opt_change == "opt_out") is opted_out
    assert template_of(decision) == ("bye" if opted_out else "yes")
