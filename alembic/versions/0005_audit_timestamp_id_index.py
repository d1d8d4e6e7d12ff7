"""``idx_audit_timestamp`` on ``audit_log (timestamp, id)`` instead of ``(timestamp)``.

A batch of ``cleanup_old_logs`` starts after the ``(timestamp, id)`` where the
last one ended: with ``id`` in the index, PostgreSQL starts the batch there
instead of reading again every event of that timestamp (many events share one
when they were written together), so each batch costs the same.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("idx_audit_timestamp", table_name="audit_log")
    op.create_index("idx_audit_timestamp", "audit_log", ["timestamp", "id"])


def downgrade() -> None:
    op.drop_index("idx_audit_timestamp", table_name="audit_log")
    op.create_index("idx_audit_timestamp", "audit_log", ["timestamp"])
