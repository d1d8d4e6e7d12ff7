"""DatabaseManager: the specification's API as a thin facade over the repositories.

Each write runs in its own short transaction (``BEGIN IMMEDIATE`` on SQLite);
reads run outside any transaction, so a one-statement read is one round trip.
Both run on the one connection the manager keeps between calls, a :class:`~kissbot.engine.HeldConnection`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.engine import URL, Engine

from kissbot.crypto import KeyRing
from kissbot.engine import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_DB_PATH, HeldConnection, create_engine, writer
from kissbot.errors import NoDatabase, UserNotFound
from kissbot.keys import load_cipher, read_key_source, resolve_key_source
from kissbot.migrations import ensure_schema
from kissbot.repo import AuditRepository, ConfigRepository, InstanceRepository, TokenRepository, UserRepository
from kissbot.types import attach_cipher
from kissbot.urls import shown, sqlite_path, to_url

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

CLEANUP_BATCH_SIZE = 5000
CLEANUP_PAUSE_RATIO = 0.5
"""On SQLite, ``cleanup_old_logs`` rests this fraction of a batch's time before the next one."""


class DatabaseManager:
    """The store, as the specification's ``DatabaseManager``.

    ``DatabaseManager(db_path="kissbot.db")`` opens (and creates or
    migrates) the database, then loads the key and checks it against the
    fingerprints the store recorded, before any token is decrypted. Creating
    a SQLite file logs a warning naming it (a mistyped path shows at once;
    ``create=False`` refuses a missing database instead). ``url``
    selects another database (``postgresql+psycopg://…``). ``synchronous``
    and ``busy_timeout_ms`` tune SQLite (see :func:`kissbot.engine.create_engine`).

    Keys come from, first match wins: ``key`` (one Fernet key, a list newest
    first, or a :class:`~kissbot.crypto.KeyRing`), the ``KISSBOT_KEY``
    environment variable, then the key file: ``key_file``, else
    ``KISSBOT_KEY_FILE``, else ``.kissbot.key`` beside the database (see
    :func:`~kissbot.keys.default_key_file`). A missing key file is
    created (atomically, mode 0600) only while the database holds no tokens;
    a key file follows rotations while the store is open
    (see :mod:`kissbot.keys`).

    With ``create=False`` nothing is created, migrated or recorded: a missing
    database (a SQLite file that does not exist, or a database without
    kissbot's tables) raises :class:`~kissbot.errors.NoDatabase`, one at an
    older migration raises :class:`~kissbot.errors.OutdatedSchema`, and a
    missing key file is not made (a store without tokens then opens without a
    key: reading or writing tokens raises :class:`~kissbot.errors.KeyFileError`).
    With ``need_key=False`` a missing key file is not an error even when
    tokens are stored: the store opens without a key, for what decrypts
    nothing (users, instances, audit, config).

    A manager may be created before ``os.fork()`` and used in the children.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] = DEFAULT_DB_PATH,
        key_file: str | os.PathLike[str] | None = None,
        *,
        url: str | URL | None = None,
        key: KeyRing | bytes | str | list[bytes] | None = None,
        echo: bool = False,
        synchronous: str | None = None,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        create: bool = True,
        need_key: bool = True,
    ) -> None:
        self.url = to_url(url if url is not None else db_path)
        self.key_source = resolve_key_source(key, key_file, db=self.url)
        self.key_file: Path | None = self.key_source.path
        path = sqlite_path(self.url)
        new = path is not None and not path.exists()
        if new and not create:
            raise NoDatabase(f"database {path} does not exist; create it with kissbot init-db")
        cipher = read_key_source(self.key_source)
        self.engine: Engine = create_engine(
            self.url, echo=echo, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms
        )
        try:
            ensure_schema(self.engine, create=create)
            if new:
                log.warning("database %s did not exist: created a new, empty store", os.path.abspath(path))
            db = self.url.database or "the store"
            cipher = load_cipher(self.engine, self.key_source, db, cipher, create=create, need_key=need_key)
            if cipher is not None:
                attach_cipher(self.engine, cipher)
        except BaseException:
            self.engine.dispose()
            raise
        self._writer = writer(self.engine)
        self._held = HeldConnection(self.engine)

    def __repr__(self) -> str:
        return f"<DatabaseManager {shown(self.url)}>"

    # --- transactions --------------------------------------------------------------------------

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A :class:`Session` in a write transaction, committed on success.

        Use it to group several repository calls atomically::

            with mgr.session() as s:
                uid = UserRepository(s).create_user("1", "bot")
                TokenRepository(s).store_tokens(uid, "a", "r", 3600)
        """
        from sqlalchemy.orm import Session

        with Session(self._writer, expire_on_commit=False) as session, session.begin():
            yield session

    def close(self) -> None:
        """Release every connection (the store can still be used: it then opens new ones)."""
        self._held.close()
        self.engine.dispose()

    def __enter__(self) -> DatabaseManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- users ---------------------------------------------------------------------------------

    def get_user(self, twitch_user_id: str | int) -> dict[str, Any] | None:
        """The user with this Twitch user id, or None."""
        with self._held.read() as conn:
            return UserRepository(conn).get_user(twitch_user_id)

    def get_user_by_login(self, login: str) -> dict[str, Any] | None:
        """The user with this login (case-insensitive), or None."""
        with self._held.read() as conn:
            return UserRepository(conn).get_user_by_login(login)

    def create_user(
        self, twitch_user_id: str | int, twitch_login: str, display_name: str | None = None, is_bot: bool = False
    ) -> int:
        """Create a user and return its id."""
        with self._held.write() as conn:
            return UserRepository(conn).create_user(twitch_user_id, twitch_login, display_name, is_bot)

    def update_user(self, user_id: int, **fields: Any) -> None:
        """Change a user's ``twitch_user_id``, ``twitch_login``, ``display_name`` or ``is_bot``."""
        with self._held.write() as conn:
            UserRepository(conn).update_user(user_id, **fields)

    def list_users(self) -> list[dict[str, Any]]:
        """Every user, ordered by login."""
        with self.engine.connect() as conn:  # a transaction: PostgreSQL streams the rows through a server-side cursor
            return UserRepository(conn).list_users()

    # --- tokens --------------------------------------------------------------------------------

    def store_tokens(
        self,
        user_id: int,
        access_token: str,
        refresh_token: str,
        expires_in: int | float,
        scopes: list[str] | None = None,
        *,
        token_type: str = "bot",
        expected_version: int | None = None,
    ) -> bool:
        """Encrypt and store (insert or replace) the tokens of ``user_id``; True if the row is new.

        ``scopes=None`` keeps the stored scopes (``[]`` clears them). With
        ``expected_version`` (the ``version`` of the tokens the caller read; 0:
        none yet) the write is a compare-and-set: newer tokens stored meanwhile
        raise :class:`~kissbot.errors.StaleTokens` and are kept.
        """
        with self._held.write() as conn:
            return TokenRepository(conn).store_tokens(
                user_id,
                access_token,
                refresh_token,
                expires_in,
                scopes,
                token_type=token_type,
                expected_version=expected_version,
            )

    def get_tokens_by_twitch_id(self, twitch_user_id: str | int, *, token_type: str = "bot") -> dict[str, Any] | None:
        """As :meth:`get_tokens`, for the user with this Twitch user id; raise :class:`~kissbot.errors.UserNotFound`."""
        user = self.get_user(twitch_user_id)
        if user is None:
            raise UserNotFound(f"no user with Twitch user id {str(twitch_user_id)!r}")
        return self.get_tokens(user["id"], token_type=token_type)

    def claim_refresh(self, user_id: int, owner: str, ttl: float, *, token_type: str = "bot") -> bool:
        """Take the refresh lease of a token row for ``ttl`` seconds; True if ``owner`` now holds it.

        One owner holds a live lease at a time (across processes); an expired
        lease can be taken over and the holder may extend its own.
        """
        with self._held.write() as conn:
            return TokenRepository(conn).claim_refresh(user_id, owner, ttl, token_type=token_type)

    def release_refresh(self, user_id: int, owner: str, *, token_type: str = "bot") -> bool:
        """Give back ``owner``'s refresh lease; False if it did not hold it (any more)."""
        with self._held.write() as conn:
            return TokenRepository(conn).release_refresh(user_id, owner, token_type=token_type)

    def get_tokens(self, user_id: int, *, token_type: str = "bot") -> dict[str, Any] | None:
        """The decrypted tokens of ``user_id`` (of ``token_type``), or None."""
        with self._held.read() as conn:
            return TokenRepository(conn).get_tokens(user_id, token_type=token_type)

    def get_tokens_needing_refresh(self, buffer_minutes: float = 10) -> list[dict[str, Any]]:
        """Tokens expiring within ``buffer_minutes``, soonest first (not decrypted)."""
        with self._held.read() as conn:
            return TokenRepository(conn).get_tokens_needing_refresh(buffer_minutes)

    def list_tokens(self, decrypt: bool = False) -> list[dict[str, Any]]:
        """Every token row with its login; tokens decrypted only if ``decrypt`` (see the repository)."""
        with self.engine.connect() as conn:  # a transaction: PostgreSQL streams the rows through a server-side cursor
            return TokenRepository(conn).list_tokens(decrypt)

    def mark_tokens_expired(self, user_id: int, *, token_type: str = "bot") -> None:
        """Flag the tokens of ``user_id`` as needing reauthorisation."""
        with self._held.write() as conn:
            TokenRepository(conn).mark_tokens_expired(user_id, token_type=token_type)

    def increment_refresh_failures(self, user_id: int, *, token_type: str = "bot") -> int:
        """Count a failed refresh for ``user_id``; return the new count."""
        with self._held.write() as conn:
            return TokenRepository(conn).increment_refresh_failures(user_id, token_type=token_type)

    # --- instances -----------------------------------------------------------------------------

    def register_instance(self, channel_login: str, bot_login: str, pid: int | None) -> int:
        """Mark the bot's instance on a channel running under ``pid``; return its id."""
        with self._held.write() as conn:
            return InstanceRepository(conn).register_instance(channel_login, bot_login, pid)

    def update_instance_heartbeat(self, instance_id: int, status: str = "running") -> None:
        """Record a heartbeat for ``instance_id``."""
        with self._held.write() as conn:
            InstanceRepository(conn).update_instance_heartbeat(instance_id, status)

    def stop_instance(self, instance_id: int, crash: bool = False) -> str:
        """Stop ``instance_id`` (counting a crash if ``crash``); return its new status."""
        with self._held.write() as conn:
            return InstanceRepository(conn).stop_instance(instance_id, crash)

    def reset_instance(self, instance_id: int) -> None:
        """Re-enable an instance disabled after too many crashes."""
        with self._held.write() as conn:
            InstanceRepository(conn).reset_instance(instance_id)

    def get_active_instances(self) -> list[dict[str, Any]]:
        """Running instances whose heartbeat is fresh (see :meth:`reap_stale_instances`)."""
        with self._held.read() as conn:
            return InstanceRepository(conn).get_active_instances()

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance, whatever its status, with the channel and bot logins."""
        with self._held.read() as conn:
            return InstanceRepository(conn).list_instances()

    def reap_stale_instances(self) -> list[dict[str, Any]]:
        """Mark running instances silent for three ``health_check_interval`` as crashed; return them.

        Each counts as a crash toward ``max_crash_count`` (``disabled`` at the
        limit) and is audited.
        """
        with self._held.write() as conn:
            return InstanceRepository(conn).reap_stale_instances()

    # --- audit ---------------------------------------------------------------------------------

    def log_event(
        self,
        event_type: str,
        user_id: int | None = None,
        channel_id: int | None = None,
        details: dict[str, Any] | None = None,
        severity: str = "info",
    ) -> None:
        """Append an audit event (``details`` must hold no secret)."""
        with self._held.write() as conn:
            AuditRepository(conn).log_event(event_type, user_id, channel_id, details, severity)

    def get_audit_log(
        self, limit: int = 100, event_type: str | None = None, user_id: int | None = None
    ) -> list[dict[str, Any]]:
        """Newest audit events first, ``details`` decoded from JSON."""
        with self.engine.connect() as conn:  # a transaction: PostgreSQL streams the rows through a server-side cursor
            return AuditRepository(conn).get_audit_log(limit, event_type, user_id)

    def cleanup_old_logs(self, days: int | None = None) -> int:
        """Delete audit events older than ``days`` (default: config ``log_retention_days``).

        Deletes in batches of :data:`CLEANUP_BATCH_SIZE` (oldest first, along
        ``idx_audit_timestamp``), one short transaction each with a pause
        between them on SQLite, so concurrent writers wait at most about one
        batch. Returns the number deleted.
        """
        with self._held.read() as conn:
            cutoff = AuditRepository(conn).retention_cutoff(days)
        deleted, after = 0, None
        while True:
            started = time.monotonic()
            with self._held.write() as conn:
                batch, after = AuditRepository(conn).delete_logs_before(cutoff, CLEANUP_BATCH_SIZE, after)
            deleted += batch
            if after is None:
                return deleted
            if self.engine.dialect.name == "sqlite":
                # SQLite's busy handler polls: without a gap, the next batch
                # takes the lock again before a waiting writer wakes up.
                time.sleep(CLEANUP_PAUSE_RATIO * (time.monotonic() - started))

    # --- config --------------------------------------------------------------------------------

    def get_config(self, key: str, default: Any = None) -> Any:
        """A setting's value (typed: ``"60"`` reads as 60), or ``default``."""
        with self._held.read() as conn:
            return ConfigRepository(conn).get_config(key, default)

    def set_config(self, key: str, value: Any, description: str | None = None) -> None:
        """Set a setting."""
        with self._held.write() as conn:
            ConfigRepository(conn).set_config(key, value, description)

    def list_config(self) -> list[dict[str, Any]]:
        """Every setting (key, typed value, description, updated_at), by key."""
        with self._held.read() as conn:
            return ConfigRepository(conn).list_config()

    # --- stats ---------------------------------------------------------------------------------

    def get_stats(self) -> dict[str, int]:
        """Counts of users, tokens, running instances, audit events, and the database size."""
        with self._held.read() as conn:
            stats = {
                "users_count": UserRepository(conn).count(),
                "tokens_count": TokenRepository(conn).count(),
                "active_instances": InstanceRepository(conn).count_active(),
                "audit_log_count": AuditRepository(conn).count(),
                "tokens_needing_reauth": TokenRepository(conn).count_needing_reauth(),
            }
            if self.engine.dialect.name == "postgresql":
                stats["db_size_bytes"] = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
        if "db_size_bytes" not in stats:
            stats["db_size_bytes"] = self._sqlite_size()
        return stats

    def _sqlite_size(self) -> int:
        path = sqlite_path(self.url)
        if path is None:
            with self._held.read() as conn:
                pages = conn.execute(text("PRAGMA page_count")).scalar_one()
                return pages * conn.execute(text("PRAGMA page_size")).scalar_one()
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
