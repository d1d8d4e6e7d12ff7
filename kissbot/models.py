"""Declarative models of the five tables of the specification.

Table, column and index names are the specification's. Every other constraint
is named by :data:`NAMING_CONVENTION` so names are the same on SQLite and
PostgreSQL and migrations can refer to them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, ForeignKey, Index, Integer, MetaData, Text, false, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kissbot.types import EncryptedString, UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

_SQLITE_AUTOINCREMENT = {"sqlite_autoincrement": True}


class Base(DeclarativeBase):
    """Declarative base sharing one :class:`MetaData` with the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, server_default=func.current_timestamp())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow, server_default=func.current_timestamp())


class User(Base):
    """A Twitch account: a bot or a channel. Logins are stored lowercase."""

    __tablename__ = "users"
    __table_args__ = _SQLITE_AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    twitch_user_id: Mapped[str] = mapped_column(Text, unique=True)
    twitch_login: Mapped[str] = mapped_column(Text, unique=True)
    display_name: Mapped[str | None] = mapped_column(Text)
    is_bot: Mapped[bool | None] = mapped_column(Boolean, default=False, server_default=false())
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
        Index("uq_oauth_tokens_user_id_token_type", "user_id", "token_type", unique=True),
        _SQLITE_AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    access_token_encrypted: Mapped[str] = mapped_column(EncryptedString)
    refresh_token_encrypted: Mapped[str] = mapped_column(EncryptedString)
    scopes: Mapped[str | None] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    needs_reauth: Mapped[bool | None] = mapped_column(Boolean, default=False, server_default=false())
    refresh_failures: Mapped[int | None] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime | None] = _created_at()
    updated_at: Mapped[datetime | None] = _updated_at()
    token_type: Mapped[str] = mapped_column(Text, default="bot", server_default="bot")
    status: Mapped[str] = mapped_column(Text, default="valid", server_default="valid")
    last_refresh: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_validated: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    refresh_lease_owner: Mapped[str | None] = mapped_column(Text)
    refresh_lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    key_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")

    def __repr__(self) -> str:
        return f"<OAuthToken user_id={self.user_id} type={self.token_type} expires_at={self.expires_at}>"


class Instance(Base):
    """A bot process serving one channel."""

    __tablename__ = "instances"
    __table_args__ = _SQLITE_AUTOINCREMENT

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    bot_user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(Text, default="stopped", server_default="stopped")
    pid: Mapped[int | None] = mapped_column(Integer)
    start_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stop_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_heartbeat: Mapped[datetime | None] = mapped_column(UTCDateTime)
    crash_count: Mapped[int | None] = mapped_column(Integer, default=0, server_default="0")
    config_overrides: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime | None] = _created_at()
    updated_at: Mapped[datetime | None] = _updated_at()

    def __repr__(self) -> str:
        return f"<Instance id={self.id} status={self.status!r} pid={self.pid}>"


class AuditLog(Base):
    """One audit event. ``details`` is JSON and never holds a secret."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("idx_audit_timestamp", "timestamp"),
        Index("idx_audit_event_type", "event_type"),
        Index("idx_audit_user", "user_id"),
        _SQLITE_AUTOINCREMENT,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_type: Mapped[str] = mapped_column(Text)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    details: Mapped[str | None] = mapped_column(Text)
    severity: Mapped[str | None] = mapped_column(Text, default="info", server_default="info")
    timestamp: Mapped[datetime | None] = mapped_column(UTCDateTime, default=utcnow, server_default=func.current_timestamp())

    def __repr__(self) -> str:
        return f"<AuditLog id={self.id} event_type={self.event_type!r}>"


class Config(Base):
    """A system setting (key/value)."""

    __tablename__ = "config"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime | None] = _updated_at()

    def __repr__(self) -> str:
        return f"<Config key={self.key!r}>"


users = User.__table__
oauth_tokens = OAuthToken.__table__
instances = Instance.__table__
audit_log = AuditLog.__table__
config = Config.__table__
