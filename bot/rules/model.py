"""The engine's inputs and outputs, and the compiled form of rule files.

Everything here is an immutable value: the engine takes these in and hands
new ones back, and the edges (the database, HTTP, Tencent) turn them into
rows and requests.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property, lru_cache
from types import MappingProxyType
from typing import Literal

from bot.rules.matching import RuleIndex
from bot.rules.normalize import normalize
from bot.rules.schema import RuleTest
from bot.rules.sms_length import Encoding
from bot.rules.templating import Expression

RuleKind = Literal["opt_out", "opt_in", "help", "on", "anywhere", "state_otherwise", "otherwise"]
OptChange = Literal["opt_out", "opt_in"]


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Conversation:
    """What we remember about one number under one signature."""

    state: str | None = None
    """None for a conversation that has not started."""
    vars: Mapping[str, str] = field(default_factory=dict)
    expires_at: datetime | None = None
    opted_out: bool = False


@dataclass(frozen=True)
class InboundMessage:
    """A customer's reply as Tencent reports it."""

    text: str
    sign: str
    nationcode: str = "86"
    mobile: str = ""


# ---------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Reply:
    """One SMS to send: a Tencent template and its parameters, plus what the customer will see."""

    template: str
    template_id: str
    params: tuple[str, ...]
    text: str
    """The template text with {n} filled in."""
    length: int
    """Length as billed (signature included for Chinese-mainland numbers)."""
    segments: int
    encoding: Encoding
    marketing: bool = False
    refused: str | None = None
    """Why this reply cannot be sent at all (say, no international template for this number): recorded as failed."""
    sender_id: str | None = None
    """Tencent's SenderId for a number outside the Chinese mainland (the rule file's ``sender_id``)."""


@dataclass(frozen=True)
class Decision:
    """Everything the engine wants done about one message."""

    rule: str | None
    """``file:line`` of the rule that fired, or None."""
    rule_kind: RuleKind | None
    state_before: str | None
    state: str | None
    vars: Mapping[str, str]
    expires_at: datetime | None
    replies: tuple[Reply, ...]
    opted_out: bool
    opt_change: OptChange | None
    unmatched: bool
    """True when only an ``otherwise`` (or nothing) answered: a keyword to consider adding."""
    expired: bool
    """The previous state had expired before this message was matched."""
    normalized_text: str
    rules_file: str | None
    """The rule file that answered this signature, or None when no file does."""
    errors: tuple[str, ...] = ()
    """Rendering problems; the reply they affected is not sent."""
    reply_max_delay: timedelta | None = None
    """The answering file's ``reply_max_delay`` (None: the setting's)."""

    def conversation(self) -> Conversation:
        """The conversation as it stands after this decision."""
        return Conversation(state=self.state, vars=self.vars, expires_at=self.expires_at, opted_out=self.opted_out)


# ---------------------------------------------------------------- compiled rules


@dataclass(frozen=True)
class CompiledTemplate:
    name: str
    id: str
    text: str
    placeholders: int
    marketing: bool
    intl_id: str | None = None
    """The international twin's id, for numbers outside the Chinese mainland."""


@dataclass(frozen=True)
class CompiledAction:
    """A rule's action with its templates compiled."""

    ref: str
    kind: RuleKind
    reply: CompiledTemplate | None
    params: tuple[Expression, ...]
    sets: tuple[tuple[str, Expression], ...]
    goto: str | None

    @cached_property
    def needs_context(self) -> bool:
        """Whether any template of this action reads the render context (most replies are literal)."""
        return bool(self.sets) or any(not p.is_literal for p in self.params)


@dataclass(frozen=True)
class CompiledSection:
    """Rules tried together: their index and their actions, in file order."""

    index: RuleIndex
    actions: tuple[CompiledAction, ...]


@dataclass(frozen=True)
class CompiledState:
    name: str
    expires: timedelta | None
    rules: CompiledSection
    otherwise: CompiledAction | None


@dataclass(frozen=True)
class CompiledFile:
    """One rule file ready for ``decide``."""

    path: str
    """Where it was loaded from, as given to the loader."""
    name: str
    """The name used in rule references: the path relative to the rules folder."""
    signature: str
    version: str
    start: str
    states: Mapping[str, CompiledState]
    opt_out: CompiledSection | None
    opt_in: CompiledSection | None
    help: CompiledSection | None
    anywhere: CompiledSection
    otherwise: CompiledAction | None
    templates: Mapping[str, CompiledTemplate]
    tests: tuple[RuleTest, ...]
    test_lines: tuple[int, ...]
    sender_id: str | None = None
    reply_max_delay: timedelta | None = None
    """This file's override of the ``reply_max_delay`` setting."""


@lru_cache(maxsize=1024)
def signature_key(signature: str) -> str:
    """How signatures are compared: normalised, and without the 【】 Tencent prints around them."""
    text = signature.strip()
    if text.startswith("【") and text.endswith("】"):
        text = text[1:-1]
    return normalize(text)


@dataclass(frozen=True)
class Ruleset:
    """All loaded rule files, by signature."""

    files: tuple[CompiledFile, ...] = ()
    by_signature: Mapping[str, CompiledFile] = field(default_factory=dict)
    default: CompiledFile | None = None
    version: str = ""

    @classmethod
    def of(cls, files: tuple[CompiledFile, ...]) -> Ruleset:
        by_signature = {signature_key(f.signature): f for f in files if f.signature != "*"}
        default = next((f for f in files if f.signature == "*"), None)
        digest = hashlib.sha256()
        for f in sorted(files, key=lambda f: f.name):
            digest.update(f.name.encode() + b"\0" + f.version.encode() + b"\0")
        return cls(files, MappingProxyType(by_signature), default, digest.hexdigest()[:12])

    def for_signature(self, sign: str) -> CompiledFile | None:
        """The file answering ``sign``: its own file, else the default (``signature: "*"``)."""
        return self.by_signature.get(signature_key(sign), self.default)
