"""Baseline schema: the five tables of the specification and the config defaults.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOW = sa.text("CURRENT_TIMESTAMP")
TS = sa.DateTime(timezone=True)

CONFIG_DEFAULTS = [
    {"key": "encryption_key_version", "value": "1", "description": "Version de la clé Fernet"},
    {"key": "token_refresh_interval", "value": "60", "description": "Secondes avant expiration"},
    {"key": "health_check_interval", "value": "30", "description": "Secondes entre checks"},
    {"key": "max_crash_count", "value": "3", "description": "Crashes avant désactivation"},
    {"key": "log_retention_days", "value": "30", "description": "Rétention des audit logs"},
]


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("twitch_user_id", sa.Text(), nullable=False),
        sa.Column("twitch_login", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=True),
        sa.Column("is_bot", sa.Boolean(), server_default=sa.false(), nullable=True),
        sa.Column("created_at", TS, server_default=NOW, nullable=True),
        sa.Column("updated_at", TS, server_default=NOW, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("twitch_login", name=op.f("uq_users_twitch_login")),
        sa.UniqueConstraint("twitch_user_id", name=op.f("uq_users_twitch_user_id")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "oauth_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("access_token_encrypted", sa.Text(), nullable=False),
        sa.Column("refresh_token_encrypted", sa.Text(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=True),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("needs_reauth", sa.Boolean(), server_default=sa.false(), nullable=True),
        sa.Column("refresh_failures", sa.Integer(), server_default="0", nullable=True),
        sa.Column("created_at", TS, server_default=NOW, nullable=True),
        sa.Column("updated_at", TS, server_default=NOW, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_oauth_tokens_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_oauth_tokens")),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_oauth_user", "oauth_tokens", ["user_id"], unique=True)
    op.create_index("idx_oauth_expires", "oauth_tokens", ["expires_at"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("channel_id", sa.Integer(), nullable=False),
        sa.Column("bot_user_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), server_default="stopped", nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("start_time", TS, nullable=True),
        sa.Column("stop_time", TS, nullable=True),
        sa.Column("last_heartbeat", TS, nullable=True),
        sa.Column("crash_count", sa.Integer(), server_default="0", nullable=True),
        sa.Column("config_overrides", sa.Text(), nullable=True),
        sa.Column("created_at", TS, server_default=NOW, nullable=True),
        sa.Column("updated_at", TS, server_default=NOW, nullable=True),
        sa.ForeignKeyConstraint(["bot_user_id"], ["users.id"], name=op.f("fk_instances_bot_user_id_users")),
        sa.ForeignKeyConstraint(["channel_id"], ["users.id"], name=op.f("fk_instances_channel_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("channel_id", sa.Integer(), nullable=True),
        sa.Column("details", sa.Text(), nullable=True),
        sa.Column("severity", sa.Text(), server_default="info", nullable=True),
        sa.Column("timestamp", TS, server_default=NOW, nullable=True),
        sa.ForeignKeyConstraint(["channel_id"], ["users.id"], name=op.f("fk_audit_log_channel_id_users")),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_audit_log_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
        sqlite_autoincrement=True,
    )
    op.create_index("idx_audit_timestamp", "audit_log", ["timestamp"])
    op.create_index("idx_audit_event_type", "audit_log", ["event_type"])
    op.create_index("idx_audit_user", "audit_log", ["user_id"])
    config = op.create_table(
        "config",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("updated_at", TS, server_default=NOW, nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_config")),
    )
    op.bulk_insert(config, CONFIG_DEFAULTS)


def downgrade() -> None:
    op.drop_table("config")
    op.drop_table("audit_log")
    op.drop_table("instances")
    op.drop_table("oauth_tokens")
    op.drop_table("users")
