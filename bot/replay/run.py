"""``replay``: the stored inbound messages of a period through candidate rules, nothing written or sent.

How each conversation is replayed (and what cannot be known):

- Messages are read with one streaming cursor (a server-side cursor on
  PostgreSQL), ordered by conversation then id, so memory holds one
  conversation's rows at a time. Inbound rows, the replies stored in reply to
  them (``in_reply_to_id``) and the business's starts (``rule_kind = 'start'``)
  are read; nothing else.
- A conversation starts from the state it had before its first row in the
  period (that row's ``state_before``). Its expiry is reconstructed from the
  time of its last message before the period plus the candidate's ``expires:``
  for that state. Its **vars are the conversation's current vars** (what it
  holds today, which may include values set later in the period: vars are not
  stored per message), and it counts as opted out at its first message when it
  is opted out now and was opted out before that message.
- Each inbound message is decided with the candidate rules at the time it was
  stored, against the replayed conversation (so a change early in a
  conversation carries on to its later messages). A start in the period puts
  the replayed conversation in the state it started in, as it did then.
- A rule's ``call:`` is answered with the answer recorded for that message
  and that webhook (``webhook_calls``) when history made the same call; any
  other call is not made: it takes the rule's ``on_error`` like the simulator
  (``bot.rules.simulation.NOT_CALLED``) and is counted in ``calls_not_made``.
- Decisions are cached per (file, state, opted out, expired, text, signature,
  nationcode) when the rule that fired reads nothing of the message's context
  (no ``set:``, no templated params, no call): most messages are a few keywords
  in a few states. Cached and uncached replays give the same report (tested).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from bot.replay.compare import Happened, Replayed, ReplayReport, ReplyView
from bot.rules.engine import decide
from bot.rules.model import (
    CompiledAction,
    CompiledFile,
    Conversation,
    Decision,
    InboundMessage,
    Reply,
    Ruleset,
    WebhookOutcome,
)
from bot.rules.simulation import simulate_message
from bot.store.driver_sql import DriverSql, chunks

CHUNK = 5000
"""Rows fetched from the cursor at a time."""

_COLUMNS = (
    "m.id, m.conversation_id, m.direction, m.in_reply_to_id, m.rule_kind, m.signature, m.extend_code, m.text,"
    " m.created_at, m.rule, m.state_before, m.state_after, m.template_name, m.params, c.nationcode, c.mobile"
)


@dataclass
class _Row:
    id: int
    direction: str
    in_reply_to_id: int | None
    rule_kind: str | None
    signature: str
    extend: str
    text: str
    created_at: datetime
    rule: str | None
    state_before: str | None
    state_after: str | None
    template: str | None
    params: tuple[str, ...]
    nationcode: str
    mobile: str


@dataclass
class _Known:
    """What the conversations table says of a conversation (read per chunk of rows)."""

    variables: dict[str, Any]
    opted_out: bool
    opted_out_at: datetime | None
    last_before: datetime | None
    calls: dict[tuple[int, str], WebhookOutcome] = field(default_factory=dict)


def replay(
    conn: Connection,
    ruleset: Ruleset,
    since: datetime,
    until: datetime | None = None,
    signature: str | None = None,
    *,
    max_examples: int = 3,
    chunk: int = CHUNK,
    cache: bool = True,
    progress: Callable[[int], None] | None = None,
    limit: int | None = None,
) -> ReplayReport:
    """Replay the inbound messages stored in ``[since, until)`` (of ``signature``) with ``ruleset``.

    Reads only; the caller owns the connection (one read transaction gives one snapshot).
    ``progress`` is called with the number of inbound messages replayed so far, after each chunk.
    ``limit``: stop before the next conversation once that many inbound messages are replayed
    (``report.cut`` says a conversation was left out; a conversation is never replayed in part).
    """
    report = ReplayReport(since, until, signature, ruleset.version, max_examples=max_examples)
    db = DriverSql(conn)
    decider = _Decider(ruleset, cache=cache)
    stream = _conversations(db, since, until, signature, chunk, bool(_has_webhooks(ruleset)), progress)
    with closing(stream):
        for rows, known in stream:
            if limit is not None and report.messages >= limit:
                report.cut = True
                break
            report.conversations += 1
            _replay_conversation(rows, known, decider, report)
    return report


def _has_webhooks(ruleset: Ruleset) -> bool:
    return any(f.webhooks for f in ruleset.files)


def _replay_conversation(rows: Sequence[_Row], known: _Known, decider: _Decider, report: ReplayReport) -> None:
    replies: dict[int, list[ReplyView]] = {}
    for row in rows:
        if row.direction == "out" and row.in_reply_to_id is not None:
            replies.setdefault(row.in_reply_to_id, []).append(ReplyView(row.template, row.params, row.text))
    first = rows[0]
    opted_out = known.opted_out and known.opted_out_at is not None and known.opted_out_at < first.created_at
    conversation = Conversation(
        state=first.state_before,
        vars=known.variables,
        expires_at=decider.expiry(first, first.state_before, known.last_before),
        opted_out=opted_out,
    )
    for row in rows:
        if row.direction == "out":
            if row.rule_kind == "start" and row.in_reply_to_id is None:
                conversation = Conversation(
                    state=row.state_after,
                    vars=conversation.vars,
                    expires_at=decider.expiry(row, row.state_after, row.created_at),
                    opted_out=conversation.opted_out,
                )
            continue
        replayed, conversation = decider.run(row, conversation, known.calls)
        happened = Happened(row.rule, row.state_after, tuple(replies.get(row.id, ())))
        report.add(happened, replayed, nationcode=row.nationcode, mobile=row.mobile, text=row.text, at=row.created_at)


def _views(replies: Sequence[Reply]) -> tuple[ReplyView, ...]:
    return tuple(ReplyView(r.template, tuple(r.params), r.text) for r in replies)


class _Decider:
    """The candidate's decisions, cached where the fired rule reads no context (see the module docstring)."""

    def __init__(self, ruleset: Ruleset, *, cache: bool) -> None:
        self.ruleset = ruleset
        self.cache_on = cache
        self.cache: dict[tuple[Any, ...], Decision] = {}
        self.files: dict[tuple[str, str], CompiledFile | None] = {}
        self.contextual: dict[int, dict[str, bool]] = {id(f): _contextual_refs(f) for f in ruleset.files}

    def file(self, signature: str, extend: str) -> CompiledFile | None:
        key = (signature, extend)
        if key not in self.files:
            self.files[key] = self.ruleset.for_signature(signature, extend)
        return self.files[key]

    def expiry(self, row: _Row, state: str | None, at: datetime | None) -> datetime | None:
        rules = self.file(row.signature, row.extend)
        if rules is None or state is None or at is None or state not in rules.states:
            return None
        expires = rules.states[state].expires
        return at + expires if expires is not None else None

    def run(
        self, row: _Row, conversation: Conversation, calls: dict[tuple[int, str], WebhookOutcome]
    ) -> tuple[Replayed, Conversation]:
        rules = self.file(row.signature, row.extend)
        if rules is None:  # no file answers: stored, not answered (handle_batch's "ignored")
            replayed = Replayed(None, conversation.state, conversation.state, ())
            return replayed, conversation
        message = InboundMessage(
            text=row.text, sign=row.signature, nationcode=row.nationcode, mobile=row.mobile, extend=row.extend
        )
        now = row.created_at
        decision = self._cached(rules, conversation, message, now) if self.cache_on else None
        call: str | None = None
        answered = False
        if decision is None:
            decision = decide(rules, conversation, message, now)
            if decision.call is not None:
                call = decision.call.webhook
                outcome = calls.get((row.id, call))
                answered = outcome is not None
                webhooks = {call: outcome} if outcome is not None else None
                decision = simulate_message(rules, conversation, message, now, webhooks=webhooks).decision
            elif self.cache_on:
                self._remember(rules, conversation, message, now, decision)
        replayed = Replayed(decision.rule, conversation.state, decision.state, _views(decision.replies), call, answered)
        return replayed, decision.conversation()

    def _key(self, rules: CompiledFile, conversation: Conversation, message: InboundMessage, now: datetime) -> Any:
        expired = (
            conversation.state is not None
            and conversation.state in rules.states
            and conversation.expires_at is not None
            and now >= conversation.expires_at
        )
        return (
            id(rules),
            conversation.state,
            conversation.opted_out,
            expired,
            message.text,
            message.sign,
            message.nationcode,
        ), expired

    def _cached(
        self, rules: CompiledFile, conversation: Conversation, message: InboundMessage, now: datetime
    ) -> Decision | None:
        key, expired = self._key(rules, conversation, message, now)
        found = self.cache.get(key)
        if found is None:
            return None
        # Rebuild what depends on this conversation and moment, as decide() would compute it.
        if found.rule is not None or found.unmatched:
            state = rules.states.get(found.state) if found.state is not None else None
            expires = state.expires if state is not None else None
            expires_at = None if found.opted_out or expires is None else now + expires
        else:
            expires_at = None if expired else conversation.expires_at
        return Decision(
            rule=found.rule,
            rule_kind=found.rule_kind,
            state_before=conversation.state,
            state=found.state,
            vars=conversation.vars,
            expires_at=expires_at,
            replies=found.replies,
            opted_out=found.opted_out,
            opt_change=found.opt_change,
            unmatched=found.unmatched,
            expired=found.expired,
            normalized_text=found.normalized_text,
            rules_file=found.rules_file,
        )

    def _remember(
        self, rules: CompiledFile, conversation: Conversation, message: InboundMessage, now: datetime, d: Decision
    ) -> None:
        if d.errors or d.call is not None:
            return
        if d.rule is not None and self.contextual[id(rules)].get(d.rule, True):
            return
        if len(self.cache) >= 100_000:
            self.cache.clear()
        self.cache[self._key(rules, conversation, message, now)[0]] = d


