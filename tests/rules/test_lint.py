"""Every problem `smsbot rules check` must report, pinned to its line and column.

Most cases are rows of one table (``CASES``): a rule file in, the diagnostics
it must produce out, checked by one runner (``test_diagnostics``), in the
table-driven style of nyaruka/courier's handler tests. A row lists *every*
error and warning the file produces (less the missing-opt-out warning, which
most snippets earn on purpose), so a new, lost or moved diagnostic fails it.
Tests that check something other than one file's diagnostics (folders, the
global limit, the contract file, YAML 1.1 scalars) stay functions below.

Rule files are written inline (dedented, first line = line 1) so the expected
line numbers can be read straight off the YAML. Columns are given as the text
they must point at on that line (``at``), so each row says *what* the column
must point at.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from bot.rules.compiler import FileResult, compile_file
from bot.rules.diagnostics import Diagnostic
from bot.rules.loader import load_rules
from bot.rules.simulation import TEST_CLOCK_START, simulate
from bot.rules.yaml_source import load_located
from tests.support import CONTRACT


def rules(source: str) -> str:
    """Dedent an inline rule file; write it as ``rules(\"\"\"\\`` so its first line is line 1."""
    return textwrap.dedent(source)


def lint(text: str, *, param_max_length: int | None = None) -> FileResult:
    return compile_file(text, path="shop.yaml", name="shop.yaml", param_max_length=param_max_length)


def col(text: str, line: int, needle: str) -> int:
    """1-based column of ``needle`` on ``line`` of ``text`` (it must be there exactly once)."""
    source_line = text.splitlines()[line - 1]
    assert source_line.count(needle) == 1, f"{needle!r} must occur once on line {line}: {source_line!r}"
    return source_line.index(needle) + 1


def errors(result: FileResult) -> list[Diagnostic]:
    return [d for d in result.diagnostics if d.severity == "error"]


NO_OPT_OUT = "no opt_out section"


def warnings(result: FileResult) -> list[Diagnostic]:
    """Warnings, less the missing-opt-out one: most snippets here leave opt_out out on purpose."""
    return [d for d in result.diagnostics if d.severity == "warning" and NO_OPT_OUT not in d.message]


def the_one(diagnostics: list[Diagnostic], *words: str) -> Diagnostic:
    """The single diagnostic whose message contains all ``words``."""
    found = [d for d in diagnostics if all(w in d.message for w in words)]
    assert len(found) == 1, f"expected one diagnostic with {words}, got: {[str(d) for d in diagnostics]}"
    return found[0]


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Expect:
    """One diagnostic a rule file must produce.

    It is found by ``words`` (exactly one diagnostic of its severity may contain
    them all); ``also`` are further fragments its message must contain. The
    position is ``line`` and, when given, the column: where ``at`` stands on that
    line, or ``col`` outright.
    """

    words: tuple[str, ...]
    line: int
    at: str | None = None
    col: int | None = None
    also: tuple[str, ...] = ()
    severity: Literal["error", "warning"] = "error"


def error(*words: str, line: int, at: str | None = None, col: int | None = None, also: tuple[str, ...] = ()) -> Expect:
    return Expect(words, line, at, col, also, "error")


def warning(*words: str, line: int, at: str | None = None, also: tuple[str, ...] = ()) -> Expect:
    return Expect(words, line, at, None, also, "warning")


@dataclass(frozen=True)
class Case:
    """A rule file and everything ``compile_file`` must say about it.

    ``expect`` is the whole list (errors and warnings, less the missing-opt-out
    warning); an empty one means the file is clean. Files with errors must not
    compile, files with only warnings must. ``absent``: fragments no diagnostic
    at all may contain. ``unfiltered``: compare ``expect`` with every diagnostic,
    the missing-opt-out warning included (a file YAML cannot read gets none).
    """

    id: str
    text: str
    expect: tuple[Expect, ...] = ()
    absent: tuple[str, ...] = ()
    unfiltered: bool = False


LENGTH_RULES = """\
signature: Acme
templates:
  thanks: {{id: "1", text: "Code {{1}} ok"}}
{extra}states:
  idle:
    on:
      - keywords: [HI]
        reply: thanks
        params: ["{param}"]
"""


def length_rules(param: str, extra: str = "") -> str:
    return LENGTH_RULES.format(param=param, extra=extra)


LONG_TEXT = "x" * 60 + "。"  # 61 UCS-2 characters + 【Acme Shop】 (11) = 72 > 70

CASES = [
    # ------------------------------------------------------------ YAML itself
    Case(
        "yaml-syntax-error-points-at-the-bad-line",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            start: idle: menu
            states:
              idle: {}
            """),
        (error("YAML syntax error", "mapping values are not allowed", line=4, at=": menu"),),  # the second colon
        unfiltered=True,
    ),
    Case(
        "yaml-unclosed-quote-is-a-syntax-error-not-a-crash",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1, text: "Menu"}
            """),
        (error("YAML syntax error", line=3),),
    ),
    Case(
        "duplicate-yaml-key-is-an-error-naming-both-lines",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: menu
              idle:
                on: []
            """),
        (error("duplicate key 'idle'", line=9, at="idle", also=("line 5",)),),
    ),
    # ------------------------------------------------------------ keys and names
    Case(
        "unknown-key-with-did-you-mean",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - kewords: [HI]
                    reply: menu
            """),
        (error("unknown key 'kewords'", line=7, at="kewords", also=("did you mean 'keywords'",)),),
    ),
    Case(
        "unknown-top-level-key-with-did-you-mean",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            otherwse: {reply: menu}
            """),
        (error("unknown key 'otherwse'", line=4, col=1, also=("did you mean 'otherwise'",)),),
    ),
    Case(
        "reply-naming-an-unknown-template",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: mneu
            """),
        (error("unknown template 'mneu'", line=8, at="mneu", also=("did you mean 'menu'",)),),
    ),
    Case(
        "file-otherwise-naming-an-unknown-template",
        rules("""\
            signature: Acme
            templates:
              unknown: {id: "1", text: "Sorry"}
            otherwise: {reply: unknwon}
            """),
        (error("unknown template 'unknwon'", line=4, at="unknwon"),),
    ),
    Case(
        "goto-to-an-unknown-state",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: menu
                    goto: mneu
              menu:
                on:
                  - keywords: [X]
                    reply: menu
                    goto: idle
            """),
        (
            error("unknown state 'mneu'", line=9, at="mneu", also=("goto", "did you mean 'menu'")),
            warning("'menu'", "unreachable", line=10, at="menu"),  # the misspelt goto was its only way in
        ),
    ),
    Case(
        "start-naming-an-unknown-state",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            start: idel
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: menu
            """),
        (
            error("'idel'", line=4, at="idel", also=("start", "did you mean 'idle'")),
            warning("'idle'", "unreachable", line=6, at="idle"),  # the misspelt start was its only way in
        ),
    ),
    # ------------------------------------------------------------ templates and params
    Case(
        "params-count-differs-from-placeholders",
        rules("""\
            signature: Acme
            templates:
              status: {id: "1", text: "Order {1}: {2}."}
              menu: {id: "2", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [A]
                    reply: status
                    params: ["42"]
                  - keywords: [B]
                    reply: status
                  - keywords: [C]
                    reply: menu
                    params: ["x"]
            """),
        (
            error("'status' has 2 placeholder(s)", "1 param(s)", line=10, at="["),
            error("'status' has 2 placeholder(s)", "0 param(s)", line=12, at="status"),
            error("'menu' has 0 placeholder(s)", "1 param(s)", line=15),
        ),
    ),
    Case(
        "template-with-gaps-in-placeholders",
        rules("""\
            signature: Acme
            templates:
              ok: {id: "1", text: "Hi {1}"}
              gappy: {id: "2", text: "Order {1} is {3}"}
            """),
        (error("template 'gappy'", "without gaps", line=4, at='"Order', also=("{1}, {3}",)),),
    ),
    # ------------------------------------------------------------ regex and Jinja2
    Case(
        "invalid-regex",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - regex: '^(?P<code>\\d{6}$'
                    reply: menu
            """),
        (error("invalid regex", line=7, at="'^(", also=("missing )",)),),
    ),
    Case(
        "jinja2-syntax-error",
        rules("""\
            signature: Acme
            templates:
              thanks: {id: "1", text: "Code {1} ok"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: thanks
                    params: ["{{ text | }}"]
            """),
        (error("Jinja2 syntax error", line=9, at='"{{'),),
    ),
    Case(
        # a multi-line template written as a `|` block: the error is on the template's 2nd line, file line 12
        "jinja2-syntax-error-on-second-line-of-a-block-scalar",
        rules("""\
            signature: Acme
            templates:
              thanks: {id: "1", text: "Code {1} ok"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: thanks
                    params:
                      - |-
                        ok
                        {{ text | }}
            """),
        (error("Jinja2 syntax error", line=12),),
    ),
    Case(
        "jinja2-unknown-variable",
        rules("""\
            signature: Acme
            templates:
              thanks: {id: "1", text: "Code {1} ok"}
              two: {id: "2", text: "{1} {2}"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: two
                    params: ["{{ foo }}", "{{ txt }}"]
            """),
        (
            error("unknown variable 'foo'", line=10, at='"{{ foo', also=("text",)),  # lists what is available
            error("unknown variable 'txt'", line=10, at='"{{ txt', also=("did you mean 'text'",)),
        ),
    ),
    Case(
        "jinja2-unknown-variable-in-set",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: menu
                    set: {seen: "{{ nope }}"}
            """),
        (error("unknown variable 'nope'", line=9, at='"{{ nope'),),
    ),
    Case(
        "jinja2-unknown-regex-group",
        rules("""\
            signature: Acme
            templates:
              thanks: {id: "1", text: "Code {1} ok"}
            states:
              idle:
                on:
                  - regex: '^(?P<code>\\d{6})$'
                    reply: thanks
                    params: ["{{ match.nope }}"]
            """),
        (
            error("match.nope", line=9, at='"{{', also=("code",)),  # says which groups exist
            # an unknown group is not known to be short either (today's behaviour, pinned)
            warning("'{{ match.nope }}'", "customer text or variables", line=9, at='"{{'),
        ),
    ),
    # ------------------------------------------------------------ keywords
    Case(
        # different spellings that normalise to the same keyword (case, full-width) count as the same
        "same-keyword-twice-in-one-state",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
              hours: {id: "2", text: "Hours"}
            states:
              idle:
                on:
                  - keywords: [HI, MENU]
                    reply: menu
                  - keywords: [hours, ｍｅｎｕ]
                    reply: hours
            """),
        (error("'ｍｅｎｕ'", line=10, at="ｍｅｎｕ", also=("twice", "line 8")),),  # line 8: where it first appears
    ),
    Case(
        "same-keyword-twice-in-one-rule",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [HI, MENU, hi]
                    reply: menu
            """),
        (error("'hi'", line=7, at="hi]"),),
    ),
    Case(
        # the contract repeats MENU in a state and in `anywhere`: that is a fallback, not a duplicate
        "keyword-in-state-and-in-anywhere-is-fine",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [MENU]
                    reply: menu
            anywhere:
              - keywords: [MENU]
                reply: menu
            """),
    ),
    Case(
        "keyword-shadowed-by-opt-out-and-help",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
              bye: {id: "2", text: "Bye"}
              help: {id: "3", text: "Help"}
            opt_out: {keywords: [STOP, TD], contains: [退订], reply: bye}
            help: {keywords: [HELP, 帮助], reply: help}
            states:
              idle:
                on:
                  - keywords: [HI, td, 我要退订]
                    reply: menu
            anywhere:
              - keywords: [帮助！]
                reply: menu
            """),
        (
            error("'td'", "opt_out", line=11, at="td"),
            error("'我要退订'", "opt_out", line=11),
            error("'帮助！'", "help", line=14, at="帮助！"),
        ),
        absent=("'HI'",),
    ),
    # ------------------------------------------------------------ parameter length
    Case(
        "literal-parameter-longer-than-the-default-limit-of-6",
        length_rules("1234567"),
        (error("'1234567'", line=9, at='"1234567"', also=("7 characters", "6", "param_max_length")),),
    ),
    Case("literal-parameter-of-exactly-6-is-fine", length_rules("123456")),
    Case("chinese-literal-counts-characters-not-bytes", length_rules("六个汉字六个")),
    Case("per-file-param-max-length-raises-the-limit", length_rules("123456789012", extra="param_max_length: 12\n")),
    Case(
        "per-file-param-max-length-raises-the-limit-not-past-it",
        length_rules("1234567890123", extra="param_max_length: 12\n"),
        (error("13 characters", line=10, also=("12",)),),
    ),
    Case(
        "per-file-param-max-length-can-lower-the-limit",
        length_rules("12345", extra="param_max_length: 4\n"),
        (error("'12345'", line=10, also=("4",)),),
    ),
    *(
        Case(
            f"param-from-customer-data-that-can-exceed-the-limit-is-a-warning[{param}]",
            length_rules(param),
            (warning("customer text or variables", line=9, at=at, also=("6",)),),
        )
        for param, at in [
            ("{{ text }}", '"{{'),
            ("{{ vars.name }}", '"{{'),
            ("Hi {{ vars.name | default('x') }}", '"Hi'),
        ]
    ),
    Case(
        "no-warning-for-a-regex-group-that-fits-the-limit",
        rules("""\
            signature: Acme
            templates:
              thanks: {id: "1", text: "Code {1} ok"}
            states:
              idle:
                on:
                  - regex: '^(?P<code>\\d{6})$'
                    set: {receipt: "{{ match.code }}"}
                    reply: thanks
                    params: ["{{ match.code }}"]
            """),
    ),
    Case(
        "warning-for-a-regex-group-that-can-exceed-the-limit",
        rules("""\
            signature: Acme
            templates:
              thanks: {id: "1", text: "Code {1} ok"}
            states:
              idle:
                on:
                  - regex: '^(?P<code>\\d{6,8})$'
                    reply: thanks
                    params: ["{{ match.code }}"]
            """),
        (warning("match.code", line=9, also=("8 characters",)),),
    ),
    # ------------------------------------------------------------ states
    Case(
        "unreachable-state-is-a-warning",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle:
                on:
                  - keywords: [HI]
                    reply: menu
                    goto: menu
              menu:
                on:
                  - keywords: ["1"]
                    reply: menu
              lost:
                on:
                  - keywords: ["2"]
                    reply: menu
            """),
        (warning("'lost'", "unreachable", line=14, at="lost"),),
    ),
    Case(
        "state-reached-only-through-anywhere-is-not-unreachable",
        rules("""\
            signature: Acme
            templates:
              menu: {id: "1", text: "Menu"}
            states:
              idle: {}
              menu:
                on:
                  - keywords: ["1"]
                    reply: menu
            anywhere:
              - keywords: [MENU]
                reply: menu
                goto: menu
            """),
    ),
    # ------------------------------------------------------------ cost warnings
    Case(
        "a-template-that-costs-two-sms-with-its-signature-is-warned-about",
        rules(f"""\
            signature: Acme Shop
            templates:
              long: {{id: "1", text: "{LONG_TEXT}"}}
              short: {{id: "2", text: "Hi {{1}}。"}}
            opt_out: {{keywords: [TD], reply: short, params: ["x"]}}
            """),
        (warning("costs 2 SMS", line=3, at=f'"{LONG_TEXT}', also=("72 characters",)),),
        absent=("'short'",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_diagnostics(case: Case) -> None:
    """The file produces exactly the diagnostics of its row, each at its place, and compiles only without errors."""
    result = lint(case.text)
    shown = [str(d) for d in result.diagnostics]
    reported = result.diagnostics if case.unfiltered else [*errors(result), *warnings(result)]
    matched: list[Diagnostic] = []
    for expected in case.expect:
        pool = [d for d in reported if d.severity == expected.severity]
        d = the_one(pool, *expected.words)
        for fragment in expected.also:
            assert fragment in d.message, f"{expected.words}: {fragment!r} missing from {d}"
        assert d.line == expected.line, f"{expected.words}: {d}"
        if expected.at is not None:
            assert d.col == col(case.text, expected.line, expected.at), f"{expected.words}: {d}"
        if expected.col is not None:
            assert d.col == expected.col, f"{expected.words}: {d}"
        assert all(d is not other for other in matched), f"{expected.words} matched an expected diagnostic twice: {d}"
        matched.append(d)
    assert len(reported) == len(matched), f"unexpected diagnostics: {[str(d) for d in reported if d not in matched]}"
    for fragment in case.absent:
        assert not [d for d in result.diagnostics if fragment in d.message], shown
    if any(e.severity == "error" for e in case.expect):
        assert result.compiled is None, "a file with errors must not compile"
    else:
        assert result.compiled is not None, f"warnings never block loading: {shown}"


# ---------------------------------------------------------------- YAML 1.1 scalars


def test_yaml_11_booleans_and_octals_stay_strings() -> None:
    """`on:` is a key (not True); YES/NO/on/off/010 are keywords exactly as typed (not booleans, not 8)."""
    text = rules("""\
        signature: Acme
        templates:
          ok: {id: "1", text: "OK {1}"}
        states:
          idle:
            on:
              - keywords: [YES, NO, 010, on, off, y, n]
                reply: ok
                params: ["{{ match.keyword }}"]
        """)
    data = load_located(text).data
    assert isinstance(data, dict)
    rule = data["states"]["idle"]["on"][0]
    assert rule["keywords"] == ["YES", "NO", "010", "on", "off", "y", "n"]

    result = lint(text)
    assert errors(result) == [], [str(d) for d in result.diagnostics]
    assert result.compiled is not None
    steps = list(simulate(result.compiled, ["yes", "010", "Off", "8"], sign="Acme", start=TEST_CLOCK_START))
    assert [s.decision.replies[0].template if s.decision.replies else None for s in steps] == [
        "ok",
        "ok",
        "ok",
        None,  # "010" must not have become the number 8
    ]


# ---------------------------------------------------------------- signatures across files


@pytest.mark.parametrize(
    ("first", "second"),
    [("Acme Shop", "Acme Shop"), ("Acme Shop", "【acme shop】"), ('"*"', '"*"')],
)
def test_two_files_claiming_one_signature(tmp_path: Path, first: str, second: str) -> None:
    body = '\ntemplates:\n  menu: {id: "1", text: "Menu"}\notherwise: {reply: menu}\n'
    (tmp_path / "a.yaml").write_text(f"signature: {first}{body}", encoding="utf-8")
    (tmp_path / "b.yaml").write_text(f"# the same shop again\nsignature: {second}{body}", encoding="utf-8")
    result = load_rules(tmp_path)
    assert result.ruleset is None
    [d] = result.errors
    assert d.path.endswith("b.yaml")
    assert (d.line, d.col) == (2, 1)
    assert "already claimed" in d.message
    assert "a.yaml:1" in d.message


def test_different_signatures_in_one_folder_load(tmp_path: Path) -> None:
    body = '\ntemplates:\n  menu: {id: "1", text: "Menu"}\notherwise: {reply: menu}\n'
    (tmp_path / "a.yaml").write_text(f"signature: Acme Shop{body}", encoding="utf-8")
    (tmp_path / "b.yaml").write_text(f"signature: Other Shop{body}", encoding="utf-8")
    result = load_rules(tmp_path)
    assert result.errors == []
    assert result.ruleset is not None


# ---------------------------------------------------------------- the global parameter length


def test_global_param_max_length_argument(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(length_rules("12345678"), encoding="utf-8")
    assert [str(d) for d in load_rules(path).errors] != []
    assert load_rules(path, param_max_length=8).errors == []
    assert load_rules(path, param_max_length=8).ruleset is not None
    d = the_one(load_rules(path, param_max_length=7).errors, "'12345678'")
    assert "7 per template variable" in d.message


def test_per_file_param_max_length_beats_the_global_one(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(length_rules("12345678", extra="param_max_length: 8\n"), encoding="utf-8")
    assert load_rules(path, param_max_length=6).errors == []


# ---------------------------------------------------------------- the contract


def test_contract_file_loads_with_zero_errors() -> None:
    result = load_rules(CONTRACT)
    assert result.errors == [], [str(d) for d in result.errors]
    assert result.ruleset is not None
    assert [f.signature for f in result.ruleset.files] == ["Acme Shop"]
    assert not [d for d in result.diagnostics if "unreachable" in d.message]
    # the only warnings: the two vars-based params (unbounded customer variables) and the two
    # templates (menu, bye) that cost 2 SMS once 【Acme Shop】 is added
    messages = sorted(d.message.split(":")[0] for d in result.diagnostics)
    assert len(messages) == 4
    assert sum("customer text or variables" in d.message for d in result.diagnostics) == 2
    assert sorted(d.message.split()[1] for d in result.diagnostics if "costs 2 SMS" in d.message) == ["'bye'", "'menu'"]


# ---------------------------------------------------------------- compliance warnings


def test_a_signature_without_opt_out_is_warned_about_but_the_default_file_is_not() -> None:
    text = rules("""\
        signature: Acme
        templates:
          hi: {id: "1", text: "Hi"}
        otherwise: {reply: hi}
        """)
    result = lint(text)
    assert errors(result) == []
    warning = the_one(result.diagnostics, NO_OPT_OUT)
    assert (warning.severity, warning.line) == ("warning", 1)
    assert not [
        d for d in lint(text.replace("signature: Acme", 'signature: "*"')).diagnostics if NO_OPT_OUT in d.message
    ]
