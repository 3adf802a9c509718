"""Issue 12 in the rule language: ``webhooks:`` and ``call:``/``on_error:``, ``extend:``, ``events:``.

The engine stays pure: ``decide()`` returns a ``WebhookCall`` for a rule with ``call:`` and
``resume()`` carries on once the edge has an outcome. Rule tests and ``smsbot simulate`` answer
calls from canned answers, so nothing here calls out.
"""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli import app
from bot.rules.compiler import FileResult, compile_file
from bot.rules.diagnostics import Diagnostic
from bot.rules.engine import decide, resume
from bot.rules.loader import load_rules
from bot.rules.model import (
    CompiledFile,
    Conversation,
    Decision,
    InboundMessage,
    Ruleset,
    WebhookCall,
    WebhookOutcome,
)
from bot.rules.simulation import TEST_CLOCK_START, run_file_tests, simulate
from bot.rules.templating import Bag, compile_expression
from tests.support import RULES, compile_text

NOW = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
SIGN = "Shop"

SHOP = textwrap.dedent(
    """\
    signature: Shop
    templates:
      ask:    {id: "1000001", text: "Your order number?"}
      status: {id: "1000002", text: "Order {1}: {2}."}
      down:   {id: "1000003", text: "Lookup is down."}
      ok:     {id: "1000004", text: "Confirmed."}
    opt_out: {keywords: [TD], reply: down}
    webhooks:
      order_status:
        url: http://127.0.0.1:9999/orders
        method: get
        body: {order: "{{ match.order }}", who: "{{ contact.mobile }}", tag: "{{ vars.tag }}"}
        timeout: 2s
      confirm:
        url: https://shop.example.com/confirm
        body: {id: "{{ vars.appointment_id }}"}
    start: idle
    states:
      idle:
        on:
          - keywords: [ORDER]
            reply: ask
            goto: order
      order:
        expires: 10m
        on:
          - regex: '^(?P<order>\\d{6})$'
            set: {tag: "web"}
            call: {webhook: order_status, save_as: order}
            reply: status
            params: ["{{ match.order }}", "{{ vars.order.status[:6] }}"]
            goto: idle
            on_error: {reply: down, goto: idle}
      appointment:
        entry: true
        expires: 1d
        on:
          - keywords: ["1"]
            call: {webhook: confirm}
            reply: ok
            goto: idle
    """
)


@pytest.fixture(scope="module")
def shop() -> CompiledFile:
    return compile_text(SHOP, name="shop.yaml", warnings=False)


def msg(text: str, *, sign: str = SIGN, extend: str = "") -> InboundMessage:
    return InboundMessage(text=text, sign=sign, nationcode="86", mobile="13800001234", extend=extend)


def lint(text: str) -> FileResult:
    return compile_file(textwrap.dedent(text), path="shop.yaml", name="shop.yaml")


def only(result: FileResult, severity: str, *words: str) -> Diagnostic:
    found = [d for d in result.diagnostics if d.severity == severity and all(w in d.message for w in words)]
    assert len(found) == 1, [str(d) for d in result.diagnostics]
    return found[0]


def line_of(text: str, needle: str) -> int:
    lines = textwrap.dedent(text).splitlines()
    [number] = [i for i, line in enumerate(lines, start=1) if needle in line]
    return number


def asking(rules: CompiledFile, text: str = "123456", state: str = "order") -> Decision:
    return decide(rules, Conversation(state=state), msg(text), NOW)


# ---------------------------------------------------------------- decide


def test_a_rule_with_call_returns_the_call_and_no_reply_yet(shop: CompiledFile) -> None:
    d = asking(shop)
    assert d.call == WebhookCall(
        webhook="order_status",
        rule=d.rule or "",
        save_as="order",
        method="GET",
        url="http://127.0.0.1:9999/orders",
        body={"order": "123456", "who": "13800001234", "tag": "web"},
        timeout=2.0,
        captures={"keyword": "", "order": "123456"},
    )
    assert d.rule == f"shop.yaml:{line_of(SHOP, 'regex:')}"
    assert d.replies == ()
    assert d.state == "order"  # the goto waits for the answer
    assert d.vars == {"tag": "web"}  # set: runs before the call, so the body can use it
    assert d.expires_at == NOW + timedelta(minutes=10)
    assert d.errors == ()


