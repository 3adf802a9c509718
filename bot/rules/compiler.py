"""Turning one rule file's text into a ``CompiledFile``, reporting every problem found.

Checking and compiling are one pass on purpose: the checks need the same
compiled regexes, templates and keyword indexes the engine uses, so a file
that passes ``smsbot rules check`` is exactly a file the engine can run.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import difflib
import hashlib
import importlib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from jinja2 import nodes
from pydantic import BaseModel, ValidationError

from bot.rules.diagnostics import Diagnostic, Severity
from bot.rules.matching import MatcherSpec, RuleIndex
from bot.rules.model import (
    EVENT_KINDS,
    CompiledAction,
    CompiledCall,
    CompiledFile,
    CompiledSection,
    CompiledState,
    CompiledTemplate,
    CompiledWebhook,
    EventEndpointSpec,
    EventKind,
    RuleKind,
)
from bot.rules.normalize import NormalizedText, normalize
from bot.rules.schema import Action, KeywordAction, Rule, RuleFile, State
from bot.rules.sms_length import sms_length
from bot.rules.templating import (
    CONTACT_FIELDS,
    CONTEXT_NAMES,
    Expression,
    ExpressionError,
    compile_expression,
    max_rendered_length,
)
from bot.rules.yaml_source import Located, Path_, YamlProblem, load_located

DEFAULT_PARAM_MAX_LENGTH = 6
"""Tencent's limit for a template variable on accounts opened after 2024-01-25."""

