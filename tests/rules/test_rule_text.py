"""``rule_text``: the lines of the rule a reply's ``file:line`` points at, as the explain view shows them."""

from __future__ import annotations

from bot.rules.versions import rule_text
from tests.support import RULES

ACME = (RULES / "acme-shop.yaml").read_text(encoding="utf-8")
LINES = ACME.splitlines()


def line_of(text: str) -> int:
    return next(i for i, line in enumerate(LINES, 1) if line.strip() == text)


def rule_lines(line: int) -> list[str]:
    found = rule_text(ACME, line)
    assert found is not None
    assert found.exact
    return [text for _, text, hit in found.numbered() if hit]


def test_a_rule_is_its_line_to_the_next_line_indented_less() -> None:
    hours = line_of('- keywords: ["2"]')
    assert rule_lines(hours) == [
        '      - keywords: ["2"]',
        "        reply: hours",
        '        params: ["9:00", "18:00"]',
        "        goto: idle",
    ]
    # A block section (opt_out:) ends at the next top-level key; a one-line rule is its line.
    opt_out = line_of("keywords: [STOP, TD, T, 退订, UNSUBSCRIBE, STOPALL, CANCEL, QUIT]")
    assert rule_lines(opt_out)[-1] == "  reply: bye"
    assert len(rule_lines(opt_out)) == 4
    assert rule_lines(line_of("otherwise: {reply: ask_code}")) == ["    otherwise: {reply: ask_code}"]
    # Two lines of context either side, not highlighted.
    shown = rule_text(ACME, hours)
    assert shown is not None
    assert shown.first == hours - 2
    assert [n for n, _, hit in shown.numbered() if not hit] == [hours - 2, hours - 1, hours + 4, hours + 5]


def test_a_line_where_no_rule_starts_gets_a_window_and_a_missing_line_nothing() -> None:
    found = rule_text(ACME, 9)  # a template, not a rule
    assert found is not None
    assert not found.exact
    assert [n for n, _, hit in found.numbered() if hit] == [9]
    assert (found.first, len(found.lines)) == (6, 7)
    broken = rule_text("a: [unclosed\nb: 2\n", 2)
    assert broken is not None
    assert not broken.exact
    assert rule_text(ACME, len(LINES) + 1) is None
    assert rule_text(ACME, 0) is None
