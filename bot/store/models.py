"""The database schema: contacts, conversations, messages, outbox, opt-out events, API keys, webhooks, events.

Declared as typed SQLAlchemy 2 models so Alembic can compare them with the
migrations; the hot path uses the same ``Table`` objects through Core
statements to avoid per-row ORM object churn. Every constraint and index has
a name (``NAMING``) so migrations are stable on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = BigInteger().with_variant(Integer(), "sqlite")
"""64-bit ids on PostgreSQL; INTEGER on SQLite, where only that is an alias of the rowid."""


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database.

    SQLite has no time zone type and hands back naive values; we store UTC and
    always return aware UTC, so comparisons never mix naive and aware times.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[str]: JSON, datetime: UtcDateTime()}


class Contact(Base):
    """A phone number that wrote to us."""

    __tablename__ = "contacts"
    __table_args__ = (UniqueConstraint("nationcode", "mobile", name="uq_contacts_number"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    nationcode: Mapped[str] = mapped_column(String(8))
    mobile: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime]


class Conversation(Base):
    """One contact under one signature: state, variables, expiry and opt-out status."""

    __tablename__ = "conversations"
    __table_args__ = (
        UniqueConstraint("signature", "contact_id", name="uq_conversations_signature_contact"),
        Index("ix_conversations_updated_at", "updated_at"),
        Index("ix_conversations_contact_id", "contact_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    signature: Mapped[str] = mapped_column(String(128))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"))
    state: Mapped[str | None] = mapped_column(String(128))
    variables: Mapped[dict[str, Any]] = mapped_column(default=dict)
    expires_at: Mapped[datetime | None]
    opted_out: Mapped[bool] = mapped_column(Boolean, default=False)
    opted_out_at: Mapped[datetime | None]
    opt_out_message_id: Mapped[int | None] = mapped_column(Id)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Message(Base):
    """Every message in and out, with why the bot did what it did."""

    __tablename__ = "messages"
    # Every index costs each callback a b-tree insert, so the ones that only matter for a
    # few rows are partial: dedupe keys exist only on inbound rows, serial numbers only
    # once Tencent accepted a send, and ops look for failures, not for successes.
    __table_args__ = (
        Index("ix_messages_conversation_id_created_at", "conversation_id", "created_at"),
        Index("ix_messages_created_at", "created_at"),
        Index(
            "uq_messages_dedupe_key",
            "dedupe_key",
            unique=True,
            sqlite_where=text("dedupe_key IS NOT NULL"),
            postgresql_where=text("dedupe_key IS NOT NULL"),
        ),
        Index(
            "ix_messages_provider_serial",
            "provider_serial",
            sqlite_where=text("provider_serial IS NOT NULL"),
            postgresql_where=text("provider_serial IS NOT NULL"),
        ),
        Index(
            "ix_messages_failed_created_at",
            "created_at",
            sqlite_where=text("status = 'failed'"),
            postgresql_where=text("status = 'failed'"),
        ),
        Index(
            "ix_messages_contact_id_sent_at",
            "contact_id",
            "sent_at",
            sqlite_where=text("sent_at IS NOT NULL"),
            postgresql_where=text("sent_at IS NOT NULL"),
        ),
        # The ambiguous-send check (bot/delivery/reconcile.py) looks for these every few minutes;
        # they are a handful among millions of rows.
        Index(
            "ix_messages_ambiguous_sent_at",
            "sent_at",
            sqlite_where=text("status = 'ambiguous'"),
            postgresql_where=text("status = 'ambiguous'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    direction: Mapped[str] = mapped_column(String(3))  # "in" | "out"
    dedupe_key: Mapped[str | None] = mapped_column(String(32))
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id"))
    contact_id: Mapped[int] = mapped_column(ForeignKey("contacts.id"))
    signature: Mapped[str] = mapped_column(String(128))
    text: Mapped[str] = mapped_column(Text)
    normalized_text: Mapped[str | None] = mapped_column(Text)
    provider_time: Mapped[datetime | None]
    """For inbound: when Tencent says the customer sent it."""
    in_reply_to_id: Mapped[int | None] = mapped_column(Id)
    rule: Mapped[str | None] = mapped_column(String(255))
    rule_kind: Mapped[str | None] = mapped_column(String(32))
    unmatched: Mapped[bool] = mapped_column(Boolean, default=False)
    state_before: Mapped[str | None] = mapped_column(String(128))
    state_after: Mapped[str | None] = mapped_column(String(128))
    template_name: Mapped[str | None] = mapped_column(String(128))
    template_id: Mapped[str | None] = mapped_column(String(32))
    params: Mapped[list[str] | None]
    segments: Mapped[int | None]
    status: Mapped[str] = mapped_column(String(16))
    """in: received | ignored; out: queued | sent | delivered | failed | ambiguous | expired | suppressed |
    looping | error."""
    status_reason: Mapped[str | None] = mapped_column(Text)
    provider_serial: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    marketing: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """For outbound: sent with a marketing template, so only 08:00-22:00 China time."""
    delivered_at: Mapped[datetime | None]
    """For outbound: when the handset received it, from Tencent's delivery report."""
    sent_at: Mapped[datetime | None]
    """For outbound: when Tencent accepted it (or may have: ambiguous), for the per-number frequency limits."""
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    sender_id: Mapped[str | None] = mapped_column(String(32))
    """For outbound to a number outside the Chinese mainland: Tencent's SenderId (the rule file's)."""
    checks: Mapped[int | None] = mapped_column(Integer)
    """For an ambiguous send: how often Tencent was asked about it (PullSmsSendStatusByPhoneNumber)."""
    checked_at: Mapped[datetime | None]
    extend_code: Mapped[str | None] = mapped_column(String(16))
    """Tencent's extend code: for inbound, the one the customer's reply came back on; for outbound, the
    ``ExtendCode`` it is sent with (a reply keeps its message's, a started conversation the rule file's)."""
    started_by: Mapped[str | None] = mapped_column(String(128))
    """For an outbound message that started a conversation: ``api:<key name>`` or ``cli``."""


