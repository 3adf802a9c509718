"""rules versions: every version that loaded (its text and check), the control row, messages.rules_version

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-12 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bot.store.models

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rule_versions",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("check", sa.JSON(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("created_at", bot.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("last_loaded_at", bot.store.models.UtcDateTime(timezone=True), nullable=False),
        sa.Column("last_loaded_by", sa.String(length=255), nullable=False),
        sa.Column("loads", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rule_versions")),
        sa.UniqueConstraint("hash", name="uq_rule_versions_hash"),
    )
    control = op.create_table(
        "rules_control",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("live_version_id", _ID, nullable=True),
        sa.Column("candidate_version_id", _ID, nullable=True),
        sa.Column("pinned_version_id", _ID, nullable=True),
        sa.Column("updated_at", bot.store.models.UtcDateTime(timezone=True), nullable=True),
        sa.Column("updated_by", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(
            ["candidate_version_id"],
            ["rule_versions.id"],
            name=op.f("fk_rules_control_candidate_version_id_rule_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["live_version_id"], ["rule_versions.id"], name=op.f("fk_rules_control_live_version_id_rule_versions")
        ),
        sa.ForeignKeyConstraint(
            ["pinned_version_id"],
            ["rule_versions.id"],
            name=op.f("fk_rules_control_pinned_version_id_rule_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules_control")),
    )
    op.bulk_insert(control, [{"id": 1}])
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rules_version", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("rules_version")
    op.drop_table("rules_control")
    op.drop_table("rule_versions")