def _actions(rules: CompiledFile) -> Iterator[CompiledAction]:
    sections = [rules.opt_out, rules.opt_in, rules.help, rules.anywhere]
    sections += [state.rules for state in rules.states.values()]
    for section in sections:
        if section is not None:
            yield from section.actions
    for state in rules.states.values():
        if state.otherwise is not None:
            yield state.otherwise
    if rules.otherwise is not None:
        yield rules.otherwise


def _contextual_refs(rules: CompiledFile) -> dict[str, bool]:
    """Per rule ref: whether any action with it reads the message's context (those are never cached)."""
    refs: dict[str, bool] = {}
    for action in _actions(rules):
        refs[action.ref] = refs.get(action.ref, False) or action.needs_context or action.call is not None
    return refs


# ---------------------------------------------------------------- reading


def _conversations(
    db: DriverSql,
    since: datetime,
    until: datetime | None,
    signature: str | None,
    chunk: int,
    with_calls: bool,
    progress: Callable[[int], None] | None,
) -> Generator[tuple[list[_Row], _Known], None, None]:
    """Each conversation's rows of the period, in id order, with what the conversations table says of it."""
    where = ["m.created_at >= ?", "m.conversation_id IS NOT NULL"]
    params: list[Any] = [db.ts(since)]
    if until is not None:
        where.append("m.created_at < ?")
        params.append(db.ts(until))
    if signature is not None:
        where.append("m.signature = ?")
        params.append(signature)
    where.append("(m.direction = 'in' OR m.in_reply_to_id IS NOT NULL OR m.rule_kind = 'start')")
    statement = (
        f"SELECT {_COLUMNS} FROM messages m JOIN contacts c ON c.id = m.contact_id"
        f" WHERE {' AND '.join(where)} ORDER BY m.conversation_id, m.id"
    )
    cursor = _stream(db, statement, params, chunk)
    current: int | None = None
    rows: list[_Row] = []
    known: dict[int, _Known] = {}
    inbound = 0
    try:
        while True:
            batch = cursor.fetchmany(chunk)
            if not batch:
                break
            fresh = sorted({int(r[1]) for r in batch} - known.keys())
            known.update(_read_known(db, fresh, since, with_calls))
            for raw in batch:
                conversation_id = int(raw[1])
                if conversation_id != current:
                    if rows and current is not None:
                        yield rows, known.pop(current)
                    current, rows = conversation_id, []
                row = _row(db, raw)
                inbound += row.direction == "in"
                rows.append(row)
            if progress is not None:
                progress(inbound)
        if rows and current is not None:
            yield rows, known.pop(current)
    finally:
        cursor.close()


