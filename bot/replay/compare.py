"""What a replayed message does differently from what really happened: pure values, no database.

``compare(happened, replayed)`` says whether the reply changed (added,
removed, or a different template, params or text) and whether the state the
message left the conversation in changed. ``ReplayReport.add`` counts each
message and keeps, per (old rule, new rule, state), the counts and the first
few examples, with the number masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from bot.numbers import mask_number, mask_phone_numbers

ReplyChange = Literal["added", "removed", "changed"]


@dataclass(frozen=True)
class ReplyView:
    """One reply as the customer gets it: template name, params, text."""

    template: str | None
    params: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class Happened:
    """What an inbound message really did: the stored row and the replies stored in reply to it."""

    rule: str | None
    state_after: str | None
    replies: tuple[ReplyView, ...]


@dataclass(frozen=True)
class Replayed:
    """What the candidate rules do with the same message, in the replayed conversation."""

    rule: str | None
    state_before: str | None
    state_after: str | None
    replies: tuple[ReplyView, ...]
    call: str | None = None
    """The webhook the fired rule would call (its answer: the recorded one, or none: ``on_error``)."""
    call_answered: bool = False
    """The call was answered with the answer recorded for this message (else it was not made)."""


@dataclass(frozen=True)
class Difference:
    reply: ReplyChange | None
    state: bool

    @property
    def any(self) -> bool:
        return self.reply is not None or self.state


def compare(happened: Happened, replayed: Replayed) -> Difference:
    """The reply change (None: the same replies) and whether the resulting state differs."""
    reply: ReplyChange | None = None
    if happened.replies != replayed.replies:
        if not happened.replies:
            reply = "added"
        elif not replayed.replies:
            reply = "removed"
        else:
            reply = "changed"
    return Difference(reply, happened.state_after != replayed.state_after)


@dataclass(frozen=True)
class Example:
    number: str
    """Masked (``+86 138****0000``)."""
    at: datetime
    text: str
    old_reply: str | None
    new_reply: str | None
    old_state: str | None
    new_state: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "at": self.at.isoformat(),
            "text": self.text,
            "old_reply": self.old_reply,
            "new_reply": self.new_reply,
            "old_state": self.old_state,
            "new_state": self.new_state,
        }


@dataclass
class Group:
    """Changed messages that fired ``old_rule`` then and ``new_rule`` now, arriving in ``state``."""

    old_rule: str | None
    new_rule: str | None
    state: str | None
    messages: int = 0
    replies_changed: int = 0
    added: int = 0
    removed: int = 0
    changed: int = 0
    states_changed: int = 0
    examples: list[Example] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "old_rule": self.old_rule,
            "new_rule": self.new_rule,
            "state": self.state,
            "messages": self.messages,
            "replies_changed": self.replies_changed,
            "replies_added": self.added,
            "replies_removed": self.removed,
            "replies_different": self.changed,
            "states_changed": self.states_changed,
            "examples": [e.as_json() for e in self.examples],
        }


def _shown(replies: tuple[ReplyView, ...]) -> str | None:
    if not replies:
        return None
    return " / ".join(f"[{r.template}] {r.text}" for r in replies)


@dataclass
class ReplayReport:
    """The counts of a replay. Only messages with a difference are grouped (``groups``)."""

    since: datetime
    until: datetime | None
    signature: str | None
    version: str
    max_examples: int = 3
    messages: int = 0
    conversations: int = 0
    replies_changed: int = 0
    replies_added: int = 0
    replies_removed: int = 0
    replies_different: int = 0
    states_changed: int = 0
    would_call: dict[str, int] = field(default_factory=dict)
    """Per webhook: messages whose candidate rule calls it."""
    calls_not_made: int = 0
    """Of those, calls with no recorded answer for the message: not made, ``on_error`` followed."""
    groups: dict[tuple[str | None, str | None, str | None], Group] = field(default_factory=dict)
    cut: bool = False
    """The replay stopped at its message limit: later conversations of the period are not in the counts."""

    def add(
        self,
        happened: Happened,
        replayed: Replayed,
        *,
        nationcode: str,
        mobile: str,
        text: str,
        at: datetime,
    ) -> Difference:
        """Count one message; returns its difference."""
        self.messages += 1
        if replayed.call is not None:
            self.would_call[replayed.call] = self.would_call.get(replayed.call, 0) + 1
            if not replayed.call_answered:
                self.calls_not_made += 1
        difference = compare(happened, replayed)
        if not difference.any:
            return difference
        key = (happened.rule, replayed.rule, replayed.state_before)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(*key)
        group.messages += 1
        if difference.reply is not None:
            self.replies_changed += 1
            group.replies_changed += 1
            if difference.reply == "added":
                self.replies_added += 1
                group.added += 1
            elif difference.reply == "removed":
                self.replies_removed += 1
                group.removed += 1
            else:
                self.replies_different += 1
                group.changed += 1
        if difference.state:
            self.states_changed += 1
            group.states_changed += 1
        if len(group.examples) < self.max_examples:
            group.examples.append(
                Example(
                    number=f"+{nationcode} {mask_number(mobile)}",
                    at=at,
                    text=mask_phone_numbers(text),
                    old_reply=_masked(_shown(happened.replies)),
                    new_reply=_masked(_shown(replayed.replies)),
                    old_state=happened.state_after,
                    new_state=replayed.state_after,
                )
            )
        return difference

    def sorted_groups(self) -> list[Group]:
        """Most changed messages first, then by rule."""
        return sorted(
            self.groups.values(),
            key=lambda g: (-g.messages, g.old_rule or "", g.new_rule or "", g.state or ""),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat() if self.until else None,
            "signature": self.signature,
            "version": self.version,
            "messages": self.messages,
            "conversations": self.conversations,
            "replies_changed": self.replies_changed,
            "replies_added": self.replies_added,
            "replies_removed": self.replies_removed,
            "replies_different": self.replies_different,
            "states_changed": self.states_changed,
            "would_call": dict(sorted(self.would_call.items())),
            "calls_not_made": self.calls_not_made,
            "groups": [g.as_json() for g in self.sorted_groups()],
            "cut": self.cut,
        }


def _masked(text: str | None) -> str | None:
    return None if text is None else mask_phone_numbers(text)