PLACEHOLDER_RE = re.compile(r"\{(\d+)\}")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_UNBOUNDED = 65535
_EXTEND_RE = re.compile(r"^[0-9]{1,8}$")
_ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9_-]+$")
MAX_WEBHOOK_TIMEOUT = 30.0
"""Seconds: a webhook slower than this keeps a customer waiting too long for an SMS answer."""


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be called (None when it is an http or https URL with a host)."""
    if "{{" in url or "{%" in url:
        return "is literal text, not a template: put values in body (a GET sends them as query parameters)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    if not parts.hostname:
        return "has no host"
    if any(c.isspace() for c in url):
        return "contains spaces"
    return None


@dataclass
class FileResult:
    """What compiling one file produced."""

    path: str
    compiled: CompiledFile | None
    diagnostics: list[Diagnostic] = field(default_factory=list)
    signature: str | None = None
    signature_line: int = 1
    extend: str = ""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def compile_file(text: str, *, path: str, name: str, param_max_length: int | None = None) -> FileResult:
    """Compile ``text`` (the content of ``path``); ``compiled`` is None when there are errors."""
    result = FileResult(path=path, compiled=None)
    try:
        located = load_located(text)
    except YamlProblem as exc:
        result.diagnostics.append(Diagnostic(path, exc.position.line, exc.position.col, "error", exc.message))
        return result
    if not isinstance(located.data, dict):
        result.diagnostics.append(
            Diagnostic(path, 1, 1, "error", "a rule file must be a mapping with at least a 'signature' key")
        )
        return result
    sig = located.data.get("signature")
    if isinstance(sig, str):
        result.signature = sig
        result.signature_line = located.position(("signature",)).line
    extend = located.data.get("extend")
    if isinstance(extend, str):
        result.extend = extend.strip()
    try:
        spec = RuleFile.model_validate(located.data)
    except ValidationError as exc:
        result.diagnostics.extend(_schema_problems(exc, located, path))
        # Misspelt keys alone do not stop the other checks: report everything in one run.
        errors = exc.errors(include_url=False)
        if any(err["type"] != "extra_forbidden" for err in errors):
            return result
        try:
            spec = RuleFile.model_validate(_repaired(located.data, [tuple(err["loc"]) for err in errors]))
        except ValidationError:
            return result
    builder = _Builder(spec, located, path, name, param_max_length or DEFAULT_PARAM_MAX_LENGTH)
    compiled = builder.build(hashlib.sha256(text.encode()).hexdigest()[:12])
    result.diagnostics.extend(builder.diagnostics)
    if not any(d.is_error for d in result.diagnostics):
        result.compiled = compiled
    return result


def _repaired(data: object, locs: Sequence[tuple[str | int, ...]]) -> object:
    """A deep copy of ``data`` with each unknown key at ``locs`` renamed to its likely meaning, or dropped."""
    copy = copy_module.deepcopy(data)
    for loc in locs:
        node: Any = copy
        for part in loc[:-1]:
            node = node[part]
        if not isinstance(node, dict):
            continue
        value = node.pop(loc[-1], None)
        model = _model_at(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields) if model else [], n=1, cutoff=0.6)
        if close and close[0] not in node:
            node[close[0]] = value
    return copy


# ---------------------------------------------------------------- schema errors


def _loc_text(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else tp
    return tp


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    tp: Any = RuleFile
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(str(part))
            if info is None:
                return None
            tp = info.annotation
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _schema_problems(exc: ValidationError, located: Located, path: str) -> list[Diagnostic]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _model_at(loc[:-1])
            allowed = list(model.model_fields) if model else []
            pos = located.position(loc, key=True)
            message = f"unknown key '{loc[-1]}'{did_you_mean(str(loc[-1]), allowed)}"
            if allowed:
                message += f"; allowed here: {', '.join(allowed)}"
        elif kind == "missing":
            pos = located.position(loc[:-1])
            where = _loc_text(loc[:-1]) or "the file"
            message = f"{where}: missing required key '{loc[-1]}'"
        else:
            pos = located.position(loc)
            msg = str(err["msg"])
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if isinstance(err.get("input"), bool) and "string" in msg:
                msg += " (a bare true/false is read as a yes/no value: put it in quotes)"
            message = f"{_loc_text(loc) or 'the file'}: {msg}"
        problems.append(Diagnostic(path, pos.line, pos.col, "error", message))
    return problems


# ---------------------------------------------------------------- regex helpers


def _group_widths(pattern: re.Pattern[str]) -> dict[str, int | None]:
    """Longest text each named group can capture (None: unbounded)."""
    parser: Any = importlib.import_module("re._parser")
    parsed = parser.parse(pattern.pattern, pattern.flags)
    by_gid: dict[int, int | None] = {}

    def visit(obj: Any) -> None:
        if hasattr(obj, "data") and hasattr(obj, "getwidth"):
            for op, av in obj.data:
                if str(op) == "SUBPATTERN" and isinstance(av, tuple) and av and isinstance(av[0], int):
                    hi = av[-1].getwidth()[1]
                    by_gid[av[0]] = None if hi >= _UNBOUNDED else int(hi)
                visit(av)
        elif isinstance(obj, tuple | list):
            for item in obj:
                visit(item)

    visit(parsed)
    return {name: by_gid.get(gid) for name, gid in pattern.groupindex.items()}


def _capture_widths(spec: MatcherSpec) -> dict[str, int | None]:
    """What ``match`` holds for a rule, with the longest value each name can take."""
    words = spec.keywords + spec.first_word + spec.contains
    widths: dict[str, int | None] = {"keyword": max((len(w) for w in words), default=0)}
    if spec.regex is not None:
        widths.update(_group_widths(spec.regex))
    return widths


# ---------------------------------------------------------------- the builder


class _Builder:
    def __init__(self, spec: RuleFile, located: Located, path: str, name: str, limit: int) -> None:
        self.spec = spec
        self.located = located
        self.path = path
        self.name = name
        self.limit = spec.param_max_length or limit
        self.diagnostics: list[Diagnostic] = []
        self.templates: dict[str, CompiledTemplate] = {}
        self.state_names: list[str] = list(spec.states) or [spec.start or "start"]
        self.webhooks: dict[str, CompiledWebhook] = {}
        self.calls: dict[str, CompiledAction] = {}
        self.saved: dict[str, int] = {}
        """save_as names of the file's calls -> line of the first."""

    # -- reporting
    def report(
        self, where: Path_, severity: Severity, message: str, *, key: bool = False, line_offset: int = 0
    ) -> None:
        pos = self.located.position(where, key=key)
        self.diagnostics.append(Diagnostic(self.path, pos.line + line_offset, pos.col, severity, message))

    def line(self, where: Path_) -> int:
        return self.located.position(where).line

    # -- whole file
    def build(self, version: str) -> CompiledFile:
        spec = self.spec
        self._templates()
        self._collect_saved()
        extend = self._extend()
        self._webhooks()
        events = self._events()
        start = spec.start or self.state_names[0]
        if start not in self.state_names:
            self.report(
                ("start",),
                "error",
                f"start state '{start}' is not defined{did_you_mean(start, self.state_names)}",
            )
        opt_out = self._keyword_section("opt_out", spec.opt_out, ())
        opt_in = self._keyword_section("opt_in", spec.opt_in, (("opt_out", opt_out),))
        help_ = self._keyword_section("help", spec.help, (("opt_out", opt_out), ("opt_in", opt_in)))
        globals_ = (("opt_out", opt_out), ("opt_in", opt_in), ("help", help_))
        states: dict[str, CompiledState] = {}
        for state_name in self.state_names:
            state = spec.states.get(state_name, State())
            where: Path_ = ("states", state_name)
            section = self._rules_section(where + ("on",), state.on, "on", globals_, f"state '{state_name}'")
            otherwise = (
                self._action(where + ("otherwise",), state.otherwise, "state_otherwise", {})
                if state.otherwise
                else None
            )
            states[state_name] = CompiledState(state_name, state.expires, section, otherwise)
        anywhere = self._rules_section(("anywhere",), spec.anywhere, "anywhere", globals_, "'anywhere'")
        otherwise = self._action(("otherwise",), spec.otherwise, "otherwise", {}) if spec.otherwise else None
        self._reachability(start)
        if spec.opt_out is None and spec.signature != "*":
            self.report(
                ("signature",),
                "warning",
                "no opt_out section: customers cannot unsubscribe from this signature by SMS (STOP, TD, 退订 ...)",
            )
        self._tests()
        return CompiledFile(
            path=self.path,
            name=self.name,
            signature=spec.signature,
            version=version,
            start=start,
            states=types.MappingProxyType(states),
            opt_out=opt_out,
            opt_in=opt_in,
            help=help_,
            anywhere=anywhere,
            otherwise=otherwise,
            templates=types.MappingProxyType(self.templates),
            tests=tuple(spec.tests),
            test_lines=tuple(self.line(("tests", i)) for i in range(len(spec.tests))),
            sender_id=spec.sender_id,
            reply_max_delay=spec.reply_max_delay,
            extend=extend,
            webhooks=types.MappingProxyType(self.webhooks),
            events=types.MappingProxyType(events),
            calls=types.MappingProxyType(self.calls),
        )

    # -- extend, webhooks, events
    def _extend(self) -> str:
        extend = self.spec.extend
        if extend is None:
            return ""
        extend = extend.strip()
        if not _EXTEND_RE.match(extend):
            self.report(
                ("extend",),
                "error",
                f'extend {self.spec.extend!r} must be 1 to 8 digits (Tencent\'s extend code, e.g. "01"); '
                "quote it so leading zeros stay",
            )
        if self.spec.signature == "*":
            self.report(
                ("extend",), "error", 'the default file (signature "*") cannot have an extend: give a signature'
            )
        return extend

    def _webhooks(self) -> None:
        for name, hook in self.spec.webhooks.items():
            where: Path_ = ("webhooks", name)
            if not _IDENT_RE.match(name):
                self.report(where, "error", f"webhook name {name!r} must be letters, digits and _", key=True)
            problem = url_problem(hook.url)
            if problem is not None:
                self.report(where + ("url",), "error", f"webhook '{name}': url {hook.url!r} {problem}")
            timeout = hook.timeout.total_seconds()
            if timeout > MAX_WEBHOOK_TIMEOUT:
                self.report(
                    where + ("timeout",),
                    "error",
                    f"webhook '{name}': timeout {timeout:g}s is over the maximum of {MAX_WEBHOOK_TIMEOUT:g}s",
                )
            body = None
            if hook.body is not None:
                body = tuple(
                    (key, self._expression(where + ("body", key), source, None, is_param=False))
                    for key, source in hook.body.items()
                )
            self.webhooks[name] = CompiledWebhook(name, hook.url, hook.method, body, timeout)

    def _events(self) -> dict[str, EventEndpointSpec]:
        events: dict[str, EventEndpointSpec] = {}
        for name, endpoint in self.spec.events.items():
            where: Path_ = ("events", name)
            if not _ENDPOINT_NAME_RE.match(name):
                self.report(
                    where,
                    "error",
                    f"event endpoint name {name!r} must be lower-case letters, digits, _ and - "
                    "(its secret comes from SMSBOT_EVENT_SECRET_<NAME>)",
                    key=True,
                )
            problem = url_problem(endpoint.url)
            if problem is not None:
                self.report(where + ("url",), "error", f"event endpoint '{name}': url {endpoint.url!r} {problem}")
            kinds: set[EventKind] = set()
            for i, kind in enumerate(endpoint.kinds if endpoint.kinds is not None else EVENT_KINDS):
                if kind in EVENT_KINDS:
                    kinds.add(kind)
                else:
                    self.report(
                        where + ("kinds", i),
                        "error",
                        f"unknown event kind '{kind}'{did_you_mean(kind, EVENT_KINDS)}; "
                        f"kinds are {', '.join(EVENT_KINDS)}",
                    )
            if endpoint.kinds is not None and not endpoint.kinds:
                self.report(
                    where + ("kinds",), "error", f"event endpoint '{name}': kinds is empty (leave it out for all)"
                )
            events[name] = EventEndpointSpec(name, endpoint.url, frozenset(kinds))
        return events

    def _collect_saved(self) -> None:
        rules: list[tuple[Path_, Rule]] = [(("anywhere", i), r) for i, r in enumerate(self.spec.anywhere)]
        for state_name, state in self.spec.states.items():
            rules += [(("states", state_name, "on", i), r) for i, r in enumerate(state.on)]
        for where, rule in rules:
            if rule.call is not None and rule.call.save_as is not None:
                self.saved.setdefault(rule.call.save_as, self.line(where + ("call", "save_as")))

    def _templates(self) -> None:
        for tname, tspec in self.spec.templates.items():
            where: Path_ = ("templates", tname)
            numbers = sorted({int(n) for n in PLACEHOLDER_RE.findall(tspec.text)})
            if numbers and numbers != list(range(1, len(numbers) + 1)):
                self.report(
                    where + ("text",),
                    "error",
                    f"template '{tname}': placeholders must be numbered {{1}}, {{2}} ... without gaps, found "
                    + ", ".join(f"{{{n}}}" for n in numbers),
                )
            if not tspec.id.isdigit():
                self.report(
                    where + ("id",),
                    "error",
                    f"template '{tname}': id {tspec.id!r} must be digits (Tencent template ids are numbers)",
                )
            if tspec.intl_id is not None and not tspec.intl_id.isdigit():
                self.report(
                    where + ("intl_id",),
                    "error",
                    f"template '{tname}': intl_id {tspec.intl_id!r} must be digits (Tencent template ids are numbers)",
                )
            elif tspec.intl_id is None and self._international:
                self.report(
                    where,
                    "warning",
                    f"template '{tname}' has no intl_id: this signature answers numbers outside the Chinese mainland "
                    "(international, sender_id or another template's intl_id say so), and a reply with it to "
                    "such a number is recorded as failed (Tencent refuses mainland templates abroad)",
                    key=True,
                )
            self.templates[tname] = CompiledTemplate(
                tname, tspec.id, tspec.text, len(numbers), tspec.marketing, intl_id=tspec.intl_id
            )
            self._template_cost(tname, tspec.text)

    @property
    def _international(self) -> bool:
        """Whether the file says it answers numbers outside the Chinese mainland."""
        spec = self.spec
        if spec.international is not None:
            return spec.international
        return spec.sender_id is not None or any(t.intl_id is not None for t in spec.templates.values())

    def _template_cost(self, tname: str, text: str) -> None:
        """Warn when the fixed part of a template alone already costs more than one SMS."""
        if self.spec.signature == "*":
            return
        fixed = PLACEHOLDER_RE.sub("", text)
        size = sms_length(f"【{self.spec.signature}】{fixed}")
        if size.segments > 1:
            self.report(
                ("templates", tname, "text"),
                "warning",
                f"template '{tname}' costs {size.segments} SMS per reply to Chinese-mainland numbers: "
                f"{size.length} characters with 【{self.spec.signature}】 before any parameter "
                f"({70 if size.encoding == 'UCS-2' else 160} fit in one)",
            )

    # -- sections
    def _specs(self, where: Path_, rule: KeywordAction | Rule) -> MatcherSpec:
        pattern: re.Pattern[str] | None = None
        for kind in ("keywords", "first_word", "contains"):
            for i, word in enumerate(getattr(rule, kind) or ()):
                if not normalize(word):
                    self.report(
                        where + (kind, i),
                        "error",
                        f"keyword {word!r} is empty once spaces and punctuation are ignored",
                    )
        if isinstance(rule, Rule) and rule.regex is not None:
            try:
                pattern = re.compile(rule.regex, re.IGNORECASE)
            except re.error as exc:
                self.report(
                    where + ("regex",),
                    "error",
                    f"invalid regex {rule.regex!r}: {exc.msg} at position {exc.pos}",
                )
        return MatcherSpec(
            keywords=tuple(rule.keywords or ()),
            first_word=tuple(rule.first_word or ()),
            contains=tuple(rule.contains or ()),
            regex=pattern,
        )

    def _keyword_section(
        self, key: str, rule: KeywordAction | None, earlier: Sequence[tuple[str, CompiledSection | None]]
    ) -> CompiledSection | None:
        if rule is None:
            return None
        where: Path_ = (key,)
        spec = self._specs(where, rule)
        self._shadowing(where, [spec], RuleIndex([spec]), earlier)
        action = self._action(where, rule, key, _capture_widths(spec))
        return CompiledSection(RuleIndex([spec]), (action,))

    def _rules_section(
        self,
        where: Path_,
        rules: Sequence[Rule],
        kind: RuleKind,
        earlier: Sequence[tuple[str, CompiledSection | None]],
        label: str,
    ) -> CompiledSection:
        specs = [self._specs(where + (i,), rule) for i, rule in enumerate(rules)]
        index = RuleIndex(specs)
        self._shadowing(where, specs, index, earlier, label=label)
        actions = []
        for i, rule in enumerate(rules):
            captures = _capture_widths(specs[i])
            actions.append(self._action(where + (i,), rule, kind, captures))
        return CompiledSection(index, tuple(actions))

    def _shadowing(
        self,
        where: Path_,
        specs: Sequence[MatcherSpec],
        index: RuleIndex,
        earlier: Sequence[tuple[str, CompiledSection | None]],
        *,
        label: str = "",
    ) -> None:
        """Report keywords that can never fire: repeated, or taken by opt-out/opt-in/help first."""
        for i, spec in enumerate(specs):
            rule_where = where + (i,) if label else where
            for kind in ("keywords", "first_word", "contains"):
                seen: dict[str, int] = {}
                for k, word in enumerate(getattr(spec, kind)):
                    probe = NormalizedText.of(word)
                    if not probe.normalized:
                        continue
                    kw_where = rule_where + (kind, k)
                    if probe.normalized in seen:
                        first = getattr(spec, kind)[seen[probe.normalized]]
                        self.report(
                            kw_where, "error", f"keyword {word!r} appears twice in this rule (as {first!r} before)"
                        )
                        continue
                    seen[probe.normalized] = k
                    blocked = next(
                        (
                            name
                            for name, sec in earlier
                            if sec is not None and sec.index.covering(word, kind) is not None
                        ),
                        None,
                    )
                    if blocked is not None:
                        self.report(
                            kw_where,
                            "error",
                            f"keyword {word!r} is shadowed by the {blocked} keywords, which are tried first: "
                            f"this rule can never fire for it",
                        )
                        continue
                    if not label:
                        continue
                    taken_by = index.covering(word, kind)
                    if taken_by is not None and taken_by < i:
                        other = self.line(where + (taken_by,))
                        same = normalize(word) in {normalize(w) for w in getattr(specs[taken_by], kind)}
                        what = "the same keyword appears twice" if same else "it is already matched"
                        self.report(
                            kw_where,
                            "error",
                            f"keyword {word!r} in {label}: {what} (the rule at line {other} takes it first)",
                        )

    # -- actions
    def _action(
        self,
        where: Path_,
        action: Action,
        kind: str,
        captures: dict[str, int | None],
        *,
        after_call: str | None = None,
    ) -> CompiledAction:
        """Compile one action; ``after_call``: the save_as its params are rendered after (a call's answer)."""
        template: CompiledTemplate | None = None
        if action.reply is not None:
            template = self.templates.get(action.reply)
            if template is None:
                self.report(
                    where + ("reply",),
                    "error",
                    f"reply names unknown template '{action.reply}'{did_you_mean(action.reply, self.templates)}",
                )
        if action.goto is not None and action.goto not in self.state_names:
            self.report(
                where + ("goto",),
                "error",
                f"goto names unknown state '{action.goto}'{did_you_mean(action.goto, self.state_names)}",
            )
        if template is not None and len(action.params) != template.placeholders:
            self.report(
                where + (("params",) if action.params else ("reply",)),
                "error",
                f"template '{template.name}' has {template.placeholders} placeholder(s) but "
                f"{len(action.params)} param(s) are given",
            )
        if action.params and action.reply is None:
            self.report(where + ("params",), "error", "params given without a reply")
        call = action.call if isinstance(action, Rule) else None
        saved = call.save_as if call is not None else after_call
        params = tuple(
            self._expression(where + ("params", i), source, captures, is_param=True, after_call=saved)
            for i, source in enumerate(action.params)
        )
        sets = []
        for var, source in action.set.items():
            if not _IDENT_RE.match(var):
                self.report(
                    where + ("set", var),
                    "error",
                    f"variable name {var!r} must be letters, digits and _",
                    key=True,
                )
            sets.append((var, self._expression(where + ("set", var), source, captures, is_param=False)))
        ref = f"{self.name}:{self.line(where)}"
        compiled_call = self._call(where, action, kind, captures, ref) if isinstance(action, Rule) else None
        compiled = CompiledAction(ref, kind, template, params, tuple(sets), action.goto, compiled_call)  # type: ignore[arg-type]
        if compiled_call is not None:
            self.calls[ref] = compiled
        return compiled

    def _call(
        self, where: Path_, rule: Rule, kind: str, captures: dict[str, int | None], ref: str
    ) -> CompiledCall | None:
        if rule.call is None:
            if rule.on_error is not None:
                self.report(
                    where + ("on_error",),
                    "error",
                    "on_error without call: on_error says what to do when the rule's webhook call fails",
                    key=True,
                )
            return None
        call = rule.call
        hook = self.webhooks.get(call.webhook)
        if hook is None:
            known = ", ".join(self.webhooks) or "none: add a top-level webhooks: map"
            self.report(
                where + ("call", "webhook"),
                "error",
                f"call names unknown webhook '{call.webhook}'{did_you_mean(call.webhook, self.webhooks)}; "
                f"webhooks: {known}",
            )
        if call.save_as is not None and not _IDENT_RE.match(call.save_as):
            self.report(
                where + ("call", "save_as"),
                "error",
                f"save_as {call.save_as!r} must be a variable name: letters, digits and _, not starting with a digit",
            )
        if hook is not None and hook.body is not None:
            for key, expr in hook.body:
                for obj, attr in sorted(expr.attributes):
                    if obj == "match" and attr not in captures:
                        have = ", ".join(sorted(captures)) or "nothing"
                        self.report(
                            where + ("call", "webhook"),
                            "error",
                            f"webhook '{hook.name}' body {key} reads 'match.{attr}', but this rule captures {have}",
                        )
        on_error = None
        if rule.on_error is not None:
            spec = Action(reply=rule.on_error.reply, params=rule.on_error.params, goto=rule.on_error.goto)
            on_error = dataclasses.replace(self._action(where + ("on_error",), spec, kind, captures), ref=ref)
        if hook is None:
            return None
        return CompiledCall(hook, call.save_as, on_error)

    def _expression(
        self,
        where: Path_,
        source: str,
        captures: dict[str, int | None] | None,
        *,
        is_param: bool,
        after_call: str | None = None,
    ) -> Expression:
        """Compile ``source``; ``captures`` None: not checked here (a webhook body, checked per call)."""
        try:
            expr = compile_expression(source)
        except ExpressionError as exc:
            self.report(where, "error", exc.message, line_offset=exc.lineno - 1)
            return compile_expression("")
        unknown_names = sorted(expr.names - set(CONTEXT_NAMES))
        for unknown in unknown_names:
            self.report(
                where,
                "error",
                f"unknown variable '{unknown}'{did_you_mean(unknown, CONTEXT_NAMES)}; "
                f"available: {', '.join(CONTEXT_NAMES)}",
            )
        for obj, attr in sorted(expr.attributes):
            if obj == "vars" and attr in self.saved and attr != after_call and not _guarded(expr):
                self.report(
                    where,
                    "warning",
                    f"'vars.{attr}' is the answer of a webhook call (save_as at line {self.saved[attr]}) and is not "
                    f"set here unless that call succeeded earlier; use | default(...) or read it in the calling rule",
                )
            if captures is None:
                continue
            if obj == "match" and attr not in captures:
                have = ", ".join(sorted(captures)) or "nothing"
                self.report(where, "error", f"unknown variable 'match.{attr}': this rule captures {have}")
            elif obj == "contact" and attr not in CONTACT_FIELDS:
                self.report(where, "error", f"unknown variable 'contact.{attr}'; contact has nationcode, mobile")
        if is_param and not unknown_names and captures is not None:
            longest = max_rendered_length(
                expr,
                group_widths=captures,
                signature=None if self.spec.signature == "*" else self.spec.signature,
            )
            if expr.is_literal and longest is not None and longest > self.limit:
                self.report(
                    where,
                    "error",
                    f"parameter {source!r} is {longest} characters; Tencent allows {self.limit} per "
                    f"template variable (param_max_length)",
                )
            elif not expr.is_literal and (longest is None or longest > self.limit):
                about = "can be longer than" if longest is None else f"can be {longest} characters, over"
                origin = "customer text or variables" if expr.uses_customer_data else "its values"
                severity: Severity = "warning" if expr.uses_customer_data or longest is None else "error"
                self.report(
                    where,
                    severity,
                    f"parameter {source!r} is rendered from {origin} and {about} the limit of "
                    f"{self.limit} characters per template variable; Tencent will refuse the send",
                )
        return expr

    # -- whole-file checks
    def _reachability(self, start: str) -> None:
        spec = self.spec
        if not spec.states:
            return
        global_gotos = [a.goto for a in (spec.opt_out, spec.opt_in, spec.help, spec.otherwise) if a and a.goto]
        global_gotos += [r.goto for r in spec.anywhere if r.goto]
        global_gotos += [r.on_error.goto for r in spec.anywhere if r.on_error and r.on_error.goto]
        seen = {start, *global_gotos, *(name for name, state in spec.states.items() if state.entry)}
        todo = list(seen)
        while todo:
            state = spec.states.get(todo.pop())
            if state is None:
                continue
            nexts = [r.goto for r in state.on if r.goto]
            nexts += [r.on_error.goto for r in state.on if r.on_error and r.on_error.goto]
            if state.otherwise and state.otherwise.goto:
                nexts.append(state.otherwise.goto)
            for n in nexts:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        for name in spec.states:
            if name not in seen:
                self.report(
                    ("states", name),
                    "warning",
                    f"state '{name}' is unreachable: no goto leads to it (entry: true if conversations are started "
                    "in it)",
                    key=True,
                )

    def _tests(self) -> None:
        for i, test in enumerate(self.spec.tests):
            where: Path_ = ("tests", i)
            if test.state is not None and test.state not in self.state_names:
                self.report(
                    where + ("state",),
                    "error",
                    f"test '{test.name}' starts in unknown state '{test.state}'"
                    f"{did_you_mean(test.state, self.state_names)}",
                )
            for hook in test.webhooks:
                if hook not in self.webhooks:
                    self.report(
                        where + ("webhooks", hook),
                        "error",
                        f"test '{test.name}' answers unknown webhook '{hook}'{did_you_mean(hook, self.webhooks)}",
                        key=True,
                    )
            if len(test.expect) != len(test.say):
                self.report(
                    where + ("expect",),
                    "error",
                    f"test '{test.name}': {len(test.say)} message(s) in 'say' but {len(test.expect)} in 'expect'",
                )
            for k, exp in enumerate(test.expect):
                if exp.reply is not None and exp.reply not in self.templates:
                    self.report(
                        where + ("expect", k, "reply"),
                        "error",
                        f"test '{test.name}' expects unknown template '{exp.reply}'{did_you_mean(exp.reply, self.templates)}",
                    )
                if exp.call is not None and exp.call not in self.webhooks:
                    self.report(
                        where + ("expect", k, "call"),
                        "error",
                        f"test '{test.name}' expects a call of unknown webhook '{exp.call}'"
                        f"{did_you_mean(exp.call, self.webhooks)}",
                    )
                if exp.state is not None and exp.state not in self.state_names:
                    self.report(
                        where + ("expect", k, "state"),
                        "error",
                        f"test '{test.name}' expects unknown state '{exp.state}'{did_you_mean(exp.state, self.state_names)}",
                    )


def _guarded(expr: Expression) -> bool:
    """Whether an expression allows for missing values (``| default(...)``, ``is defined``)."""
    if expr.ast is None:
        return False
    if any(f.name in ("default", "d") for f in expr.ast.find_all(nodes.Filter)):
        return True
    return any(t.name in ("defined", "undefined") for t in expr.ast.find_all(nodes.Test))