def test_rules_without_call_decide_as_before(shop: CompiledFile) -> None:
    d = decide(shop, Conversation(), msg("order"), NOW)
    assert d.call is None
    assert [r.template for r in d.replies] == ["ask"]
    assert d.state == "order"


def test_a_body_that_cannot_be_rendered_fails_the_call_at_once_and_takes_on_error() -> None:
    text = SHOP.replace('tag: "{{ vars.tag }}"', 'tag: "{{ vars.missing }}"')
    rules = compile_text(text, name="shop.yaml", warnings=True)
    d = asking(rules)
    assert d.call is None
    assert [r.template for r in d.replies] == ["down"]
    assert d.state == "idle"
    assert len(d.errors) == 1
    assert "body tag of webhook 'order_status'" in d.errors[0]
    assert "not made" in d.errors[0]


def test_a_body_failure_without_on_error_stays_silent_in_the_state(shop: CompiledFile) -> None:
    d = decide(shop, Conversation(state="appointment"), msg("1"), NOW)  # no appointment_id
    assert d.call is None
    assert d.replies == ()
    assert d.state == "appointment"
    assert d.errors
    assert "appointment_id" in d.errors[0]


# ---------------------------------------------------------------- resume


def test_resume_on_success_saves_the_answer_and_carries_on(shop: CompiledFile) -> None:
    first = asking(shop)
    assert first.call is not None
    later = NOW + timedelta(seconds=4)
    outcome = WebhookOutcome(ok=True, data={"status": "packed", "items": [{"sku": "A1"}]})
    d = resume(shop, first.conversation(), msg("123456"), first.call, outcome, later)
    assert d.call is None
    assert d.rule == first.rule
    assert d.rule_kind == "on"
    assert [(r.template, r.params) for r in d.replies] == [("status", ("123456", "packed"))]
    assert d.replies[0].text == "Order 123456: packed."
    assert d.state_before == "order"
    assert d.state == "idle"
    assert d.vars == {"tag": "web", "order": {"status": "packed", "items": [{"sku": "A1"}]}}
    assert d.expires_at is None  # idle has no expiry
    assert d.errors == ()


@pytest.mark.parametrize("error", ["timeout", "HTTP 500", "invalid JSON"])
def test_resume_on_failure_takes_on_error(shop: CompiledFile, error: str) -> None:
    first = asking(shop)
    assert first.call is not None
    d = resume(shop, first.conversation(), msg("123456"), first.call, WebhookOutcome(ok=False, error=error), NOW)
    assert [r.template for r in d.replies] == ["down"]
    assert d.state == "idle"
    assert "order" not in d.vars
    assert d.rule == first.rule


def test_resume_on_failure_without_on_error_stays_silent(shop: CompiledFile) -> None:
    convo = Conversation(state="appointment", vars={"appointment_id": "A-1"})
    first = decide(shop, convo, msg("1"), NOW)
    assert first.call is not None
    assert first.call.body == {"id": "A-1"}
    assert first.call.method == "POST"
    assert first.call.save_as is None
    assert first.call.timeout == 3.0
    later = NOW + timedelta(hours=1)
    d = resume(shop, first.conversation(), msg("1"), first.call, WebhookOutcome(ok=False, error="timeout"), later)
    assert d.replies == ()
    assert d.state == "appointment"
    assert d.expires_at == later + timedelta(days=1)
    assert d.errors == ()
    ok = resume(shop, first.conversation(), msg("1"), first.call, WebhookOutcome(ok=True, data=[1, 2]), later)
    assert [r.template for r in ok.replies] == ["ok"]
    assert ok.state == "idle"
    assert ok.vars == {"appointment_id": "A-1"}  # no save_as: the answer is not kept