class Outbox(Base):
    """Replies waiting to be sent; a row leaves when the send is settled."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_next_attempt_at", "next_attempt_at"),
        # Leases exist only while a send is in flight at some worker: a claim looks for them by time.
        Index(
            "ix_outbox_lease_until",
            "lease_until",
            sqlite_where=text("lease_until IS NOT NULL"),
            postgresql_where=text("lease_until IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    leased_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    send_by: Mapped[datetime | None]
    """The reply's deadline (``reply_max_delay``): held past it, it expires instead of going out late."""


class OptOutEvent(Base):
    """Audit trail of every opt-out and opt-in, with the words that caused it."""

    __tablename__ = "opt_out_events"
    __table_args__ = (Index("ix_opt_out_events_conversation_id", "conversation_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"))
    event: Mapped[str] = mapped_column(String(16))  # "opt_out" | "opt_in"
    source: Mapped[str] = mapped_column(String(16))  # "keyword" | "console" (an admin) | "provider" (a blacklist)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    raw_text: Mapped[str | None] = mapped_column(Text)
    normalized_text: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[str | None] = mapped_column(String(255))
    actor: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime]


class PendingReport(Base):
    """A delivery report for a serial we do not know yet, kept for when that send's outcome is recorded.

    A report can overtake the send's own answer (the send is recorded after
    Tencent answered, in another transaction); dropped as unknown, the reply
    would stay ``sent`` forever. Old rows are pruned.
    """

    __tablename__ = "pending_reports"
    __table_args__ = (UniqueConstraint("sid", name="uq_pending_reports_sid"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    sid: Mapped[str] = mapped_column(String(64))
    report: Mapped[dict[str, Any]]
    received_at: Mapped[datetime]


class AccountLimit(Base):
    """An account-wide daily cap Tencent reported (``LimitExceeded.AppDailyLimit`` ...): nothing goes out until it ends.

    ``nationcode`` is ``""`` for a cap on every number, or the country a
    per-country cap (``AppCountryOrRegionDailyLimit``) applies to.
    """

    __tablename__ = "account_limits"
    __table_args__ = (UniqueConstraint("code", "nationcode", name="uq_account_limits_code"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(128))
    nationcode: Mapped[str] = mapped_column(String(8))
    message: Mapped[str | None] = mapped_column(Text)
    until: Mapped[datetime]
    created_at: Mapped[datetime]


class User(Base):
    """A person who may sign in to the ops console (``smsbot users``).

    Audit records name users by ``name`` as text, never by foreign key, so
    removing a user keeps the history of what they did readable.
    """

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("name", name="uq_users_name"),
        CheckConstraint("role IN ('viewer', 'admin')", name="role"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))  # "viewer" | "admin"
    password_hash: Mapped[str] = mapped_column(String(255))
    """argon2id, in the PHC string format (parameters included, so they can be raised later)."""
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    """Failed logins from every address together since the last success or account lockout: the
    ceiling against a guesser spread over many addresses (``console_max_failed_logins_account``)."""
    locked_until: Mapped[datetime | None]
    """When the whole account is locked (every address); per-address locks are in ``login_failures``."""
    created_at: Mapped[datetime]
    last_login_at: Mapped[datetime | None]


class LoginFailure(Base):
    """Failed logins on one account from one client address, and that address's lock.

    Counted per address so a stranger who knows a name can lock out only
    themselves, not the account's owner. Rows exist only for real users (an
    invented name stores nothing) and are pruned once stale, so the table stays
    small.
    """

    __tablename__ = "login_failures"
    __table_args__ = (UniqueConstraint("user_id", "source", name="uq_login_failures_user_source"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(64))
    """The client address as the server saw it (after trusted proxies' forwarded headers), or ``unknown``."""
    failures: Mapped[int] = mapped_column(Integer)
    """Failed logins in a row from this address since its last success or lock."""
    locked_until: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    """The last failure from this address."""


class AuditEvent(Base):
    """Who changed what, when: user management, logins and every change made from the console."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    actor: Mapped[str] = mapped_column(String(128))
    """The console user's name, or ``cli`` for the ``smsbot`` command."""
    action: Mapped[str] = mapped_column(String(64))
    """e.g. ``user.add``, ``login.failed``, ``opt_out.add``."""
    target: Mapped[str | None] = mapped_column(String(255))
    detail: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]


class ApiKey(Base):
    """A key for ``/api/v1`` (``smsbot apikeys``): only a hash of the secret is stored, it is shown once."""

    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("name", name="uq_api_keys_name"),
        UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    key_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 of the key, hex: the key is 32 random bytes, so a fast hash is enough (no guessing)."""
    prefix: Mapped[str] = mapped_column(String(16))
    """The key's first characters, to tell keys apart in ``list`` without storing them."""
    scopes: Mapped[list[str]]
    """Any of ``start``, ``read``, ``vars``."""
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class ApiIdempotency(Base):
    """The first answer to an ``idempotency_key``, replayed for 24 hours to the same API key."""

    __tablename__ = "api_idempotency"
    __table_args__ = (
        UniqueConstraint("api_key_id", "idempotency_key", name="uq_api_idempotency_key"),
        Index("ix_api_idempotency_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    api_key_id: Mapped[int] = mapped_column(Id)
    idempotency_key: Mapped[str] = mapped_column(String(255))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class WebhookCall(Base):
    """A rule's ``call:``: queued with the inbound message that fired it, made after that commit, its answer kept.

    The row is the durable queue of calls (``status = 'pending'``) and, once
    finished, the record the thread shows: what was asked, what came back.
    """

    __tablename__ = "webhook_calls"
    __table_args__ = (
        Index("ix_webhook_calls_conversation_id", "conversation_id"),
        Index("ix_webhook_calls_created_at", "created_at"),
        Index(
            "ix_webhook_calls_pending",
            "next_attempt_at",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"))
    message_id: Mapped[int] = mapped_column(Id)
    """The inbound message whose rule made the call."""
    webhook: Mapped[str] = mapped_column(String(128))
    rule: Mapped[str] = mapped_column(String(255))
    """``file:line`` of the rule, to continue with its remaining actions."""
    rules_version: Mapped[str | None] = mapped_column(String(64))
    save_as: Mapped[str | None] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(8))
    url: Mapped[str] = mapped_column(Text)
    request: Mapped[dict[str, Any] | None]
    """The rendered body (POST) or query (GET), and the rule's captures to continue with."""
    status: Mapped[str] = mapped_column(String(16))
    """pending | ok | failed | timeout"""
    http_status: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None]
    """``{"json": ...}`` as saved (at most 64 KiB of JSON)."""
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class Event(Base):
    """One event for one endpoint (``opted_out``, ``state_entered`` ...): a durable queue of signed POSTs.

    Written in the transaction that caused it, so an event exists exactly when
    what it reports was committed; sent in id order per (endpoint,
    conversation), retried with backoff for 24 hours.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_conversation_id", "conversation_id"),
        Index("ix_events_created_at", "created_at"),
        Index(
            "ix_events_pending",
            "endpoint",
            "next_attempt_at",
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_events_failed",
            "endpoint",
            sqlite_where=text("status = 'failed'"),
            postgresql_where=text("status = 'failed'"),
        ),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    """opted_out | opted_in | state_entered | reply_failed | unmatched"""
    conversation_id: Mapped[int | None] = mapped_column(Id)
    message_id: Mapped[int | None] = mapped_column(Id)
    body: Mapped[str] = mapped_column(Text)
    """The JSON body exactly as signed and sent."""
    status: Mapped[str] = mapped_column(String(16))
    """pending | delivered | failed (gave up after 24 hours)"""
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime]
    lease_until: Mapped[datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]


contacts = cast(Table, Contact.__table__)
conversations = cast(Table, Conversation.__table__)
messages = cast(Table, Message.__table__)
outbox = cast(Table, Outbox.__table__)
opt_out_events = cast(Table, OptOutEvent.__table__)
users = cast(Table, User.__table__)
login_failures = cast(Table, LoginFailure.__table__)
audit_events = cast(Table, AuditEvent.__table__)
pending_reports = cast(Table, PendingReport.__table__)
account_limits = cast(Table, AccountLimit.__table__)
api_keys = cast(Table, ApiKey.__table__)
api_idempotency = cast(Table, ApiIdempotency.__table__)
webhook_calls = cast(Table, WebhookCall.__table__)
events = cast(Table, Event.__table__)
