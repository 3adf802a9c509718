"""Running conversations through the engine without storing or sending anything.

Used by ``smsbot simulate``, by the ``tests:`` of rule files and (later) by the
console's simulator, so all three show exactly what production would do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bot.rules.engine import decide
from bot.rules.model import CompiledFile, Conversation, Decision, InboundMessage, Ruleset
from bot.rules.schema import Expect

TEST_CLOCK_START = datetime(2026, 1, 5, 2, 0, tzinfo=UTC)
"""A fixed start time for rule tests (10:00 China time on a Monday), so they never depend on the clock."""


@dataclass(frozen=True)
class Step:
    text: str
    at: datetime
    decision: Decision


def simulate(
    rules: Ruleset | CompiledFile,
    messages: Sequence[str],
    *,
    sign: str,
    start: datetime,
    gap: timedelta = timedelta(seconds=1),
    nationcode: str = "86",
    mobile: str = "13800000000",
    variables: Mapping[str, str] | None = None,
) -> Iterator[Step]:
    """Feed ``messages`` one ``gap`` apart to one fresh conversation."""
    conversation = Conversation(vars=dict(variables or {}))
    at = start
    for text in messages:
        message = InboundMessage(text=text, sign=sign, nationcode=nationcode, mobile=mobile)
        decision = decide(rules, conversation, message, at)
        yield Step(text, at, decision)
        conversation = decision.conversation()
        at += gap


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
        steps = simulate(rules, test.say, sign=sign, start=TEST_CLOCK_START, gap=test.gap, variables=test.vars)
        failures: list[TestFailure] = []
        for number, (step, expect) in enumerate(zip(steps, test.expect, strict=False), start=1):
            problems = [(what, want, got) for what, want, got in _comparisons(expect, step.decision) if want != got]
            problems += [("no error", None, error) for error in step.decision.errors]
            failures += [
                TestFailure(rules.path, line, test.name, number, step.text, what, want, got)
                for what, want, got in problems
            ]
        outcomes.append(TestOutcome(rules.path, test.name, line, tuple(failures)))
    return outcomes


def _comparisons(expect: Expect, d: Decision) -> list[tuple[str, object, object]]:
    """(what, expected, actual) for every key the test step gives."""
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
    for name, value in (expect.vars or {}).items():
        pairs.append((f"vars.{name}", value, d.vars.get(name)))
    return pairs