def test_resume_of_a_rule_that_no_longer_exists_sends_nothing(shop: CompiledFile) -> None:
    first = asking(shop)
    assert first.call is not None
    moved = WebhookCall(**{**first.call.__dict__, "rule": "shop.yaml:9999"})
    d = resume(shop, first.conversation(), msg("123456"), moved, WebhookOutcome(ok=True, data={}), NOW)
    assert d.replies == ()
    assert d.state == "order"
    assert d.rule == "shop.yaml:9999"
    assert len(d.errors) == 1
    assert "no longer exists" in d.errors[0]
    renamed = WebhookCall(**{**first.call.__dict__, "webhook": "other"})
    d = resume(shop, first.conversation(), msg("123456"), renamed, WebhookOutcome(ok=True, data={}), NOW)
    assert d.replies == ()
    assert "no longer exists" in d.errors[0]


def test_resume_after_an_opt_out_keeps_the_answer_but_sends_nothing(shop: CompiledFile) -> None:
    first = asking(shop)
    assert first.call is not None
    opted = decide(shop, first.conversation(), msg("TD"), NOW)
    assert opted.opted_out
    d = resume(
        shop, opted.conversation(), msg("123456"), first.call, WebhookOutcome(ok=True, data={"status": "x"}), NOW
    )
    assert d.replies == ()
    assert d.opted_out
    assert d.vars["order"] == {"status": "x"}


def test_resume_through_a_ruleset_finds_the_file_by_signature_and_extend(shop: CompiledFile) -> None:
    scoped_text = SHOP.replace("signature: Shop", 'signature: Shop\nextend: "01"')
    scoped = compile_text(scoped_text, name="shop-01.yaml", warnings=False)
    ruleset = Ruleset.of((shop, scoped))
    first = decide(ruleset, Conversation(state="order"), msg("123456", extend="01"), NOW)
    assert first.call is not None
    assert first.rule is not None
    assert first.rule.startswith("shop-01.yaml:")
    assert first.rules_file == "shop-01.yaml"
    outcome = WebhookOutcome(ok=True, data={"status": "sent"})
    d = resume(ruleset, first.conversation(), msg("123456", extend="01"), first.call, outcome, NOW)
    assert d.rules_file == "shop-01.yaml"
    assert d.replies[0].params == ("123456", "sent")
    # The same call resumed without the extend code lands in the other file: its ref is unknown there.
    lost = resume(ruleset, first.conversation(), msg("123456"), first.call, outcome, NOW)
    assert lost.replies == ()
    assert "no longer exists" in lost.errors[0]


# ---------------------------------------------------------------- nested vars


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ vars.order.status }}", "packed"),
        ("{{ vars.order.items[0].sku }}", "A1"),
        ("{{ vars.order.items | length }}", "2"),
        ("{{ vars.order['status'] }}", "packed"),
        ("{{ vars.order.total }}", "12.5"),
        ("{{ vars.order.keys | default('none') }}", "none"),  # a dict's methods are not reachable
        ("{{ vars.order.missing | default('?') }}", "?"),
        ("{{ vars.name }}", "Li"),
    ],
)
def test_templates_read_nested_json_vars(source: str, expected: str) -> None:
    data = {"name": "Li", "order": {"status": "packed", "total": 12.5, "items": [{"sku": "A1"}, "loose"]}}
    assert compile_expression(source).render({"vars": Bag(data)}) == expected


# ---------------------------------------------------------------- extend


def test_for_signature_prefers_the_extend_file_then_the_signature_file_then_the_default() -> None:
    plain = compile_text("signature: Shop\nopt_out: {keywords: [TD]}\n", name="shop.yaml")
    campaign = compile_text('signature: Shop\nextend: "01"\nopt_out: {keywords: [TD]}\n', name="shop-01.yaml")
    fallback = compile_text('signature: "*"\n', name="default.yaml")
    ruleset = Ruleset.of((plain, campaign, fallback))
    assert campaign.extend == "01"
    assert plain.extend == ""
    assert ruleset.for_signature("Shop", "01") is campaign
    assert ruleset.for_signature("【Shop】", "01") is campaign
    assert ruleset.for_signature("Shop") is plain
    assert ruleset.for_signature("Shop", "02") is plain
    assert ruleset.for_signature("Other", "01") is fallback
    only_campaign = Ruleset.of((campaign, fallback))
    assert only_campaign.for_signature("Shop") is fallback
    assert only_campaign.for_signature("Shop", "01") is campaign


