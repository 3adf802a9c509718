"""One test per problem `smsbot rules check` must report, pinned to its line and column.

Rule files are written inline (dedented, first line = line 1) so the expected
line numbers can be read straight off the YAML. Columns are computed from the
text of that line, so each test says *what* the column must point at.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

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


# ---------------------------------------------------------------- YAML itself


def test_yaml_syntax_error_points_at_the_bad_line() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        start: idle: menu
        states:
          idle: {}
        """)
    result = lint(text)
    assert result.compiled is None
    [d] = result.diagnostics
    assert d.severity == "error"
    assert "YAML syntax error" in d.message
    assert "mapping values are not allowed" in d.message
    assert (d.line, d.col) == (4, col(text, 4, ": menu"))  # the second colon


def test_yaml_unclosed_quote_is_a_syntax_error_not_a_crash() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1, text: "Menu"}
        """)
    result = lint(text)
    assert result.compiled is None
    [d] = errors(result)
    assert "YAML syntax error" in d.message
    assert d.line == 3


def test_duplicate_yaml_key_is_an_error_naming_both_lines() -> None:
    text = rules("""\
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
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "duplicate key 'idle'")
    assert (d.line, d.col) == (9, col(text, 9, "idle"))
    assert "line 5" in d.message


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


# ---------------------------------------------------------------- keys and names


def test_unknown_key_with_did_you_mean() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        states:
          idle:
            on:
              - kewords: [HI]
                reply: menu
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "unknown key 'kewords'")
    assert "did you mean 'keywords'" in d.message
    assert (d.line, d.col) == (7, col(text, 7, "kewords"))


def test_unknown_top_level_key_with_did_you_mean() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        otherwse: {reply: menu}
        """)
    d = the_one(errors(lint(text)), "unknown key 'otherwse'")
    assert "did you mean 'otherwise'" in d.message
    assert (d.line, d.col) == (4, 1)


def test_reply_naming_an_unknown_template() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        states:
          idle:
            on:
              - keywords: [HI]
                reply: mneu
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "unknown template 'mneu'")
    assert "did you mean 'menu'" in d.message
    assert (d.line, d.col) == (8, col(text, 8, "mneu"))


def test_file_otherwise_naming_an_unknown_template() -> None:
    text = rules("""\
        signature: Acme
        templates:
          unknown: {id: "1", text: "Sorry"}
        otherwise: {reply: unknwon}
        """)
    d = the_one(errors(lint(text)), "unknown template 'unknwon'")
    assert (d.line, d.col) == (4, col(text, 4, "unknwon"))


def test_goto_to_an_unknown_state() -> None:
    text = rules("""\
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
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "unknown state 'mneu'")
    assert "goto" in d.message
    assert "did you mean 'menu'" in d.message
    assert (d.line, d.col) == (9, col(text, 9, "mneu"))


def test_start_naming_an_unknown_state() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        start: idel
        states:
          idle:
            on:
              - keywords: [HI]
                reply: menu
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "'idel'")
    assert "start" in d.message
    assert "did you mean 'idle'" in d.message
    assert (d.line, d.col) == (4, col(text, 4, "idel"))


# ---------------------------------------------------------------- templates and params


def test_params_count_differs_from_placeholders() -> None:
    text = rules("""\
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
        """)
    result = lint(text)
    assert result.compiled is None
    few = the_one(errors(result), "'status' has 2 placeholder(s)", "1 param(s)")
    assert (few.line, few.col) == (10, col(text, 10, "["))
    none = the_one(errors(result), "'status' has 2 placeholder(s)", "0 param(s)")
    assert (none.line, none.col) == (12, col(text, 12, "status"))
    extra = the_one(errors(result), "'menu' has 0 placeholder(s)", "1 param(s)")
    assert extra.line == 15


