"""Rules versions as text: their identity, compiling stored text, their check result and a readable diff.

A *version* is the text of every rule file of a rules folder, ``{name: text}``
(``name`` as rule references use it: the path relative to the folder). Its id
is ``texts_version(texts)``, which is exactly ``Ruleset.version`` of the same
text compiled (a hash of each file's name and the hash of its text), so one
text always has one id, valid or not, and a stored version can be found again
from a reply's ``messages.rules_version``.

Pure: nothing here reads files, clocks or databases (``bot/runtime`` and the
CLI store and fetch versions; this compiles and compares what they give).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bot.rules.loader import LoadResult, compile_texts
from bot.rules.simulation import run_file_tests
from bot.rules.yaml_source import YamlProblem, load_located


def file_version(text: str) -> str:
    """One file's version: what the compiler stamps on ``CompiledFile.version``."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def texts_version(texts: Mapping[str, str]) -> str:
    """The version of a whole folder's text: equal to ``Ruleset.version`` of that text compiled."""
    digest = hashlib.sha256()
    for name in sorted(texts):
        digest.update(name.encode() + b"\0" + file_version(texts[name]).encode() + b"\0")
    return digest.hexdigest()[:12]


def stored_ruleset(texts: Mapping[str, str], *, param_max_length: int | None = None) -> LoadResult:
    """Compile a stored version's text in memory (nothing is written to the rules folder)."""
    return compile_texts(texts, param_max_length=param_max_length)


@dataclass(frozen=True)
class Check:
    """What loading a version found: errors, warnings and its own ``tests:``; ``ok``: it may be served."""

    errors: tuple[str, ...]
    warnings: tuple[str, ...]
    tests_passed: int
    tests_failed: int
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.tests_failed

    @property
    def problems(self) -> list[str]:
        """Why it is refused (empty: it is not)."""
        return [*self.errors, *self.failures]

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "tests": {"passed": self.tests_passed, "failed": self.tests_failed, "failures": list(self.failures)},
        }

    def summary(self) -> str:
        if self.errors:
            return f"{len(self.errors)} error(s)"
        tests = f"tests {self.tests_passed} ok"
        if self.tests_failed:
            return f"{tests}, {self.tests_failed} FAILING"
        return tests + (f", {len(self.warnings)} warning(s)" if self.warnings else "")


def check_summary(check: Mapping[str, Any] | None) -> str:
    """``Check.summary`` of a stored ``Check.as_json``."""
    if not check:
        return "?"
    tests = check.get("tests") or {}
    return Check(
        tuple(check.get("errors") or ()),
        tuple(check.get("warnings") or ()),
        int(tests.get("passed") or 0),
        int(tests.get("failed") or 0),
        tuple(tests.get("failures") or ()),
    ).summary()


def check_loaded(result: LoadResult, extra_errors: list[str] | None = None) -> Check:
    """Check a loaded version: its errors (``extra_errors`` too), and, when it compiled, its own tests."""
    errors = [str(d) for d in sorted(result.errors)] + list(extra_errors or [])
    warnings = [str(d) for d in sorted(result.diagnostics) if not d.is_error]
    passed = failed = 0
    failures: list[str] = []
    if result.ruleset is not None and not errors:
        for compiled in result.ruleset.files:
            for outcome in run_file_tests(compiled):
                if outcome.passed:
                    passed += 1
                else:
                    failed += 1
                    failures.extend(str(f) for f in outcome.failures)
    return Check(tuple(errors), tuple(warnings), passed, failed, tuple(failures))


# ---------------------------------------------------------------- diff


@dataclass(frozen=True)
class RuleChange:
    """One rule added, removed or changed between two versions, with where it stands (file:line)."""

    change: str
    """added | removed | changed"""
    file: str
    where: str
    """The section it is in, e.g. ``states.menu.on`` or ``opt_out``."""
    what: str
    """How it matches (its keywords, regex ...), or its position when it has no matcher."""
    old_line: int | None
    new_line: int | None

    def __str__(self) -> str:
        line = self.new_line if self.change != "removed" else self.old_line
        return f"{self.change:8} {self.file}:{line}: {self.where} {self.what}"


_MATCHERS = ("keywords", "first_word", "contains", "regex")
_SINGLE = ("opt_out", "opt_in", "help", "otherwise")


def _rule_paths(data: dict[str, Any]) -> Iterator[tuple[str, tuple[str | int, ...], object, int | None]]:
    """Every rule of a parsed file: (section, path, value, index in its list)."""
    for name in _SINGLE:
        if name in data:
            yield name, (name,), data[name], None
    for index, rule in enumerate(data.get("anywhere") or []):
        yield "anywhere", ("anywhere", index), rule, index
    states = data.get("states")
    if isinstance(states, dict):
        for state, spec in states.items():
            if not isinstance(spec, dict):
                continue
            for index, rule in enumerate(spec.get("on") or []):
                yield f"states.{state}.on", ("states", state, "on", index), rule, index
            if "otherwise" in spec:
                yield f"states.{state}.otherwise", ("states", state, "otherwise"), spec["otherwise"], None


