"""The five tables of the specification, as SQLAlchemy Core :class:`~sqlalchemy.Table` objects.

Table, column and index names are the specification's. Every other constraint
is named by :data:`NAMING_CONVENTION` so names are the same on SQLite and
PostgreSQL and migrations can refer to them. Alembic compares its migrations
with :data:`metadata`.

The repositories, the manager and the CLI use these tables only, so they never
import the ORM; :mod:`kissbot.models` maps its declarative classes onto them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Column, ForeignKey, Index, Integer, MetaData, Table, Text, false, func

from kissbot.types import EncryptedString, UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)
"""The metadata of kissbot's tables (shared by :class:`kissbot.models.Base`)."""


def _created_at() -> Column[datetime]:
    return Column("created_at", UTCDateTime, default=utcnow, server_default=func.current_timestamp())


def _updated_at() -> Column[datetime]:
    return Column(
        "updated_at", UTCDateTime, default=utcnow, onupdate=utcnow, server_default=func.current_timestamp()
    )


users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("twitch_user_id", Text, nullable=False, unique=True),
    Column("twitch_login", Text, nullable=False, unique=True),
    Column("display_name", Text),
    Column("is_bot", Boolean, default=False, server_default=false()),
    _created_at(),
    _updated_at(),
    sqlite_autoincrement=True,
)
"""A Twitch account: a bot or a channel. Logins are stored lowercase."""

oauth_tokens = Table(
    "oauth_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("access_token_encrypted", EncryptedString, nullable=False),
    Column("refresh_token_encrypted", EncryptedString, nullable=False),
    Column("scopes", Text),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("needs_reauth", Boolean, default=False, server_default=false()),
    Column("refresh_failures", Integer, default=0, server_default="0"),
    _created_at(),
    _updated_at(),
    Column("token_type", Text, nullable=False, default="bot", server_default="bot"),
    Column("status", Text, nullable=False, default="valid", server_default="valid"),
    Column("last_refresh", UTCDateTime),
    Column("last_validated", UTCDateTime),
    Column("version", Integer, nullable=False, default=1, server_default="1"),
    Column("refresh_lease_owner", Text),
    Column("refresh_lease_expires_at", UTCDateTime),
    Column("key_version", Integer, nullable=False, default=1, server_default="1"),
    Index("idx_oauth_user", "user_id"),
    Index("idx_oauth_expires", "expires_at"),
    Index("idx_oauth_state", "token_type", "needs_reauth", "key_version", "refresh_failures"),
    Index("uq_oauth_tokens_user_id_token_type", "user_id", "token_type", unique=True),
    sqlite_autoincrement=True,
)
"""A user's OAuth tokens of one type (``bot`` or ``broadcaster``), both encrypted at rest.

``status`` is ``valid``, ``expired`` or ``revoked``; ``needs_reauth`` is
true exactly when it is not ``valid``. ``version`` grows by one on every
write of the tokens (compare-and-set); the refresh lease lets one process
refresh the row at a time; ``key_version`` names the key that encrypted it.
"""

instances = Table(
    "instances",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("channel_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("bot_user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("status", Text, nullable=False, default="stopped", server_default="stopped"),
    Column("pid", Integer),
    Column("start_time", UTCDateTime),
    Column("stop_time", UTCDateTime),
    Column("last_heartbeat", UTCDateTime),
    Column("crash_count", Integer, default=0, server_default="0"),
    Column("config_overrides", Text),
    _created_at(),
    _updated_at(),
    sqlite_autoincrement=True,
)
"""A bot process serving one channel."""

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("event_type", Text, nullable=False),
    Column("user_id", Integer, ForeignKey("users.id")),
    Column("channel_id", Integer, ForeignKey("users.id")),
    Column("details", Text),
    Column("severity", Text, default="info", server_default="info"),
    Column("timestamp", UTCDateTime, default=utcnow, server_default=func.current_timestamp()),
    Index("idx_audit_timestamp", "timestamp"),
    Index("idx_audit_event_type", "event_type"),
    Index("idx_audit_user", "user_id"),
    sqlite_autoincrement=True,
)
"""One audit event. ``details`` is JSON and never holds a secret."""

config = Table(
    "config",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
    Column("description", Text),
    _updated_at(),
)
"""A system setting (key/value)."""
