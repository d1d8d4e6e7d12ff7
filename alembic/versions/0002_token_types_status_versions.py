"""Schema v2: token types and status, row versions, refresh leases, per-row key version.

``oauth_tokens`` gains ``token_type`` (``bot`` | ``broadcaster``), ``status``
(``valid`` | ``expired`` | ``revoked``, consistent with ``needs_reauth``),
``last_refresh``, ``last_validated``, ``version`` (compare-and-set writes),
``refresh_lease_owner`` / ``refresh_lease_expires_at`` (one refresher at a
time) and ``key_version`` (the key that encrypted the row). One row per user
becomes one row per (user, token type).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
NEW_COLUMNS = (
    "token_type", "status", "last_refresh", "last_validated", "version",
    "refresh_lease_owner", "refresh_lease_expires_at", "key_version",
)


def upgrade() -> None:
    with op.batch_alter_table("oauth_tokens") as batch:
        batch.add_column(sa.Column("token_type", sa.Text(), server_default="bot", nullable=False))
        batch.add_column(sa.Column("status", sa.Text(), server_default="valid", nullable=False))
        batch.add_column(sa.Column("last_refresh", TS, nullable=True))
        batch.add_column(sa.Column("last_validated", TS, nullable=True))
        batch.add_column(sa.Column("version", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("refresh_lease_owner", sa.Text(), nullable=True))
        batch.add_column(sa.Column("refresh_lease_expires_at", TS, nullable=True))
        batch.add_column(sa.Column("key_version", sa.Integer(), server_default="1", nullable=False))
    op.execute(sa.text("UPDATE oauth_tokens SET status = 'expired' WHERE needs_reauth = :yes").bindparams(yes=True))
    op.drop_index("idx_oauth_user", table_name="oauth_tokens")
    op.create_index("idx_oauth_user", "oauth_tokens", ["user_id"])
    op.create_index("uq_oauth_tokens_user_id_token_type", "oauth_tokens", ["user_id", "token_type"], unique=True)


def downgrade() -> None:
    bind = op.get_bind()
    shared = bind.execute(
        sa.text("SELECT user_id FROM oauth_tokens GROUP BY user_id HAVING count(*) > 1 ORDER BY user_id")
    ).scalars().all()
    if shared:
        raise CommandError(
            f"cannot downgrade below 0002: users {', '.join(map(str, shared))} hold both bot and broadcaster "
            "tokens, which the baseline schema cannot store; delete one token type per user first"
        )
    broadcasters = bind.execute(
        sa.text("SELECT user_id FROM oauth_tokens WHERE token_type <> 'bot' ORDER BY user_id")
    ).scalars().all()
    if broadcasters:
        raise CommandError(
            f"cannot downgrade below 0002: users {', '.join(map(str, broadcasters))} hold broadcaster tokens, "
            "which the baseline schema would mistake for bot tokens; delete them first"
        )
    op.drop_index("uq_oauth_tokens_user_id_token_type", table_name="oauth_tokens")
    op.drop_index("idx_oauth_user", table_name="oauth_tokens")
    op.create_index("idx_oauth_user", "oauth_tokens", ["user_id"], unique=True)
    with op.batch_alter_table("oauth_tokens") as batch:
        for name in reversed(NEW_COLUMNS):
            batch.drop_column(name)
