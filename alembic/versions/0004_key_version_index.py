"""Index ``idx_oauth_key_version`` on ``oauth_tokens (key_version)``.

Opening a store checks which key versions label token rows: with this index
that is one probe per version (the smallest version above the last one found),
so an open costs the same at 100 or 100,000 tokens instead of scanning them all.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("idx_oauth_key_version", "oauth_tokens", ["key_version"])


def downgrade() -> None:
    op.drop_index("idx_oauth_key_version", table_name="oauth_tokens")