def _rules_of(text: str) -> dict[tuple[str, str], tuple[int, str]]:
    """The rules of one file: (section, identity) -> (line, canonical text); {} when it does not parse."""
    try:
        located = load_located(text)
    except YamlProblem:
        return {}
    data = located.data
    if not isinstance(data, dict):
        return {}
    found: dict[tuple[str, str], tuple[int, str]] = {}
    for section, path, value, index in _rule_paths(data):
        matcher = {k: value[k] for k in _MATCHERS if isinstance(value, dict) and k in value}
        what = json.dumps(matcher, ensure_ascii=False, sort_keys=True) if matcher else f"#{(index or 0) + 1}"
        key = (section, what)
        if key in found:  # the same matcher twice in one section: keep them apart by position
            key = (section, f"{what} #{(index or 0) + 1}")
        found[key] = (located.position(path).line, json.dumps(value, ensure_ascii=False, sort_keys=True, default=str))
    return found


@dataclass(frozen=True)
class RuleText:
    """The lines of one rule in a file's text (what a reply's ``file:line`` points at), with some context."""

    first: int
    """The 1-based line number of ``lines[0]``."""
    lines: tuple[str, ...]
    rule_first: int
    rule_last: int
    """The rule's own lines, ``rule_first`` to ``rule_last`` (1-based, inclusive)."""
    exact: bool
    """True: a rule starts at that line and these are its lines; False: a window of lines around it."""

    def numbered(self) -> list[tuple[int, str, bool]]:
        """(line number, text, part of the rule) for each line shown."""
        return [
            (self.first + i, text, self.rule_first <= self.first + i <= self.rule_last)
            for i, text in enumerate(self.lines)
        ]


def rule_text(text: str, line: int, *, context: int = 2, window: int = 3) -> RuleText | None:
    """The rule at ``line`` of a file's ``text``: from its line to the next line indented less than the rule.

    When no rule starts at that line (or the text does not parse), ``window`` lines either side of it,
    the line itself marked (``exact`` False). None when the text has no such line.
    """
    source = text.splitlines()
    if not 1 <= line <= len(source):
        return None
    col: int | None = None
    try:
        located = load_located(text)
    except YamlProblem:
        located = None
    if located is not None and isinstance(located.data, dict):
        for _, path, _, _ in _rule_paths(located.data):
            position = located.position(path)
            if position.line == line:
                col = position.col
                break
    if col is None:
        first, last = max(1, line - window), min(len(source), line + window)
        return RuleText(first, tuple(source[first - 1 : last]), line, line, exact=False)
    last = line
    for number in range(line + 1, len(source) + 1):
        current = source[number - 1]
        stripped = current.lstrip(" ")
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments neither end nor extend the rule
        if len(current) - len(stripped) < col - 1:
            break
        last = number
    first, end = max(1, line - context), min(len(source), last + context)
    return RuleText(first, tuple(source[first - 1 : end]), line, last, exact=True)


def rule_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[RuleChange]:
    """The rules added, removed and changed from ``old`` to ``new`` (both ``{name: text}``), file by file."""
    changes: list[RuleChange] = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        before, after = _rules_of(old.get(name, "")), _rules_of(new.get(name, ""))
        for key in sorted(set(before) | set(after), key=lambda k: (after.get(k) or before[k])[0]):
            was, now = before.get(key), after.get(key)
            if was is None and now is not None:
                changes.append(RuleChange("added", name, key[0], key[1], None, now[0]))
            elif now is None and was is not None:
                changes.append(RuleChange("removed", name, key[0], key[1], was[0], None))
            elif was is not None and now is not None and was[1] != now[1]:
                changes.append(RuleChange("changed", name, key[0], key[1], was[0], now[0]))
    return changes


def file_diffs(old: Mapping[str, str], new: Mapping[str, str], *, old_label: str, new_label: str) -> Iterator[str]:
    """A unified diff per changed file, its hunks headed ``file:line`` (the new text's line)."""
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        yield f"--- {old_label}/{name}" if a is not None else "--- /dev/null"
        yield f"+++ {new_label}/{name}" if b is not None else "+++ /dev/null"
        a_lines, b_lines = (a or "").splitlines(), (b or "").splitlines()
        matcher = difflib.SequenceMatcher(a=a_lines, b=b_lines, autojunk=False)
        for group in matcher.get_grouped_opcodes(3):
            first_old, first_new = group[0][1], group[0][3]
            yield f"@@ {name}:{first_new + 1} (was line {first_old + 1}) @@"
            for tag, i1, i2, j1, j2 in group:
                if tag == "equal":
                    yield from (f"  {line}" for line in a_lines[i1:i2])
                    continue
                yield from (f"- {line}" for line in a_lines[i1:i2])
                yield from (f"+ {line}" for line in b_lines[j1:j2])
