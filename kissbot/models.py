"""The five tables of the specification, as declarative ORM classes: the one description of kissbot's schema.

Table, column and index names are the specification's. Every other constraint
is named by :data:`NAMING_CONVENTION` so names are the same on SQLite and
PostgreSQL and migrations can refer to them. Alembic compares its migrations
with :data:`metadata`; the repositories build their Core statements on the
classes' tables, also importable here as ``users``, ``oauth_tokens``,
``instances``, ``audit_log`` and ``config``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, MetaData, Table, Text, false, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kissbot.types import EncryptedString, UTCDateTime, utcnow

__all__ = [
    "NAMING_CONVENTION", "metadata", "Base", "User", "OAuthToken", "Instance", "AuditLog", "Config",
    "users", "oauth_tokens", "instances", "audit_log", "config",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of kissbot's tables: text columns are ``TEXT``, times are aware UTC."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {str: Text(), datetime: UTCDateTime()}


metadata = Base.metadata
"""The metadata of kissbot's tables (with :data:`NAMING_CONVENTION`)."""


def _created_at() -> Mapped[datetime | None]:
    return mapped_column(default=utcnow, server_default=func.current_timestamp())


def _updated_at() -> Mapped[datetime | None]:
    return mapped_column(default=utcnow, onupdate=utcnow, server_default=func.current_timestamp())


class User(Base):
    """A Twitch account: a bot or a channel. Logins are stored lowercase."""

    __tablename__ = "users"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    twitch_user_id: Mapped[str] = mapped_column(unique=True)
    twitch_login: Mapped[str] = mapped_column(unique=True)
    display_name: Mapped[str | None]
    is_bot: Mapped[bool | None] = mapped_column(default=False, server_default=false())
    created_at: Mapped[datetime | None] = _created_at()
    updated_at: Mapped[datetime | None] = _updated_at()

    def __repr__(self) -> str:
        return f"<User id={self.id} login={self.twitch_login!r}>"


class OAuthToken(Base):
    """A user's OAuth tokens of one type (``bot`` or ``broadcaster``), both encrypted at rest.

    ``status`` is ``valid``, ``expired`` or ``revoked``; ``needs_reauth`` is
    true exactly when it is not ``valid``. ``version`` grows by one on every
    write of the tokens (compare-and-set); the refresh lease lets one process
    refresh the row at a time; ``key_version`` names the key that encrypted it.
    """

    __tablename__ = "oauth_tokens"
    __table_args__ = (
        Index("idx_oauth_user", "user_id"),
        Index("idx_oauth_expires", "expires_at"),
        Index("idx_oauth_state", "token_type", "needs_reauth", "key_version", "refresh_failures"),
        Index("idx_oauth_key_version", "key_version"),
        Index("uq_oauth_tokens_user_id_token_type", "user_id", "token_type", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    access_token_encrypted: Mapped[str] = mapped_column(EncryptedString)
    refresh_token_encrypted: Mapped[str] = mapped_column(EncryptedString)
    scopes: Mapped[str | None]
    expires_at: Mapped[datetime]
    needs_reauth: Mapped[bool | None] = mapped_column(default=False, server_default=false())
    refresh_failures: Mapped[int | None] = mapped_column(default=0, server_default="0")
    created_at: Mapped[datetime | None] = _created_at()
    updated_at: Mapped[datetime | None] = _updated_at()
    token_type: Mapped[str] = mapped_column(default="bot", server_default="bot")
    status: Mapped[str] = mapped_column(default="valid", server_default="valid")
    last_refresh: Mapped[datetime | None]
    last_validated: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(default=1, server_default="1")
    refresh_lease_owner: Mapped[str | None]
    refresh_lease_expires_at: Mapped[datetime | None]
    key_version: Mapped[int] = mapped_column(default=1, server_default="1")

    def __repr__(self) -> str:
        return f"<OAuthToken user_id={self.user_id} type={self.token_type} expires_at={self.expires_at}>"


class Instance(Base):
    """A bot process serving one channel."""

    __tablename__ = "instances"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    bot_user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(default="stopped", server_default="stopped")
    pid: Mapped[int | None]
    start_time: Mapped[datetime | None]
    stop_time: Mapped[datetime | None]
    last_heartbeat: Mapped[datetime | None]
    crash_count: Mapped[int | None] = mapped_column(default=0, server_default="0")
    config_overrides: Mapped[str | None]
    created_at: Mapped[datetime | None] = _created_at()
    updated_at: Mapped[datetime | None] = _updated_at()

    def __repr__(self) -> str:
        return f"<Instance id={self.id} status={self.status!r} pid={self.pid}>"


class AuditLog(Base):
    """One audit event. ``details`` is JSON and never holds a secret."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("idx_audit_timestamp", "timestamp", "id"),  # 0005: a cleanup batch starts after a (timestamp, id)
        Index("idx_audit_event_type", "event_type"),
        Index("idx_audit_user", "user_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_type: Mapped[str]
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    details: Mapped[str | None]
    severity: Mapped[str | None] = mapped_column(default="info", server_default="info")
    timestamp: Mapped[datetime | None] = mapped_column(default=utcnow, server_default=func.current_timestamp())

    def __repr__(self) -> str:
        return f"<AuditLog id={self.id} event_type={self.event_type!r}>"


class Config(Base):
    """A system setting (key/value)."""

    __tablename__ = "config"

    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]
    description: Mapped[str | None]
    updated_at: Mapped[datetime | None] = _updated_at()

    def __repr__(self) -> str:
        return f"<Config key={self.key!r}>"


def _table(model: type[Base]) -> Table:
    return model.__table__  # type: ignore[return-value]


users = _table(User)
oauth_tokens = _table(OAuthToken)
instances = _table(Instance)
audit_log = _table(AuditLog)
config = _table(Config)