def test_template_with_gaps_in_placeholders() -> None:
    text = rules("""\
        signature: Acme
        templates:
          ok: {id: "1", text: "Hi {1}"}
          gappy: {id: "2", text: "Order {1} is {3}"}
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "template 'gappy'", "without gaps")
    assert "{1}, {3}" in d.message
    assert (d.line, d.col) == (4, col(text, 4, '"Order'))


# ---------------------------------------------------------------- regex and Jinja2


def test_invalid_regex() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        states:
          idle:
            on:
              - regex: '^(?P<code>\\d{6}$'
                reply: menu
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "invalid regex")
    assert "missing )" in d.message
    assert (d.line, d.col) == (7, col(text, 7, "'^("))


def test_jinja2_syntax_error() -> None:
    text = rules("""\
        signature: Acme
        templates:
          thanks: {id: "1", text: "Code {1} ok"}
        states:
          idle:
            on:
              - keywords: [HI]
                reply: thanks
                params: ["{{ text | }}"]
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "Jinja2 syntax error")
    assert (d.line, d.col) == (9, col(text, 9, '"{{'))


def test_jinja2_syntax_error_on_second_line_of_a_block_scalar() -> None:
    """A multi-line template written as a `|` block: the error is on the template's 2nd line, file line 12."""
    text = rules("""\
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
        """)
    d = the_one(errors(lint(text)), "Jinja2 syntax error")
    assert d.line == 12


def test_jinja2_unknown_variable() -> None:
    text = rules("""\
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
        """)
    result = lint(text)
    assert result.compiled is None
    foo = the_one(errors(result), "unknown variable 'foo'")
    assert "text" in foo.message  # lists what is available
    assert (foo.line, foo.col) == (10, col(text, 10, '"{{ foo'))
    txt = the_one(errors(result), "unknown variable 'txt'")
    assert "did you mean 'text'" in txt.message
    assert (txt.line, txt.col) == (10, col(text, 10, '"{{ txt'))


def test_jinja2_unknown_variable_in_set() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        states:
          idle:
            on:
              - keywords: [HI]
                reply: menu
                set: {seen: "{{ nope }}"}
        """)
    d = the_one(errors(lint(text)), "unknown variable 'nope'")
    assert (d.line, d.col) == (9, col(text, 9, '"{{ nope'))


def test_jinja2_unknown_regex_group() -> None:
    text = rules("""\
        signature: Acme
        templates:
          thanks: {id: "1", text: "Code {1} ok"}
        states:
          idle:
            on:
              - regex: '^(?P<code>\\d{6})$'
                reply: thanks
                params: ["{{ match.nope }}"]
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "match.nope")
    assert "code" in d.message  # says which groups exist
    assert (d.line, d.col) == (9, col(text, 9, '"{{'))


# ---------------------------------------------------------------- keywords


def test_same_keyword_twice_in_one_state() -> None:
    """Different spellings that normalise to the same keyword (case, full-width) count as the same."""
    text = rules("""\
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
        """)
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "'ｍｅｎｕ'")
    assert "twice" in d.message
    assert "line 8" in d.message  # where the keyword first appears
    assert (d.line, d.col) == (10, col(text, 10, "ｍｅｎｕ"))


def test_same_keyword_twice_in_one_rule() -> None:
    text = rules("""\
        signature: Acme
        templates:
          menu: {id: "1", text: "Menu"}
        states:
          idle:
            on:
              - keywords: [HI, MENU, hi]
                reply: menu
        """)
    result = lint(text)
    found = [d for d in result.diagnostics if "'hi'" in d.message]
    assert found, "a keyword listed twice in one state's rule should be reported"
    assert (found[0].line, found[0].col) == (7, col(text, 7, "hi]"))


def test_keyword_in_state_and_in_anywhere_is_fine() -> None:
    """The contract repeats MENU in a state and in `anywhere`: that is a fallback, not a duplicate."""
    text = rules("""\
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
        """)
    assert errors(lint(text)) == []


def test_keyword_shadowed_by_opt_out_and_help() -> None:
    text = rules("""\
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
        """)
    result = lint(text)
    assert result.compiled is None
    td = the_one(errors(result), "'td'", "opt_out")
    assert (td.line, td.col) == (11, col(text, 11, "td"))
    contains = the_one(errors(result), "'我要退订'", "opt_out")
    assert contains.line == 11
    helped = the_one(errors(result), "'帮助！'", "help")
    assert (helped.line, helped.col) == (14, col(text, 14, "帮助！"))
    assert not [d for d in result.diagnostics if "'HI'" in d.message]


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


