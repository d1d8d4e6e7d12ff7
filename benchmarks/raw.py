"""The floor: the same work done with plain ``sqlite3`` and ``cryptography``.

Every function here works on a database that kissbot created (so the schema is
kissbot's own) and uses the specification's four pragmas. "Held" functions
reuse one connection in autocommit mode with explicit ``BEGIN``; "seed" ones
open a fresh connection per call, as the seed's ``DatabaseManager`` did.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.fernet import Fernet

PRAGMAS = (
    "PRAGMA busy_timeout = 5000",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
)


def sqlite_time(value: datetime) -> str:
    """``value`` in the text format SQLAlchemy's SQLite ``DateTime`` stores (naive UTC)."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")


def connect(path: str) -> sqlite3.Connection:
    """A connection with the specification's pragmas, in autocommit mode (explicit BEGIN)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


# The raw SQL of the benchmarked operations on kissbot's schema (v2: one row per user and token
# type). Each statement reads or writes what kissbot's own does: the ``bot`` row, its status,
# version and refresh time.
SELECT_TOKENS = (
    "SELECT user_id, token_type, access_token_encrypted, refresh_token_encrypted, scopes, expires_at, "
    "needs_reauth, refresh_failures, status, version, last_refresh, last_validated, created_at, updated_at "
    "FROM oauth_tokens WHERE user_id = ? AND token_type = 'bot'"
)
UPDATE_TOKENS = (
    "UPDATE oauth_tokens SET access_token_encrypted = ?, refresh_token_encrypted = ?, scopes = ?, "
    "expires_at = ?, needs_reauth = 0, status = 'valid', refresh_failures = 0, updated_at = ?, "
    "version = version + 1, last_refresh = ? WHERE user_id = ? AND token_type = 'bot'"
)
INSERT_AUDIT = (
    "INSERT INTO audit_log (event_type, user_id, channel_id, details, severity, timestamp) VALUES (?, ?, ?, ?, ?, ?)"
)
DUE_SCAN = (
    "SELECT t.user_id, t.token_type, u.twitch_login, t.expires_at, t.needs_reauth, t.refresh_failures "
    "FROM oauth_tokens t JOIN users u ON u.id = t.user_id WHERE t.expires_at <= ? ORDER BY t.expires_at"
)
INSERT_TOKEN = (
    "INSERT INTO oauth_tokens (user_id, access_token_encrypted, refresh_token_encrypted, scopes, expires_at, "
    "needs_reauth, refresh_failures, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_USER = (
    "INSERT INTO users (twitch_user_id, twitch_login, display_name, is_bot, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def get_tokens(conn: sqlite3.Connection, fernet: Fernet, user_id: int) -> tuple[str, str, Any]:
    """Select one user's token row and decrypt both tokens."""
    row = conn.execute(SELECT_TOKENS, (user_id,)).fetchone()
    return fernet.decrypt(row[2].encode()).decode(), fernet.decrypt(row[3].encode()).decode(), row