def _stream(db: DriverSql, statement: str, params: Sequence[Any], chunk: int) -> Any:
    """A cursor that fetches as it goes: server-side on PostgreSQL, SQLite's own stepping otherwise."""
    if db.postgres:
        connection = db.cursor.connection
        cursor = connection.cursor(name="smsbot_replay")
        cursor.itersize = chunk
        cursor.execute(db.sql(statement), tuple(params))
        return cursor
    cursor = db.cursor.connection.cursor()
    cursor.execute(statement, tuple(params))
    return cursor


def _row(db: DriverSql, raw: Sequence[Any]) -> _Row:
    created = raw[8]
    if isinstance(created, str):
        created_at = datetime.fromisoformat(created).replace(tzinfo=UTC)
    else:
        created_at = created if created.tzinfo is not None else created.replace(tzinfo=UTC)
    params = raw[13]
    if isinstance(params, str | bytes):
        params = json.loads(params)
    return _Row(
        id=int(raw[0]),
        direction=raw[2],
        in_reply_to_id=raw[3],
        rule_kind=raw[4],
        signature=raw[5],
        extend=raw[6] or "",
        text=raw[7],
        created_at=created_at,
        rule=raw[9],
        state_before=raw[10],
        state_after=raw[11],
        template=raw[12],
        params=tuple(params or ()),
        nationcode=raw[14],
        mobile=raw[15],
    )


