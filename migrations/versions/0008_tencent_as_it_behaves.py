"""Tencent as it really behaves: reply deadlines, SenderId, ambiguous checks, early reports, account caps

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bot.store.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("sender_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("checks", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("checked_at", bot.store.models.UtcDateTime(timezone=True), nullable=True))
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("send_by", bot.store.models.UtcDateTime(timezone=True), nullable=True))
    op.create_table(
        "pending_reports",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("sid", sa.String(length=64), nullable=False),
        sa.Column("report", sa.JSON(), nullable=False),
        sa.Column("received_at", bot.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pending_reports")),
        sa.UniqueConstraint("sid", name="uq_pending_reports_sid"),
    )
    op.create_table(
        "account_limits",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("code", sa.String(length=128), nullable=False),
        sa.Column("nationcode", sa.String(length=8), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("until", bot.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created_at", bot.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_account_limits")),
        sa.UniqueConstraint("code", "nationcode", name="uq_account_limits_code"),
    )


def downgrade() -> None:
    op.drop_table("account_limits")
    op.drop_table("pending_reports")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("send_by")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("checked_at")
        batch.drop_column("checks")
        batch.drop_column("sender_id")