def store_tokens(
    conn: sqlite3.Connection, fernet: Fernet, user_id: int, access: str, refresh: str, expires_in: int
) -> None:
    """Encrypt both tokens, update the row and append the audit event, in one write transaction."""
    now = datetime.now(timezone.utc)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            UPDATE_TOKENS,
            (
                fernet.encrypt(access.encode()).decode(),
                fernet.encrypt(refresh.encode()).decode(),
                '["chat:read"]',
                sqlite_time(now + timedelta(seconds=expires_in)),
                sqlite_time(now),
                sqlite_time(now),
                user_id,
            ),
        )
        conn.execute(
            INSERT_AUDIT,
            ("tokens_refreshed", user_id, None, json.dumps({"token_type": "bot", "expires_in": expires_in, "scopes": ["chat:read"]}),
             "info", sqlite_time(now)),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def seed_get_tokens(path: str, fernet: Fernet, user_id: int) -> tuple[str, str, Any]:
    """The seed's style: a fresh connection with the four pragmas for each read."""
    conn = connect(path)
    try:
        return get_tokens(conn, fernet, user_id)
    finally:
        conn.close()


def seed_store_tokens(
    path: str, fernet: Fernet, user_id: int, access: str, refresh: str, expires_in: int
) -> None:
    """The seed's style: a fresh connection with the four pragmas for each write."""
    conn = connect(path)
    try:
        store_tokens(conn, fernet, user_id, access, refresh, expires_in)
    finally:
        conn.close()


def due_scan(conn: sqlite3.Connection, cutoff: datetime) -> list[tuple[Any, ...]]:
    """The indexed scan for tokens expiring before ``cutoff``."""
    return conn.execute(DUE_SCAN, (sqlite_time(cutoff),)).fetchall()


def bulk_users_and_tokens(
    conn: sqlite3.Connection,
    fernet: Fernet,
    count: int,
    due: int,
    *,
    login_prefix: str = "bench",
) -> list[int]:
    """Insert ``count`` users with tokens (the first ``due`` expiring now) in one transaction; return their ids.

    Each row gets its own ciphertexts so no layer can profit from repeats.
    """
    now = datetime.now(timezone.utc)
    stamp = sqlite_time(now)
    conn.execute("BEGIN IMMEDIATE")
    first = (conn.execute("SELECT COALESCE(MAX(id), 0) FROM users").fetchone()[0]) + 1
    conn.executemany(
        INSERT_USER,
        ((f"{login_prefix}-{i}", f"{login_prefix}_{i}", f"{login_prefix}_{i}", 1, stamp, stamp) for i in range(count)),
    )
    ids = list(range(first, first + count))

    def token_rows() -> Iterable[tuple[Any, ...]]:
        for n, user_id in enumerate(ids):
            expires = now + (timedelta(minutes=1) if n < due else timedelta(hours=4, seconds=n))
            yield (
                user_id,
                fernet.encrypt(f"access-{user_id}-abcdefghijklmnopqrstu".encode()).decode(),
                fernet.encrypt(f"refresh-{user_id}-abcdefghijklmnopqrst".encode()).decode(),
                '["chat:read", "chat:edit"]',
                sqlite_time(expires),
                0,
                0,
                stamp,
                stamp,
            )

    conn.executemany(INSERT_TOKEN, token_rows())
    conn.execute("COMMIT")
    return ids


def bulk_audit(conn: sqlite3.Connection, count: int, age: timedelta, batch: int = 50_000) -> None:
    """Append ``count`` audit events dated ``age`` ago, in batches of one transaction each."""
    stamp = sqlite_time(datetime.now(timezone.utc) - age)
    details = json.dumps({"expires_in": 14400, "scopes": ["chat:read"]})
    done = 0
    while done < count:
        n = min(batch, count - done)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_AUDIT, (("tokens_refreshed", None, None, details, "info", stamp) for _ in range(n)))
        conn.execute("COMMIT")
        done += n


def cleanup_audit(conn: sqlite3.Connection, days: int, batch_size: int) -> int:
    """Delete audit events older than ``days``, oldest first, ``batch_size`` per write transaction."""
    cutoff = sqlite_time(datetime.now(timezone.utc) - timedelta(days=days))
    deleted = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        n = conn.execute(
            "DELETE FROM audit_log WHERE id IN "
            "(SELECT id FROM audit_log WHERE timestamp < ? ORDER BY id LIMIT ?)",
            (cutoff, batch_size),
        ).rowcount
        conn.execute("COMMIT")
        deleted += n
        if n < batch_size:
            return deleted


def rotate(conn: sqlite3.Connection, old: Fernet, new: Fernet, batch_size: int = 1000) -> int:
    """Re-encrypt every token row from ``old`` to ``new`` in batches; return the rows done."""
    done = 0
    last = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(
            "SELECT id, access_token_encrypted, refresh_token_encrypted FROM oauth_tokens WHERE id > ? ORDER BY id LIMIT ?",
            (last, batch_size),
        ).fetchall()
        conn.executemany(
            "UPDATE oauth_tokens SET access_token_encrypted = ?, refresh_token_encrypted = ? WHERE id = ?",
            [
                (
                    new.encrypt(old.decrypt(a.encode())).decode(),
                    new.encrypt(old.decrypt(r.encode())).decode(),
                    i,
                )
                for i, a, r in rows
            ],
        )
        conn.execute("COMMIT")
        done += len(rows)
        if len(rows) < batch_size:
            return done
        last = rows[-1][0]


def migrate_stores(conn: sqlite3.Connection, fernet: Fernet, entries: list[dict[str, Any]]) -> None:
    """What migrate-yaml must do at least, per entry: a user, two encrypts, a token row, an audit event; one transaction."""
    now = datetime.now(timezone.utc)
    stamp = sqlite_time(now)
    conn.execute("BEGIN IMMEDIATE")
    for e in entries:
        user_id = conn.execute(
            INSERT_USER, (str(e["user_id"]), e["login"].lower(), e["login"], 1, stamp, stamp)
        ).lastrowid
        conn.execute(
            INSERT_TOKEN,
            (
                user_id,
                fernet.encrypt(e["access_token"].encode()).decode(),
                fernet.encrypt(e["refresh_token"].encode()).decode(),
                None,
                stamp,
                0,
                0,
                stamp,
                stamp,
            ),
        )
        conn.execute(
            INSERT_AUDIT,
            ("tokens_created", user_id, None, json.dumps({"source": "yaml"}), "info", stamp),
        )
    conn.execute("COMMIT")
