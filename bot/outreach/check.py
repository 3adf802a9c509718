"""A start request checked against the live rules, before any SQL: every refusal names the field.

What can be checked without the conversation is checked here (the number,
the signature's rule file, the template by name, the state, the parameter
count, the vars' names and sizes); the parameters themselves may be Jinja2
expressions over the conversation's vars, so they are rendered by
``render_params`` once the write has read the stored vars.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

import jinja2

from bot.rules.engine import is_mainland
from bot.rules.model import CompiledFile, CompiledTemplate, Ruleset, signature_key
from bot.rules.normalize import unstorable
from bot.rules.templating import Bag, Expression, ExpressionError, compile_expression

MAX_VARS = 50
"""Vars one request may set."""
MAX_VAR_LENGTH = 1000
"""Characters of one var's value."""
VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
"""A var name: what ``{{ vars.NAME }}`` can read."""
_NATIONCODE = re.compile(r"\+?\d{1,4}")
_MOBILE = re.compile(r"\d{5,20}")


class StartRefused(Exception):  # noqa: N818 - named for what the caller gets
    """A start (or vars change) that cannot be made as asked; ``field`` is the request's field at fault."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class StartRequest:
    """One conversation to start, as the API body or a CLI row gives it."""

    signature: str
    nationcode: str
    mobile: str
    template: str
    params: Sequence[str] | None = None
    state: str | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None


@dataclass(frozen=True)
class CheckedStart:
    """A start the rules allow: what to send, the state to set, and the expressions still to render."""

    request: StartRequest
    signature: str
    """The rule file's own spelling of the signature: what the conversation is stored under (Tencent's ``sign``)."""
    nationcode: str
    mobile: str
    rules: CompiledFile
    template: CompiledTemplate
    state: str
    expires: timedelta | None
    params: tuple[Expression, ...]
    vars: Mapping[str, str]
    extend_code: str | None
    param_max_length: int | None
    rules_version: str | None = None
    """The version of the rules it was checked against (``messages.rules_version`` of the message)."""


def check_number(nationcode: str, mobile: str) -> tuple[str, str]:
    """``(nationcode, mobile)`` in the form callbacks store them (digits, no ``+``), or StartRefused."""
    code, number = nationcode.strip(), mobile.strip()
    if not _NATIONCODE.fullmatch(code):
        raise StartRefused("nationcode", "a country code of 1 to 4 digits (86 for mainland China)")
    if not _MOBILE.fullmatch(number):
        raise StartRefused("mobile", "the full phone number without country code: 5 to 20 digits")
    return code.lstrip("+"), number


def check_vars(values: Mapping[str, Any], *, field_name: str = "vars") -> dict[str, str]:
    """Vars as text, with names ``{{ vars.NAME }}`` can read; StartRefused naming the bad one."""
    if len(values) > MAX_VARS:
        raise StartRefused(field_name, f"at most {MAX_VARS} vars at once")
    checked: dict[str, str] = {}
    for name, value in values.items():
        if not isinstance(name, str) or not VAR_NAME.fullmatch(name):
            raise StartRefused(
                f"{field_name}.{name}", "a var name is a letter or _ then letters, digits or _ (at most 64)"
            )
        if not isinstance(value, str):
            raise StartRefused(f"{field_name}.{name}", "vars are text: give the value as a JSON string")
        if len(value) > MAX_VAR_LENGTH:
            raise StartRefused(f"{field_name}.{name}", f"at most {MAX_VAR_LENGTH} characters")
        problem = unstorable(value)
        if problem is not None:
            raise StartRefused(f"{field_name}.{name}", problem)
        checked[name] = value
    return checked


def rule_file(ruleset: Ruleset | None, signature: str, template: str | None = None) -> CompiledFile:
    """The rule file a start under ``signature`` uses; with ``template``, the one of that signature's files that has it.

    A signature only the default file (``signature: "*"``) answers is refused: a start
    picks its signature, and a typo must not send SMS under a signature nobody wrote
    rules for. A signature may have several files (one per ``extend`` code): the one
    ``for_signature`` gives first, else the one file of that signature with the template.
    """
    if ruleset is None:
        raise StartRefused("signature", "no rules are loaded")
    if not signature.strip():
        raise StartRefused("signature", "give the SMS signature")
    key = signature_key(signature)
    others = [f for f in ruleset.files if f.signature != "*" and signature_key(f.signature) == key]
    if not others:
        raise StartRefused("signature", f"no rule file answers the signature {signature!r}")
    found = ruleset.for_signature(signature)
    if found is None or found.signature == "*":  # only files scoped to extend codes have this signature
        found = others[0]
    if template is None or template in found.templates:
        return found
    having = [f for f in others if template in f.templates]
    if len(having) == 1:
        return having[0]
    if len(having) > 1:
        names = ", ".join(f.name for f in having)
        raise StartRefused("template", f"template {template!r} is in several files of this signature ({names})")
    known = ", ".join(sorted(found.templates)) or "none"
    raise StartRefused("template", f"no template {template!r} in {found.name} (its templates: {known})")


def check_start(ruleset: Ruleset | None, request: StartRequest, *, param_max_length: int | None = None) -> CheckedStart:
    """``request`` checked against ``ruleset``; StartRefused naming the field otherwise."""
    nationcode, mobile = check_number(request.nationcode, request.mobile)
    rules = rule_file(ruleset, request.signature, request.template)
    template = rules.templates[request.template]
    state = request.state if request.state is not None else rules.start
    if state not in rules.states:
        known = ", ".join(sorted(rules.states))
        raise StartRefused("state", f"no state {state!r} in {rules.name} (its states: {known})")
    given = tuple(request.params or ())
    if len(given) != template.placeholders:
        raise StartRefused(
            "params",
            f"template {template.name!r} has {template.placeholders} placeholder(s) ({template.text!r}): "
            f"give exactly {template.placeholders} params, not {len(given)}",
        )
    if not is_mainland(nationcode) and not template.intl_id:
        raise StartRefused(
            "template",
            f"template {template.name!r} has no intl_id: Tencent refuses mainland templates to numbers outside "
            f"the Chinese mainland (+{nationcode})",
        )
    expressions: list[Expression] = []
    for index, source in enumerate(given):
        if not isinstance(source, str):
            raise StartRefused(f"params[{index}]", "params are text")
        try:
            expressions.append(_compiled(source))
        except ExpressionError as exc:
            raise StartRefused(f"params[{index}]", exc.message) from None
        bad = expressions[-1].names - {"vars", "signature", "contact", "now"}
        if bad:
            raise StartRefused(
                f"params[{index}]", f"unknown name(s) {sorted(bad)}: a start's params see vars, signature, contact, now"
            )
    return CheckedStart(
        request=request,
        signature=rules.signature,
        nationcode=nationcode,
        mobile=mobile,
        rules=rules,
        template=template,
        state=state,
        expires=rules.states[state].expires,
        params=tuple(expressions),
        vars=check_vars(request.vars),
        extend_code=rules.extend or None,  # the file-level `extend:` it was sent with
        param_max_length=param_max_length,
        rules_version=ruleset.version if ruleset is not None else None,
    )


@lru_cache(maxsize=1024)
def _compiled(source: str) -> Expression:
    """Compiled once per distinct text: a batch repeats the same few expressions."""
    return compile_expression(source)


def render_params(start: CheckedStart, variables: Mapping[str, Any], now: datetime) -> tuple[str, ...]:
    """The params rendered in the rules' sandbox against the conversation's merged vars; StartRefused on failure."""
    context: dict[str, Any] | None = None
    rendered: list[str] = []
    for index, expression in enumerate(start.params):
        if expression.is_literal:
            value = expression.source
        else:
            if context is None:
                context = {
                    "vars": Bag(variables),
                    "signature": start.signature,
                    "contact": Bag({"nationcode": start.nationcode, "mobile": start.mobile}),
                    "now": now,
                }
            try:
                value = expression.render(context)
            except jinja2.UndefinedError as exc:
                message = (exc.message or "").replace("'bot.rules.templating.Bag object'", "it")
                raise StartRefused(
                    f"params[{index}]",
                    f"undefined value ({message}); use | default(...) for values that may be missing",
                ) from None
            except Exception as exc:  # a template must never crash the request
                raise StartRefused(f"params[{index}]", f"{type(exc).__name__}: {exc}") from None
        if start.param_max_length is not None and len(value) > start.param_max_length:
            raise StartRefused(
                f"params[{index}]",
                f"{value!r} is {len(value)} characters; Tencent takes at most {start.param_max_length} per template "
                "variable (param_max_length)",
            )
        rendered.append(value)
    return tuple(rendered)
