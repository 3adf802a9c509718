"""Rules > Activity: what each rule and state did over a period, from the stored messages.

Shared by the console page, its JSON (``/console/rules/activity.json``) and
``smsbot report``, so all three print the same numbers. Every figure counts
events (a conversation entering a state twice counts twice), over messages
stored in ``[since, until)`` (``created_at``), optionally of one signature:

- **fired** per (rule, state): inbound rows with that ``rule``, in the state
  they were matched in (``state_before``; the file's ``start`` for a new
  conversation, for a state the file no longer has, or when the state had
  expired).
- **entered** S: inbound rows with ``state_after`` = S that came from another
  state (or from none: a new conversation; or from S itself after S had
  expired), opt-outs excepted; plus **started**: the business's starts into S
  (outbound rows with ``rule_kind = 'start'``).
- **left** S by rule R: inbound rows with ``state_before`` = S, S not expired,
  ``state_after`` != S, fired rule R, opt-outs excepted.
- **expired** in S. Nothing records an expiry, so it is derived: an inbound row
  with ``state_before`` = S whose conversation's previous message (in or out)
  is at least S's ``expires:`` (from the rule files loaded now) older than it
  (the engine then answered from ``start``); plus **expired_silent**:
  conversations still in S, not opted out, whose ``expires_at`` passed within
  the period with no message since. Opt-outs are not counted as expiries.
- **opted_out** from S: ``opt_out_events`` (``opt_out``, in the period) of a
  customer's message (``message_id``), by that message's ``state_before``
  (an admin's or a provider's opt-out has no message and no state: not here).
- **unmatched** texts per state: inbound rows with ``unmatched``, by
  ``state_after`` (the state the text was matched in: an ``otherwise`` stays),
  grouped by normalised text, most frequent first.

The file of a row is the one answering its signature (and extend code) in the
rules loaded now; a signature no file answers is shown as ``(signature)``.
Suggested index for large tables (not created here): ``messages (direction,
created_at)`` or a partial ``created_at WHERE direction = 'in'``; the existing
``ix_messages_created_at`` already bounds every query to the period.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, false, func, select

from bot.rules.model import CompiledFile, Ruleset
from bot.store.models import conversations, messages, opt_out_events

UNMATCHED_TEXTS = 10
"""Unmatched texts listed per state."""


@dataclass
class StateFigures:
    state: str
    entered: int = 0
    started: int = 0
    left: int = 0
    left_by: dict[str, int] = field(default_factory=dict)
    expired: int = 0
    expired_silent: int = 0
    opted_out: int = 0
    unmatched: int = 0
    unmatched_texts: list[tuple[str, int]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "entered": self.entered,
            "started": self.started,
            "left": self.left,
            "left_by": [{"rule": rule, "count": n} for rule, n in _by_count(self.left_by)],
            "expired": self.expired,
            "expired_silent": self.expired_silent,
            "opted_out": self.opted_out,
            "unmatched": self.unmatched,
            "unmatched_texts": [{"text": text, "count": n} for text, n in self.unmatched_texts],
        }


@dataclass
class FileFigures:
    file: str
    signature: str | None
    states: dict[str, StateFigures] = field(default_factory=dict)

    def state(self, name: str) -> StateFigures:
        found = self.states.get(name)
        if found is None:
            found = self.states[name] = StateFigures(name)
        return found

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "signature": self.signature, "states": [s.as_json() for s in self.states.values()]}


@dataclass
class Activity:
    since: datetime
    until: datetime
    signature: str | None
    fired: dict[tuple[str, str, str | None], int] = field(default_factory=dict)
    """(file, rule, state) -> times fired."""
    files: dict[str, FileFigures] = field(default_factory=dict)

    def rules(self) -> list[dict[str, Any]]:
        return [
            {"file": file, "rule": rule, "state": state, "fired": n}
            for (file, rule, state), n in sorted(self.fired.items(), key=lambda kv: (_rule_order(kv[0][1]), kv[0]))
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "signature": self.signature,
            "rules": self.rules(),
            "files": [f.as_json() for f in self.files.values()],
        }


def _rule_order(rule: str) -> tuple[str, int]:
    file, _, line = rule.rpartition(":")
    return (file, int(line)) if line.isdigit() else (rule, 0)


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], _rule_order(kv[0])))


class _Files:
    """Which file answers a (signature, extend code), and in what order its states come."""

    def __init__(self, ruleset: Ruleset | None, activity: Activity) -> None:
        self.ruleset = ruleset
        self.activity = activity
        self.found: dict[tuple[str, str], CompiledFile | None] = {}
        for compiled in ruleset.files if ruleset else ():
            figures = FileFigures(compiled.name, compiled.signature)
            for state in compiled.states:
                figures.state(state)
            activity.files[compiled.name] = figures

    def rules(self, signature: str, extend: str | None) -> CompiledFile | None:
        key = (signature, extend or "")
        if key not in self.found:
            self.found[key] = self.ruleset.for_signature(*key) if self.ruleset else None
        return self.found[key]

    def figures(self, signature: str, extend: str | None) -> tuple[FileFigures, CompiledFile | None]:
        rules = self.rules(signature, extend)
        name = rules.name if rules else f"({signature})"
        found = self.activity.files.get(name)
        if found is None:
            found = self.activity.files[name] = FileFigures(name, rules.signature if rules else signature)
        return found, rules


def _in_period(since: datetime, until: datetime, signature: str | None) -> list[Any]:
    where = [messages.c.created_at >= since, messages.c.created_at < until]
    if signature is not None:
        where.append(messages.c.signature == signature)
    return where


def activity(
    conn: Connection,
    *,
    ruleset: Ruleset | None,
    since: datetime,
    until: datetime,
    signature: str | None = None,
    now: datetime,
    texts_per_state: int = UNMATCHED_TEXTS,
) -> Activity:
    """The figures of the module docstring for ``[since, until)``."""
    result = Activity(since, until, signature)
    files = _Files(ruleset, result)
    period = _in_period(since, until, signature)
    m = messages.c
    group = (m.signature, m.extend_code, m.rule, m.rule_kind, m.state_before, m.state_after)
    counts: dict[tuple[Any, ...], int] = {}
    for row in conn.execute(select(*group, func.count()).where(m.direction == "in", *period).group_by(*group)):
        counts[tuple(row[:-1])] = int(row[-1])
    expired = _expired_rows(conn, files, ruleset, period)
    for key, n in counts.items():
        late = expired.get(key, 0)
        for part, was_expired in ((n - late, False), (late, True)):
            if part:
                _count(files, key, part, was_expired)
    for sign, extend, state, n in conn.execute(
        select(m.signature, m.extend_code, m.state_after, func.count())
        .where(m.direction == "out", m.rule_kind == "start", *period)
        .group_by(m.signature, m.extend_code, m.state_after)
    ):
        if state is not None:
            figures, _ = files.figures(sign, extend)
            figures.state(state).entered += int(n)
            figures.state(state).started += int(n)
    _opt_outs(conn, files, since, until, signature)
    _silent_expiries(conn, files, since, min(until, now), signature)
    _unmatched(conn, files, period, texts_per_state)
    return result


def _count(files: _Files, key: tuple[Any, ...], n: int, was_expired: bool) -> None:
    sign, extend, rule, kind, before, after = key
    figures, rules = files.figures(sign, extend)
    if rules is None:
        matched = before
    elif was_expired or before is None or before not in rules.states:
        matched = rules.start
    else:
        matched = before
    if rule is not None:
        fired_key = (figures.file, rule, matched)
        files.activity.fired[fired_key] = files.activity.fired.get(fired_key, 0) + n
    if kind == "opt_out":
        return
    if after is not None and (after != before or was_expired):
        figures.state(after).entered += n
    if was_expired and before is not None:
        figures.state(before).expired += n
    elif before is not None and after != before:
        state = figures.state(before)
        state.left += n
        name = rule or "(no rule)"
        state.left_by[name] = state.left_by.get(name, 0) + n


def _expired_rows(conn: Connection, files: _Files, ruleset: Ruleset | None, period: list[Any]) -> dict[Any, int]:
    """Per group key of ``activity``: inbound rows that found their ``state_before`` expired."""
    expiring = sorted({name for f in (ruleset.files if ruleset else ()) for name, s in f.states.items() if s.expires})
    if not expiring:
        return {}
    m = messages.c
    p = messages.alias("p")
    previous = (
        select(func.max(p.c.created_at))
        .where(p.c.conversation_id == m.conversation_id, p.c.created_at <= m.created_at, p.c.id < m.id)
        .scalar_subquery()
    )
    stmt = select(
        m.signature, m.extend_code, m.rule, m.rule_kind, m.state_before, m.state_after, m.created_at, previous
    ).where(m.direction == "in", m.state_before.in_(expiring), m.rule_kind.is_distinct_from("opt_out"), *period)
    found: dict[Any, int] = defaultdict(int)
    for row in conn.execute(stmt):
        sign, extend, _rule, _kind, before, _after, at, before_at = row
        rules = files.rules(sign, extend)
        state = rules.states.get(before) if rules else None
        if state is None or state.expires is None or before_at is None:
            continue
        if _aware(before_at) + state.expires <= _aware(at):
            found[tuple(row[:6])] += 1
    return found


def _aware(moment: Any) -> datetime:
    value: datetime = moment if isinstance(moment, datetime) else datetime.fromisoformat(str(moment))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _opt_outs(conn: Connection, files: _Files, since: datetime, until: datetime, signature: str | None) -> None:
    e, m = opt_out_events.c, messages.c
    stmt = (
        select(m.signature, m.extend_code, m.state_before, func.count())
        .select_from(opt_out_events.join(messages, messages.c.id == e.message_id))
        .where(e.event == "opt_out", e.created_at >= since, e.created_at < until)
        .group_by(m.signature, m.extend_code, m.state_before)
    )
    if signature is not None:
        stmt = stmt.where(m.signature == signature)
    for sign, extend, before, n in conn.execute(stmt):
        figures, rules = files.figures(sign, extend)
        state = before if before is not None or rules is None else rules.start
        if state is not None:
            figures.state(state).opted_out += int(n)


def _silent_expiries(conn: Connection, files: _Files, since: datetime, until: datetime, signature: str | None) -> None:
    v = conversations.c
    stmt = (
        select(v.signature, v.state, func.count())
        .where(
            v.opted_out.is_(false()),
            v.state.is_not(None),
            v.expires_at.is_not(None),
            and_(v.expires_at >= since, v.expires_at < until),
        )
        .group_by(v.signature, v.state)
    )
    if signature is not None:
        stmt = stmt.where(v.signature == signature)
    for sign, state, n in conn.execute(stmt):
        figures, _ = files.figures(sign, "")
        figures.state(state).expired += int(n)
        figures.state(state).expired_silent += int(n)


def _unmatched(conn: Connection, files: _Files, period: list[Any], limit: int) -> None:
    m = messages.c
    text = func.coalesce(m.normalized_text, "")
    stmt = (
        select(m.signature, m.extend_code, m.state_after, text, func.count())
        .where(m.direction == "in", m.unmatched.is_(True), *period)
        .group_by(m.signature, m.extend_code, m.state_after, text)
    )
    per_state: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for sign, extend, state, normalized, n in conn.execute(stmt):
        figures, rules = files.figures(sign, extend)
        name = state if state is not None else (rules.start if rules else "(none)")
        per_state[(figures.file, name)][normalized] += int(n)
    for (file, state), texts in per_state.items():
        shown = files.activity.files[file].state(state)
        shown.unmatched = sum(texts.values())
        shown.unmatched_texts = sorted(texts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def period_of(value: str | None, now: datetime, default: timedelta = timedelta(days=7)) -> datetime:
    """``since`` for ``7d`` / ``12h`` / ``30m`` (that long before ``now``) or a date (``2026-01-31``, UTC)."""
    from bot.rules.schema import parse_duration

    text = (value or "").strip()
    if not text:
        return now - default
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration (7d, 12h, 30m) nor a date (2026-01-31)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