# ---------------------------------------------------------------- parameter length


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


def test_literal_parameter_longer_than_the_default_limit_of_6() -> None:
    text = length_rules("1234567")
    result = lint(text)
    assert result.compiled is None
    d = the_one(errors(result), "'1234567'")
    assert "7 characters" in d.message
    assert "6" in d.message
    assert "param_max_length" in d.message
    assert (d.line, d.col) == (9, col(text, 9, '"1234567"'))


def test_literal_parameter_of_exactly_6_is_fine() -> None:
    assert not errors(r := lint(length_rules("123456")))
    assert warnings(r) == []


def test_chinese_literal_counts_characters_not_bytes() -> None:
    assert not errors(r := lint(length_rules("六个汉字六个")))
    assert warnings(r) == []


def test_per_file_param_max_length_raises_the_limit() -> None:
    assert not errors(r := lint(length_rules("123456789012", extra="param_max_length: 12\n")))
    assert warnings(r) == []
    too_long = lint(length_rules("1234567890123", extra="param_max_length: 12\n"))
    d = the_one(errors(too_long), "13 characters")
    assert "12" in d.message


def test_per_file_param_max_length_can_lower_the_limit() -> None:
    result = lint(length_rules("12345", extra="param_max_length: 4\n"))
    d = the_one(errors(result), "'12345'")
    assert "4" in d.message
    assert d.line == 10


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


@pytest.mark.parametrize("param", ["{{ text }}", "{{ vars.name }}", "Hi {{ vars.name | default('x') }}"])
def test_param_from_customer_data_that_can_exceed_the_limit_is_a_warning(param: str) -> None:
    text = length_rules(param)
    result = lint(text)
    assert errors(result) == []
    assert result.compiled is not None  # warnings never block loading
    [d] = warnings(result)
    assert "customer text or variables" in d.message
    assert "6" in d.message
    assert (d.line, d.col) == (9, col(text, 9, '"{{') if param.startswith("{{") else col(text, 9, '"Hi'))


def test_no_warning_for_a_regex_group_that_fits_the_limit() -> None:
    text = rules("""\
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
        """)
    result = lint(text)
    assert errors(result) == [], [str(d) for d in result.diagnostics]
    assert warnings(result) == [], [str(d) for d in result.diagnostics]


def test_warning_for_a_regex_group_that_can_exceed_the_limit() -> None:
    text = rules("""\
        signature: Acme
        templates:
          thanks: {id: "1", text: "Code {1} ok"}
        states:
          idle:
            on:
              - regex: '^(?P<code>\\d{6,8})$'
                reply: thanks
                params: ["{{ match.code }}"]
        """)
    result = lint(text)
    assert errors(result) == []
    d = the_one(warnings(result), "match.code")
    assert "8 characters" in d.message
    assert d.line == 9


# ---------------------------------------------------------------- states


def test_unreachable_state_is_a_warning() -> None:
    text = rules("""\
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
        """)
    result = lint(text)
    assert errors(result) == []
    assert result.compiled is not None
    [d] = warnings(result)
    assert "'lost'" in d.message
    assert "unreachable" in d.message
    assert (d.line, d.col) == (14, col(text, 14, "lost"))


def test_state_reached_only_through_anywhere_is_not_unreachable() -> None:
    text = rules("""\
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
        """)
    assert errors(r := lint(text)) == []
    assert warnings(r) == []


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


# ---------------------------------------------------------------- compliance and cost warnings


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


def test_a_template_that_costs_two_sms_with_its_signature_is_warned_about() -> None:
    long_text = "x" * 60 + "。"  # 61 UCS-2 characters + 【Acme Shop】 (11) = 72 > 70
    text = rules(f"""\
        signature: Acme Shop
        templates:
          long: {{id: "1", text: "{long_text}"}}
          short: {{id: "2", text: "Hi {{1}}。"}}
        opt_out: {{keywords: [TD], reply: short, params: ["x"]}}
        """)
    result = lint(text)
    warning = the_one(warnings(result), "costs 2 SMS")
    assert (warning.line, warning.col) == (3, col(text, 3, long_text) - 1)
    assert "72 characters" in warning.message
    assert not [d for d in warnings(result) if "'short'" in d.message]