def test_decide_uses_the_messages_extend_code() -> None:
    plain = compile_text(
        'signature: Shop\ntemplates: {a: {id: "1", text: "A"}}\nopt_out: {keywords: [TD]}\notherwise: {reply: a}\n',
        name="a.yaml",
    )
    campaign = compile_text(
        'signature: Shop\nextend: "7"\ntemplates: {b: {id: "2", text: "B"}}\nopt_out: {keywords: [TD]}\n'
        "otherwise: {reply: b}\n",
        name="b.yaml",
    )
    ruleset = Ruleset.of((plain, campaign))
    assert decide(ruleset, Conversation(), msg("x", extend="7"), NOW).replies[0].template == "b"
    assert decide(ruleset, Conversation(), msg("x"), NOW).replies[0].template == "a"


def test_one_signature_and_extend_claimed_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text('signature: Shop\nextend: "01"\nopt_out: {keywords: [TD]}\n', encoding="utf-8")
    (tmp_path / "b.yaml").write_text('signature: Shop\nextend: "02"\nopt_out: {keywords: [TD]}\n', encoding="utf-8")
    (tmp_path / "c.yaml").write_text("signature: Shop\nopt_out: {keywords: [TD]}\n", encoding="utf-8")
    assert load_rules(tmp_path).ok
    (tmp_path / "d.yaml").write_text(
        'description: again\nsignature: "【Shop】"\nextend: "01"\nopt_out: {keywords: [TD]}\n', encoding="utf-8"
    )
    result = load_rules(tmp_path)
    assert result.ruleset is None
    [problem] = result.errors
    assert (Path(problem.path).name, problem.line) == ("d.yaml", 2)
    assert "extend '01' is already claimed by" in problem.message
    assert "a.yaml:1" in problem.message


# ---------------------------------------------------------------- rules check

BASE = """\
signature: Shop
templates:
  a: {id: "1000001", text: "A"}
opt_out: {keywords: [TD]}
"""


@pytest.mark.parametrize(
    ("extra", "needle", "words"),
    [
        (
            "webhooks: {lookup: {url: 'http://x.example/a'}}\n"
            "states:\n  s:\n    on:\n      - keywords: [A]\n        call: {webhook: lokup}\n",
            "call:",
            ("unknown webhook 'lokup'", "did you mean 'lookup'"),
        ),
        ("webhooks: {lookup: {url: 'ftp://x.example/a'}}\n", "url:", ("url 'ftp://x.example/a'", "http://")),
        ("webhooks: {lookup: {url: 'https:///a'}}\n", "url:", ("has no host",)),
        ("webhooks: {lookup: {url: 'https://x/{{ vars.id }}'}}\n", "url:", ("literal text",)),
        ("webhooks: {lookup: {url: 'https://x', timeout: 31s}}\n", "url:", ("timeout 31s", "maximum of 30s")),
        ("webhooks: {lookup: {url: 'https://x', body: {a: '{{ nope }}'}}}\n", "url:", ("unknown variable 'nope'",)),
        (
            "webhooks: {lookup: {url: 'https://x'}}\n"
            "states:\n  s:\n    on:\n      - keywords: [A]\n        call: {webhook: lookup, save_as: 2x}\n",
            "call:",
            ("save_as '2x' must be a variable name",),
        ),
        (
            "states:\n  s:\n    on:\n      - keywords: [A]\n        on_error: {reply: a}\n",
            "on_error",
            ("on_error without call",),
        ),
        (
            "webhooks: {lookup: {url: 'https://x'}}\n"
            "states:\n  s:\n    on:\n      - keywords: [A]\n        call: {webhook: lookup}\n"
            "        on_error: {goto: nowhere}\n",
            "on_error",
            ("goto names unknown state 'nowhere'",),
        ),
        (
            "webhooks: {lookup: {url: 'https://x', body: {a: '{{ match.code }}'}}}\n"
            "states:\n  s:\n    on:\n      - keywords: [A]\n        call: {webhook: lookup}\n",
            "call:",
            ("body a reads 'match.code'", "captures keyword"),
        ),
        ('extend: "0x1"\n', "extend", ("extend '0x1' must be 1 to 8 digits",)),
        (
            "events: {crm: {url: 'https://crm.example/h', kinds: [opted_out, state_enterd]}}\n",
            "kinds",
            ("unknown event kind 'state_enterd'", "did you mean 'state_entered'"),
        ),
        ("events: {CRM: {url: 'https://crm.example/h'}}\n", "CRM", ("endpoint name 'CRM'", "lower-case")),
        ("events: {crm: {url: 'mailto:a@b'}}\n", "crm", ("event endpoint 'crm': url",)),
        (
            "webhooks: {lookup: {url: 'https://x'}}\n"
            "tests:\n  - name: t\n    say: [A]\n    expect: [{}]\n    webhooks: {lokup: {json: {}}}\n",
            "lokup",
            ("answers unknown webhook 'lokup'",),
        ),
        (
            "webhooks: {lookup: {url: 'https://x'}}\n"
            "tests:\n  - name: t\n    say: [A]\n    expect: [{}]\n    webhooks: {lookup: {json: {}, error: timeout}}\n",
            "lookup: {json",
            ("exactly one of json",),
        ),
        ("tests:\n  - name: t\n    state: nowhere\n    say: [A]\n    expect: [{}]\n", "state: nowhere", ("nowhere",)),
        (
            "webhooks: {lookup: {url: 'https://x', method: PUT}}\n",
            "url:",
            ("webhooks.lookup.method", "'GET' or 'POST'"),
        ),
    ],
)
def test_check_reports_webhook_problems_at_their_line(extra: str, needle: str, words: tuple[str, ...]) -> None:
    text = BASE + extra
    result = lint(text)
    errors = [d for d in result.diagnostics if d.is_error]
    assert len(errors) == 1, [str(d) for d in result.diagnostics]
    assert result.compiled is None
    [error] = errors
    assert error.line == line_of(text, needle), str(error)
    for word in words:
        assert word in error.message, str(error)


