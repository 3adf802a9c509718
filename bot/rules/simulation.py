"""Running conversations through the engine without storing or sending anything.

Used by ``smsbot simulate``, by the ``tests:`` of rule files and by the
console's simulator, so all three show exactly what production would do.

Nothing here calls out: a rule's ``call:`` is answered from canned answers (a
test's ``webhooks:``, ``simulate --webhook``), and a call without one is not
made at all and takes the rule's ``on_error``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.rules.engine import decide, resume
from bot.rules.model import (
    CompiledFile,
    Conversation,
    Decision,
    InboundMessage,
    Ruleset,
    WebhookCall,
    WebhookOutcome,
)
from bot.rules.schema import CannedAnswer, Expect

TEST_CLOCK_START = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
"""A fixed start time for rule tests (10:00 China time on a Monday), so they never depend on the clock."""

NOT_CALLED = "not called: no canned answer"
"""The error of a call that had no canned answer (the simulation never calls out)."""


@dataclass(frozen=True)
class Step:
    text: str
    at: datetime
    decision: Decision
    """What the message finally did: after the webhook's answer when the rule called one."""
    call: WebhookCall | None = None
    """The webhook call the fired rule asked for."""
    outcome: WebhookOutcome | None = None
    """The canned answer it got (a failure with ``NOT_CALLED`` when there was none)."""
    called: Decision | None = None
    """The decision that asked for the call (before ``resume``)."""

    @property
    def unanswered(self) -> bool:
        """A call was asked for but no canned answer was given: it was not made, on_error was taken."""
        return self.call is not None and self.outcome is not None and self.outcome.error == NOT_CALLED

    @property
    def errors(self) -> tuple[str, ...]:
        return (self.called.errors if self.called else ()) + self.decision.errors


def canned_outcome(answer: CannedAnswer) -> WebhookOutcome:
    """The outcome a test's canned answer stands for."""
    if "json_" in answer.model_fields_set:
        return WebhookOutcome(ok=True, data=answer.json_)
    if answer.status is not None:
        return WebhookOutcome(ok=False, error=f"HTTP {answer.status}")
    return WebhookOutcome(ok=False, error=answer.error)


def simulate(
    rules: Ruleset | CompiledFile,
    messages: Sequence[str],
    *,
    sign: str,
    start: datetime,
    gap: timedelta = timedelta(seconds=1),
    nationcode: str = "86",
    mobile: str = "13800000000",
    variables: Mapping[str, Any] | None = None,
    state: str | None = None,
    extend: str = "",
    webhooks: Mapping[str, WebhookOutcome] | None = None,
) -> Iterator[Step]:
    """Feed ``messages`` one ``gap`` apart to one fresh conversation (begun in ``state``, if given).

    A rule's webhook call is answered from ``webhooks`` (by name); without an answer it is
    not made and the rule's ``on_error`` follows.
    """
    conversation = Conversation(state=state, vars=dict(variables or {}))
    at = start
    for text in messages:
        message = InboundMessage(text=text, sign=sign, nationcode=nationcode, mobile=mobile, extend=extend)
        step = simulate_message(rules, conversation, message, at, webhooks=webhooks)
        yield step
        conversation = step.decision.conversation()
        at += gap


def simulate_message(
    rules: Ruleset | CompiledFile,
    conversation: Conversation,
    message: InboundMessage,
    at: datetime,
    *,
    webhooks: Mapping[str, WebhookOutcome] | None = None,
) -> Step:
    """One message to a conversation as it stands (``simulate``'s step; the console's simulator too).

    A rule's webhook call is answered from ``webhooks`` (by name); without an answer it is
    not made and the rule's ``on_error`` follows (``NOT_CALLED``).
    """
    decision = decide(rules, conversation, message, at)
    if decision.call is None:
        return Step(message.text, at, decision)
    call = decision.call
    outcome = (webhooks or {}).get(call.webhook) or WebhookOutcome(ok=False, error=NOT_CALLED)
    final = resume(rules, decision.conversation(), message, call, outcome, at)
    return Step(message.text, at, final, call=call, outcome=outcome, called=decision)


@dataclass(frozen=True)
class TestFailure:
    """One expectation of a rule test that the rules did not meet."""

    path: str
    line: int
    test: str
    step: int
    said: str
    what: str
    expected: object
    actual: object

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}: test '{self.test}' step {self.step} (said {self.said!r})"
        if self.what == "no error":
            return f"{where}: the rules failed: {self.actual}"
        if self.what == "webhook answer":
            return (
                f"{where}: webhook '{self.actual}' was called but the test gives no answer for it "
                f"(add webhooks: {{{self.actual}: {{json: ...}}}} or {{error: timeout}})"
            )
        return f"{where}: expected {self.what} {self.expected!r}, got {self.actual!r}"


@dataclass(frozen=True)
class TestOutcome:
    path: str
    name: str
    line: int
    failures: tuple[TestFailure, ...]

    @property
    def passed(self) -> bool:
        return not self.failures


def run_file_tests(rules: CompiledFile) -> list[TestOutcome]:
    """Run the ``tests:`` of one compiled file."""
    outcomes = []
    for test, line in zip(rules.tests, rules.test_lines, strict=True):
        sign = rules.signature if rules.signature != "*" else "any"
        steps = simulate(
            rules,
            test.say,
            sign=sign,
            start=TEST_CLOCK_START,
            gap=test.gap,
            variables=test.vars,
            state=test.state,
            extend=rules.extend,
            webhooks={name: canned_outcome(answer) for name, answer in test.webhooks.items()},
        )
        failures: list[TestFailure] = []
        for number, (step, expect) in enumerate(zip(steps, test.expect, strict=False), start=1):
            problems = [(what, want, got) for what, want, got in _comparisons(expect, step) if want != got]
            if step.unanswered and step.call is not None:
                problems.append(("webhook answer", None, step.call.webhook))
            problems += [("no error", None, error) for error in step.errors]
            failures += [
                TestFailure(rules.path, line, test.name, number, step.text, what, want, got)
                for what, want, got in problems
            ]
        outcomes.append(TestOutcome(rules.path, test.name, line, tuple(failures)))
    return outcomes


def _comparisons(expect: Expect, step: Step) -> list[tuple[str, object, object]]:
    """(what, expected, actual) for every key the test step gives."""
    d = step.decision
    reply = d.replies[0] if d.replies else None
    given = expect.model_fields_set
    pairs: list[tuple[str, object, object]] = []
    if "reply" in given:
        pairs.append(("reply", expect.reply, reply.template if reply else None))
    if "params" in given:
        pairs.append(("params", expect.params, list(reply.params) if reply else None))
    if "text" in given:
        pairs.append(("text", expect.text, reply.text if reply else None))
    if "state" in given:
        pairs.append(("state", expect.state, d.state))
    if "opted_out" in given:
        pairs.append(("opted_out", expect.opted_out, d.opted_out))
    if "call" in given:
        pairs.append(("call", expect.call, step.call.webhook if step.call else None))
    for name, value in (expect.vars or {}).items():
        pairs.append((f"vars.{name}", value, d.vars.get(name)))
    return pairs
