"""``decide``: the pure heart of the bot.

Given the rules, what we remember of a conversation, the new message and the
time, say what should happen. No database, no clock, no network: the caller
owns all of those, which keeps this fast and lets tests and the simulator run
exactly the code production runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2

from bot.rules.matching import Hit
from bot.rules.model import (
    CompiledAction,
    CompiledFile,
    CompiledSection,
    Conversation,
    Decision,
    InboundMessage,
    OptChange,
    Reply,
    Ruleset,
)
from bot.rules.normalize import NormalizedText
from bot.rules.sms_length import SmsLength, sms_length
from bot.rules.templating import Bag

_PLACEHOLDER_RE = re.compile(r"\{(\d+)\}")


def decide(
    ruleset: Ruleset | CompiledFile,
    conversation: Conversation,
    message: InboundMessage,
    now: datetime,
) -> Decision:
    """Decide what one inbound message does to its conversation."""
    rules = ruleset if isinstance(ruleset, CompiledFile) else ruleset.for_signature(message.sign)
    text = NormalizedText.of(message.text)
    if rules is None:
        return _nothing(conversation, text, rules_file=None, state=conversation.state)

    state_name = rules.start
    expired = False
    if conversation.state is not None and conversation.state in rules.states:
        if conversation.expires_at is not None and now >= conversation.expires_at:
            expired = True
        else:
            state_name = conversation.state

    if conversation.opted_out:
        hit = _find(rules.opt_in, text)
        if hit is None:
            return _nothing(conversation, text, rules_file=rules.name, state=state_name, expired=expired)
        action, captures = hit
        return _apply(rules, conversation, message, text, now, action, captures, state_name, expired)

    state = rules.states[state_name]
    candidates: tuple[CompiledSection | None, ...] = (
        rules.opt_out,
        rules.opt_in,
        rules.help,
        state.rules,
        rules.anywhere,
    )
    for section in candidates:
        hit = _find(section, text)
        if hit is not None:
            action, captures = hit
            return _apply(rules, conversation, message, text, now, action, captures, state_name, expired)
    fallback = state.otherwise or rules.otherwise
    if fallback is not None:
        return _apply(rules, conversation, message, text, now, fallback, {}, state_name, expired)
    decision = _nothing(conversation, text, rules_file=rules.name, state=state_name, expired=expired)
    return _with(decision, unmatched=True, expires_at=_expiry(rules, state_name, now))


def _find(section: CompiledSection | None, text: NormalizedText) -> tuple[CompiledAction, dict[str, str]] | None:
    if section is None:
        return None
    hit: Hit | None = section.index.find(text)
    if hit is None:
        return None
    return section.actions[hit.index], hit.captures


def _expiry(rules: CompiledFile, state: str, now: datetime) -> datetime | None:
    expires = rules.states[state].expires
    return now + expires if expires is not None else None


def _apply(
    rules: CompiledFile,
    conversation: Conversation,
    message: InboundMessage,
    text: NormalizedText,
    now: datetime,
    action: CompiledAction,
    captures: Mapping[str, str],
    state_name: str,
    expired: bool,
) -> Decision:
    opted_out = conversation.opted_out
    opt_change: OptChange | None = None
    next_state = state_name
    if action.kind == "opt_out":
        opted_out, opt_change, next_state = True, "opt_out", rules.start
    elif action.kind == "opt_in":
        if opted_out:
            next_state = rules.start
        opted_out, opt_change = False, ("opt_in" if opted_out else None)
    if action.goto is not None:
        next_state = action.goto

    errors: list[str] = []
    variables = dict(conversation.vars)
    context: dict[str, Any] = {}
    if action.needs_context:
        context = {
            "text": text.trimmed,
            "match": Bag(captures),
            "vars": Bag(variables),
            "signature": message.sign,
            "contact": Bag({"nationcode": message.nationcode, "mobile": message.mobile}),
            "now": now,
        }
    if action.sets:
        new_values: dict[str, str] = {}
        for name, expr in action.sets:
            try:
                new_values[name] = expr.render(context)
            except Exception as exc:  # a rule's template must never crash the pipeline
                errors.append(f"{action.ref}: set {name}: {_describe(exc)}")
        variables.update(new_values)
        context["vars"] = Bag(variables)

    replies: tuple[Reply, ...] = ()
    if action.reply is not None:
        try:
            params = tuple(expr.render(context) for expr in action.params)
        except Exception as exc:  # a rule's template must never crash the pipeline
            errors.append(f"{action.ref}: params of reply {action.reply.name!r}: {_describe(exc)}")
        else:
            replies = (_reply(action, params, message, rules.sender_id),)

    return Decision(
        rule=action.ref,
        rule_kind=action.kind,
        state_before=conversation.state,
        state=next_state,
        vars=variables,
        expires_at=None if opted_out else _expiry(rules, next_state, now),
        replies=replies,
        opted_out=opted_out,
        opt_change=opt_change,
        unmatched=action.kind in ("otherwise", "state_otherwise"),
        expired=expired,
        normalized_text=text.normalized,
        rules_file=rules.name,
        errors=tuple(errors),
        reply_max_delay=rules.reply_max_delay,
    )


@lru_cache(maxsize=4096)
def _preview(template_text: str, params: tuple[str, ...], billed_prefix: str, nationcode: str) -> tuple[str, SmsLength]:
    """The text the customer sees and what it costs; replies repeat, so this is cached."""

    def fill(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return params[n - 1] if 0 < n <= len(params) else m.group(0)

    text = _PLACEHOLDER_RE.sub(fill, template_text) if params or "{" in template_text else template_text
    return text, sms_length(billed_prefix + text, nationcode=nationcode)


def _reply(action: CompiledAction, params: tuple[str, ...], message: InboundMessage, sender_id: str | None) -> Reply:
    template = action.reply
    assert template is not None
    if is_mainland(message.nationcode):
        sign = message.sign.strip().removeprefix("【").removesuffix("】")
        text, size = _preview(template.text, params, f"【{sign}】", "86")
        template_id, refused = template.id, None
    else:
        # Abroad Tencent sends no signature and takes only international templates.
        text, size = _preview(template.text, params, "", message.nationcode.lstrip("+"))
        template_id = template.intl_id or template.id
        refused = (
            None
            if template.intl_id
            else f"template '{template.name}' has no intl_id: Tencent refuses mainland templates to numbers "
            f"outside the Chinese mainland (+{message.nationcode.lstrip('+')}); give it the id of an approved "
            "international template"
        )
    return Reply(
        template=template.name,
        template_id=template_id,
        params=params,
        text=text,
        length=size.length,
        segments=size.segments,
        encoding=size.encoding,
        marketing=template.marketing,
        refused=refused,
        sender_id=None if is_mainland(message.nationcode) else sender_id,
    )


def is_mainland(nationcode: str) -> bool:
    return nationcode.lstrip("+") == "86"


def _describe(exc: Exception) -> str:
    if isinstance(exc, jinja2.UndefinedError):
        message = (exc.message or "").replace("'bot.rules.templating.Bag object'", "it")
        return f"undefined value ({message}); use | default(...) for values that may be missing"
    return f"{type(exc).__name__}: {exc}"


def _nothing(
    conversation: Conversation,
    text: NormalizedText,
    *,
    rules_file: str | None,
    state: str | None,
    expired: bool = False,
) -> Decision:
    return Decision(
        rule=None,
        rule_kind=None,
        state_before=conversation.state,
        state=state,
        vars=dict(conversation.vars),
        expires_at=None if expired else conversation.expires_at,
        replies=(),
        opted_out=conversation.opted_out,
        opt_change=None,
        unmatched=False,
        expired=expired,
        normalized_text=text.normalized,
        rules_file=rules_file,
    )


def _with(decision: Decision, **changes: Any) -> Decision:
    from dataclasses import replace

    return replace(decision, **changes)