def test_the_default_file_cannot_have_an_extend() -> None:
    result = lint('signature: "*"\nextend: "01"\n')
    assert only(result, "error", "default file", "cannot have an extend").line == 2


def test_reading_a_save_as_var_outside_its_calling_rule_is_warned_about() -> None:
    text = BASE.replace(
        '  a: {id: "1000001", text: "A"}', '  a: {id: "1000001", text: "A"}\n  s: {id: "2", text: "{1}"}'
    )
    text += textwrap.dedent(
        """\
        webhooks: {lookup: {url: 'https://x'}}
        states:
          s:
            on:
              - keywords: [A]
                call: {webhook: lookup, save_as: order}
                reply: s
                params: ["{{ vars.order.st[:6] }}"]
              - keywords: [B]
                reply: s
                params: ["{{ vars.order.st[:6] }}"]
              - keywords: [C]
                reply: s
                params: ["{{ (vars.order.st | default('-'))[:6] }}"]
        """
    )
    result = lint(text)
    assert [d for d in result.diagnostics if d.is_error] == []
    warned = [d for d in result.diagnostics if "answer of a webhook call" in d.message]
    assert [d.line for d in warned] == [line_of(text, "keywords: [B]") + 2], [str(d) for d in result.diagnostics]
    assert f"save_as at line {line_of(text, 'save_as: order')}" in warned[0].message


def test_an_entry_state_is_not_unreachable_and_on_error_gotos_count() -> None:
    text = BASE + textwrap.dedent(
        """\
        webhooks: {lookup: {url: 'https://x'}}
        start: idle
        states:
          idle:
            on:
              - keywords: [A]
                call: {webhook: lookup}
                on_error: {goto: sorry}
          sorry: {}
          started: {entry: true}
          lost: {}
        """
    )
    result = lint(text)
    unreachable = [d.message for d in result.diagnostics if "unreachable" in d.message]
    assert len(unreachable) == 1, unreachable
    assert "'lost'" in unreachable[0]


