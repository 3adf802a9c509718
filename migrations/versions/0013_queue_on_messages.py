"""the outbox is the queued messages rows: queue columns and partial indexes on messages, no outbox table

A reply used to be a messages row and an outbox row (inserted, leased, deleted);
now the outbound row is the queue itself (status 'queued', with next_attempt_at,
send_by, attempts, queued_at, lease_until, leased_by and two partial indexes
WHERE status = 'queued'). The outbox's rows move onto their messages rows, and
the table is dropped (an empty table left behind would invite code to write to
it again); downgrade makes it again from the queued rows.

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bot.store.models

revision: str = "0013"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_QUEUED = "status = 'queued'"
_LEASED = "status = 'queued' AND lease_until IS NOT NULL"
_QUEUE_COLUMNS = ("next_attempt_at", "send_by", "attempts", "queued_at", "lease_until", "leased_by")


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("next_attempt_at", bot.store.models.UtcDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("send_by", bot.store.models.UtcDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("queued_at", bot.store.models.UtcDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_until", bot.store.models.UtcDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("leased_by", sa.String(length=64), nullable=True))
    # Every outbox row onto its message (correlated subqueries: the same SQL on SQLite and PostgreSQL).
    # A row whose message is no longer 'queued' was a send in flight that a delivery report settled
    # first: its columns are kept (the lease tells recover_expired_leases it was the one in flight).
    op.execute(
        "UPDATE messages SET "
        + ", ".join(
            f"{name} = (SELECT o.{source} FROM outbox o WHERE o.message_id = messages.id)"
            for name, source in (
                ("next_attempt_at", "next_attempt_at"),
                ("send_by", "send_by"),
                ("attempts", "attempts"),
                ("queued_at", "created_at"),
                ("lease_until", "lease_until"),
                ("leased_by", "leased_by"),
            )
        )
        + " WHERE id IN (SELECT message_id FROM outbox)"
    )
    # A queued reply without an outbox row was never going to be sent: it is now due, with its deadline
    # at its creation, so the first claim records it as expired instead of sending it late.
    op.execute(
        "UPDATE messages SET next_attempt_at = created_at, send_by = created_at, attempts = 0,"
        " queued_at = created_at WHERE status = 'queued' AND direction = 'out' AND next_attempt_at IS NULL"
    )
    with op.batch_alter_table("messages") as batch:
        batch.create_index(
            "ix_messages_queued",
            ["next_attempt_at", "id"],
            unique=False,
            sqlite_where=sa.text(_QUEUED),
            postgresql_where=sa.text(_QUEUED),
        )
        batch.create_index(
            "ix_messages_queued_lease_until",
            ["lease_until"],
            unique=False,
            sqlite_where=sa.text(_LEASED),
            postgresql_where=sa.text(_LEASED),
        )
    op.drop_table("outbox")


def downgrade() -> None:
    # The queue back into an outbox: every queued reply, and a send in flight that a report settled first
    # (still leased), as the old code kept it until its send was recorded. Read before messages loses the
    # columns (on SQLite that rebuilds the table, which an outbox referring to it would block).
    bind = op.get_bind()
    waiting = [
        dict(row)
        for row in bind.execute(
            sa.text(
                "SELECT id AS message_id, coalesce(attempts, 0) AS attempts,"
                " coalesce(next_attempt_at, created_at) AS next_attempt_at, lease_until, leased_by,"
                " coalesce(queued_at, created_at) AS created_at, send_by FROM messages"
                " WHERE direction = 'out' AND (status = 'queued' OR lease_until IS NOT NULL) ORDER BY id"
            )
        ).mappings()
    ]
    with op.batch_alter_table("messages") as batch:
        batch.drop_index(
            "ix_messages_queued_lease_until", sqlite_where=sa.text(_LEASED), postgresql_where=sa.text(_LEASED)
        )
        batch.drop_index("ix_messages_queued", sqlite_where=sa.text(_QUEUED), postgresql_where=sa.text(_QUEUED))
        for name in reversed(_QUEUE_COLUMNS):
            batch.drop_column(name)
    op.create_table(
        "outbox",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("message_id", _ID, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", bot.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("lease_until", bot.store.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("leased_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", bot.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("send_by", bot.store.models.UtcDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], name=op.f("fk_outbox_message_id_messages")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("message_id", name=op.f("uq_outbox_message_id")),
    )
    with op.batch_alter_table("outbox") as batch:
        batch.create_index("ix_outbox_next_attempt_at", ["next_attempt_at"], unique=False)
        batch.create_index(
            "ix_outbox_lease_until",
            ["lease_until"],
            unique=False,
            sqlite_where=sa.text("lease_until IS NOT NULL"),
            postgresql_where=sa.text("lease_until IS NOT NULL"),
        )
    if waiting:  # untyped columns: the values go back exactly as they were read (SQLite: its text form)
        untyped = sa.table("outbox", *(sa.column(name) for name in waiting[0]))
        bind.execute(sa.insert(untyped), waiting)