def _read_known(db: DriverSql, ids: Sequence[int], since: datetime, with_calls: bool) -> dict[int, _Known]:
    found: dict[int, _Known] = {}
    if not ids:
        return found
    reader = DriverSql(db.conn)
    for part in chunks(ids):
        where, params = reader.in_list("v.id", part)
        for row in reader.rows(
            "SELECT v.id, v.variables, v.opted_out, v.opted_out_at, (SELECT max(p.created_at) FROM messages p"
            f" WHERE p.conversation_id = v.id AND p.created_at < ?) FROM conversations v WHERE {where}",
            [reader.ts(since), *params],
        ):
            found[int(row[0])] = _Known(
                variables=dict(reader.read_json(row[1]) or {}),
                opted_out=bool(row[2]),
                opted_out_at=reader.read_ts(row[3]),
                last_before=reader.read_ts(row[4]),
            )
        if with_calls:
            where, params = reader.in_list("conversation_id", part)
            for conversation_id, message_id, webhook, status, response, error in reader.rows(
                "SELECT conversation_id, message_id, webhook, status, response, error FROM webhook_calls"
                f" WHERE {where}",
                params,
            ):
                outcome = _outcome(status, reader.read_json(response), error)
                if outcome is not None and int(conversation_id) in found:
                    found[int(conversation_id)].calls[(int(message_id), webhook)] = outcome
    return found


def _outcome(status: str, response: Any, error: str | None) -> WebhookOutcome | None:
    """The recorded answer of a finished call (None while pending: history has no answer yet)."""
    if status == "ok":
        data = response.get("json") if isinstance(response, dict) else None
        return WebhookOutcome(ok=True, data=data)
    if status in ("failed", "timeout"):
        return WebhookOutcome(ok=False, error=error or status)
    return None


def period_start(text: str, now: datetime) -> datetime:
    """``7d``, ``12h``, ``30m`` (that long before ``now``), or a date/time (UTC unless it says otherwise)."""
    from bot.rules.schema import parse_duration

    value = text.strip()
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (7d, 12h, 30m) nor a date (2026-01-31)") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