def test_compiled_file_exposes_webhooks_and_events() -> None:
    text = BASE + textwrap.dedent(
        """\
        extend: "01"
        webhooks:
          lookup: {url: 'https://x.example/a', method: GET, body: {q: "{{ text }}"}, timeout: 1m30s}
        events:
          crm: {url: 'https://crm.example/h', kinds: [opted_out, state_entered]}
          all-of-it: {url: 'http://127.0.0.1:8001/e'}
        """
    ).replace("1m30s", "30s")
    compiled = compile_text(text, name="shop.yaml", warnings=False)
    assert compiled.extend == "01"
    hook = compiled.webhooks["lookup"]
    assert (hook.name, hook.url, hook.method, hook.timeout) == ("lookup", "https://x.example/a", "GET", 30.0)
    assert [k for k, _ in hook.body or ()] == ["q"]
    assert compiled.events["crm"].kinds == frozenset({"opted_out", "state_entered"})
    assert compiled.events["crm"].url == "https://crm.example/h"
    assert len(compiled.events["all-of-it"].kinds) == 5


# ---------------------------------------------------------------- rules test and simulate


def test_rule_tests_answer_calls_from_canned_answers_and_start_in_a_state(tmp_path: Path) -> None:
    text = SHOP + textwrap.dedent(
        """\
        tests:
          - name: found
            say: [ORDER, "123456"]
            webhooks: {order_status: {json: {status: packed}}}
            expect: [{call: null}, {call: order_status, reply: status, params: ["123456", packed], vars: {order: {status: packed}}}]
          - name: down
            say: [ORDER, "123456"]
            webhooks: {order_status: {status: 503}}
            expect: [{}, {reply: down, state: idle}]
          - name: unanswered
            say: [ORDER, "123456"]
            expect: [{}, {reply: down}]
          - name: wrong expectations
            state: appointment
            vars: {appointment_id: A-1}
            say: ["1"]
            webhooks: {confirm: {json: {}}}
            expect: [{call: order_status, reply: ok, state: appointment}]
        """
    )
    compiled = compile_text(text, name="shop.yaml", warnings=False)
    outcomes = {o.name: o for o in run_file_tests(compiled)}
    assert outcomes["found"].passed, [str(f) for f in outcomes["found"].failures]
    assert outcomes["down"].passed, [str(f) for f in outcomes["down"].failures]
    [missing] = outcomes["unanswered"].failures
    assert "webhook 'order_status' was called but the test gives no answer" in str(missing)
    wrong = [(f.what, f.expected, f.actual) for f in outcomes["wrong expectations"].failures]
    assert wrong == [("state", "appointment", "idle"), ("call", "order_status", "confirm")]


def test_simulate_yields_the_call_its_canned_outcome_and_the_final_decision(shop: CompiledFile) -> None:
    steps = list(
        simulate(
            shop,
            ["ORDER", "123456", "ORDER", "654321"],
            sign=SIGN,
            start=TEST_CLOCK_START,
            webhooks={"order_status": WebhookOutcome(ok=True, data={"status": "sent"})},
        )
    )
    assert [s.call.webhook if s.call else None for s in steps] == [None, "order_status", None, "order_status"]
    assert steps[1].called is not None
    assert steps[1].called.state == "order"
    assert steps[1].decision.replies[0].params == ("123456", "sent")
    assert steps[3].decision.replies[0].params == ("654321", "sent")
    assert not steps[1].unanswered
    unanswered = list(simulate(shop, ["123456"], sign=SIGN, start=TEST_CLOCK_START, state="order"))
    assert unanswered[0].unanswered
    assert [r.template for r in unanswered[0].decision.replies] == ["down"]


runner = CliRunner()


@pytest.fixture
def shop_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SMSBOT_CONFIG", raising=False)
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "shop.yaml").write_text(SHOP, encoding="utf-8")
    (folder / "shop-9.yaml").write_text(
        SHOP.replace("signature: Shop", 'signature: Shop\nextend: "9"').replace("Lookup is down.", "Down (9)."),
        encoding="utf-8",
    )
    return folder


