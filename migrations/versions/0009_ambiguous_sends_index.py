"""an index on the ambiguous sends, for the check that settles them with PullSmsSendStatusByPhoneNumber

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index(
            "ix_messages_ambiguous_sent_at",
            ["sent_at"],
            unique=False,
            sqlite_where=sa.text("status = 'ambiguous'"),
            postgresql_where=sa.text("status = 'ambiguous'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_messages_ambiguous_sent_at",
            sqlite_where=sa.text("status = 'ambiguous'"),
            postgresql_where=sa.text("status = 'ambiguous'"),
        )