def test_simulate_cli_prints_the_call_and_uses_the_canned_answer(shop_dir: Path, tmp_path: Path) -> None:
    answer = tmp_path / "order.json"
    answer.write_text(json.dumps({"status": "packed"}), encoding="utf-8")
    args = ["simulate", "--rules", str(shop_dir), "--sign", SIGN, "--webhook", f"order_status={answer}"]
    result = runner.invoke(app, [*args, "ORDER", "123456"])
    assert result.exit_code == 0, result.output
    assert "webhook order_status: GET http://127.0.0.1:9999/orders" in result.stdout
    assert '"order": "123456"' in result.stdout
    assert 'answer: {"status": "packed"} -> vars.order' in result.stdout
    assert "Order 123456: packed." in result.stdout

    lines = [json.loads(line) for line in runner.invoke(app, [*args, "--json", "ORDER", "123456"]).stdout.splitlines()]
    assert "call" not in lines[0]
    assert lines[1]["call"]["webhook"] == "order_status"
    assert lines[1]["call"]["body"] == {"order": "123456", "who": "13800000000", "tag": "web"}
    assert lines[1]["outcome"] == {"made": True, "ok": True, "data": {"status": "packed"}, "error": None}
    assert lines[1]["replies"][0]["params"] == ["123456", "packed"]


def test_simulate_cli_without_an_answer_does_not_call_and_takes_on_error(shop_dir: Path) -> None:
    result = runner.invoke(app, ["simulate", "--rules", str(shop_dir), "--sign", SIGN, "--state", "order", "123456"])
    assert result.exit_code == 0, result.output
    assert "not called (no --webhook order_status=FILE given): taking on_error" in result.stdout
    assert "Lookup is down." in result.stdout
    failed = runner.invoke(
        app,
        ["simulate", "--rules", str(shop_dir), "--sign", SIGN, "--extend", "9", "--state", "order"]
        + ["--webhook", "order_status=error:timeout", "--json", "123456"],
    )
    assert failed.exit_code == 0, failed.output
    line = json.loads(failed.stdout)
    assert line["outcome"] == {"made": True, "ok": False, "data": None, "error": "timeout"}
    assert line["replies"][0]["text"] == "Down (9)."  # the extend file answered
    assert line["rule"].startswith("shop-9.yaml:")


def test_simulate_cli_with_vars_and_status_answer(shop_dir: Path) -> None:
    result = runner.invoke(
        app,
        ["simulate", "--rules", str(shop_dir), "--sign", SIGN, "--state", "appointment"]
        + ["--var", "appointment_id=A-7", "--webhook", "confirm=status:500", "--json", "1"],
    )
    assert result.exit_code == 0, result.output
    line = json.loads(result.stdout)
    assert line["call"]["body"] == {"id": "A-7"}
    assert line["outcome"]["error"] == "HTTP 500"
    assert line["replies"] == []
    assert line["state"] == "appointment"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--webhook", "order_status=/no/such.json"], ("--webhook order_status", "cannot read JSON")),
        (["--webhook", "nope=error:timeout"], ("has no webhook 'nope'", "order_status")),
        (["--webhook", "order_status"], ("expected NAME=VALUE",)),
        (["--state", "nowhere"], ("--state", "no state 'nowhere'")),
        (["--var", "x"], ("--var", "expected NAME=VALUE")),
    ],
)
def test_simulate_cli_refuses_bad_options(shop_dir: Path, args: list[str], words: tuple[str, ...]) -> None:
    result = runner.invoke(app, ["simulate", "--rules", str(shop_dir), "--sign", SIGN, *args, "123456"])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.stderr
    assert result.stdout == ""


def test_rules_test_cli_names_a_webhook_without_canned_answer(shop_dir: Path) -> None:
    (shop_dir / "shop.yaml").write_text(
        SHOP + 'tests:\n  - name: no answer\n    say: [ORDER, "123456"]\n    expect: [{}, {reply: down}]\n',
        encoding="utf-8",
    )
    result = runner.invoke(app, ["rules", "test", str(shop_dir)])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout
    assert "webhook 'order_status' was called but the test gives no answer for it" in result.stdout


def test_example_rules_cover_the_order_lookup_and_the_appointment_flow() -> None:
    result = load_rules(RULES)
    assert result.ruleset is not None
    acme = result.ruleset.for_signature("Acme Shop")
    assert acme is not None
    assert set(acme.webhooks) >= {"order_status", "confirm_appointment"}
    assert acme.states["appointment"] is not None
    assert acme.templates["appointment"].placeholders == 2
    assert not acme.templates["appointment"].marketing
    called = {t.name for t in acme.tests if t.webhooks}
    assert len(called) >= 4
