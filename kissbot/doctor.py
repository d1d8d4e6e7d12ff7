"""``kissbot doctor``: the specification's Troubleshooting as one diagnosis.

:func:`diagnose` looks at a store without changing it (a SQLite file is
opened read-only; a missing database or key file is reported, never created)
and returns :class:`Finding` objects, each with the fix an operator should
apply. Token values are never read into a finding, only user ids and logins.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import func, select
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import SQLAlchemyError

from kissbot import settings
from kissbot.crypto import TokenCipher, read_key_ring, verify_tokens
from kissbot.urls import is_memory, sqlite_path, to_url
from kissbot.errors import KeyFileError
from kissbot.instances import STALE_HEARTBEATS
from kissbot.maintenance import integrity_problems
from kissbot.migrations import HEAD, KISSBOT_TABLES, current_revision, is_known_revision, read_only_engine
from kissbot.models import audit_log, instances, oauth_tokens, users
from kissbot.types import ciphertext, utcnow
from kissbot.verification import database_problems, summary


@dataclass(frozen=True)
class Finding:
    """One result of :func:`diagnose`."""

    level: str
    """``ok``, ``warning`` or ``error``."""
    check: str
    """What was checked: ``key-file``, ``database``, ``integrity``, ``journal-mode``,
    ``migration``, ``schema``, ``config``, ``decryption``, ``reauth``, ``expiry``, ``instances`` or ``leftovers``."""
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The finding as a JSON-ready dict."""
        return asdict(self)


def diagnose(target: str | os.PathLike[str] | URL, key_file: str | os.PathLike[str]) -> list[Finding]:
    """Check the store at ``target`` (a SQLite path or a URL) with the key in ``key_file``.

    Findings come in this order: key file (present, mode 0600, a Fernet key),
    database (opens), ``integrity_check`` and journal mode (SQLite),
    migration at head, every token decrypts with the key, tokens needing
    reauthorisation or with ``max_crash_count`` refresh failures, running
    instances without a recent heartbeat. Nothing is created or changed.
    """
    url = to_url(target)
    key_path = Path(key_file)
    findings: list[Finding] = []
    cipher = _check_key_file(key_path, findings)
    path = sqlite_path(url)
    shown = str(path) if path is not None else url.render_as_string(hide_password=True)
    if path is not None and not path.is_file():
        findings.append(Finding("error", "database", f"database {path} does not exist", f"create it with `kissbot init-db --db {path}`"))
        return findings
    if is_memory(url):
        findings.append(Finding("error", "database", "an in-memory database has nothing to diagnose", "pass --db PATH or --url URL"))
        return findings
    engine = read_only_engine(url)
    try:
        with engine.connect() as conn:
            _check_database(conn, path, shown, key_path, cipher, findings)
        if path is not None:
            _check_leftovers(path, key_path, findings)
    except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
        findings.append(
            Finding("error", "database", f"cannot read database {shown}: {getattr(exc, 'orig', None) or exc}",
                    "check the path or URL; restore the latest backup with `kissbot restore BACKUP` if the file is damaged")
        )
    finally:
        engine.dispose()
    return findings


def _check_key_file(key_path: Path, findings: list[Finding]) -> TokenCipher | None:
    if not key_path.exists():
        findings.append(
            Finding("warning", "key-file", f"key file {key_path} not found",
                    "if tokens are stored, restore it from your backup; otherwise it is created with the first token")
        )
        return None
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        findings.append(
            Finding("error", "key-file", f"key file {key_path} is readable by group or others (mode {mode:04o})", f"chmod 600 {key_path}")
        )
    try:
        cipher = TokenCipher(read_key_ring(key_path, check_mode=False))
    except KeyFileError as exc:
        findings.append(Finding("error", "key-file", str(exc), f"restore {key_path} from your backup"))
        return None
    if not mode & 0o077:
        findings.append(Finding("ok", "key-file", f"key file {key_path} is present with mode {mode:04o}"))
    return cipher


def _check_database(
    conn: Connection, path: Path | None, shown: str, key_path: Path, cipher: TokenCipher | None, findings: list[Finding]
) -> None:
    if path is not None:
        problems = integrity_problems(conn.connection.driver_connection)
        if not problems:
            findings.append(Finding("ok", "integrity", "integrity_check: ok"))
        else:
            findings.append(
                Finding("error", "integrity", f"integrity_check found {len(problems)} problems, first: {problems[0]}",
                        "stop the bots and restore the latest backup with `kissbot restore BACKUP`")
            )
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()
        if mode == "wal":
            findings.append(Finding("ok", "journal-mode", "journal mode: wal"))
        else:
            findings.append(
                Finding("warning", "journal-mode", f"journal mode is {mode}, not wal: bots will block each other",
                        f"`kissbot init-db --db {shown}` (any kissbot connection switches it to WAL)")
            )
    tables = set(sqlalchemy.inspect(conn).get_table_names())
    revision = current_revision(conn)
    if not tables & KISSBOT_TABLES:
        findings.append(Finding("error", "migration", f"{shown} has no kissbot tables", "create them with `kissbot init-db`"))
        return
    if revision is None:
        findings.append(Finding("error", "migration", "kissbot tables without a migration version", "run `kissbot adopt`"))
        return
    if revision == HEAD:
        findings.append(Finding("ok", "migration", f"migration at head ({HEAD})"))
    elif is_known_revision(revision):
        findings.append(
            Finding("warning", "migration", f"migration {revision}, not head ({HEAD})", "migrate with `kissbot init-db` (bots also migrate on start)")
        )
    else:
        findings.append(
            Finding("error", "migration", f"migration {revision} is unknown to this kissbot version (head {HEAD})", "upgrade kissbot")
        )
        return
    problems = database_problems(conn, revision, config=False)
    if problems:
        findings.append(
            Finding("error", "schema", f"{shown} is not a database kissbot made: {summary(problems)}",
                    "stop the bots and restore a backup made by kissbot (`kissbot restore BACKUP`, pg_restore on PostgreSQL)")
        )
        return
    findings.append(
        Finding("ok", "schema", f"schema: exactly migration {revision}'s tables, columns and indexes; rows well-typed")
    )
    for corrupt in settings.problems(conn):
        findings.append(Finding("error", "config", corrupt.problem, corrupt.fix))
    _check_tokens(conn, key_path, cipher, findings)
    _check_expiry(conn, findings)
    _check_instances(conn, findings)


def _check_leftovers(path: Path, key_path: Path, findings: list[Finding]) -> None:
    from kissbot.backup import leftovers

    # Backups (and copies of the key made with them) go beside the database by default.
    found = leftovers(path) + leftovers(path.with_name(key_path.name))
    if not found:
        findings.append(Finding("ok", "leftovers", "no temporary files left by interrupted runs"))
        return
    names = ", ".join(p.name for p in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    findings.append(
        Finding("warning", "leftovers", f"{len(found)} temporary files left by interrupted backup, restore or import runs: {names}",
                f"the next `kissbot backup` removes them, or delete them from {path.parent}")
    )


def _check_tokens(conn: Connection, key_path: Path, cipher: TokenCipher | None, findings: list[Finding]) -> None:
    rows = conn.execute(
        select(
            oauth_tokens.c.user_id,
            ciphertext(oauth_tokens.c.access_token_encrypted),
            ciphertext(oauth_tokens.c.refresh_token_encrypted),
        ).order_by(oauth_tokens.c.user_id)
    ).all()
    if cipher is not None:
        check = verify_tokens(rows, cipher)
        if check.failed_user_ids:
            ids = ", ".join(str(i) for i in check.failed_user_ids)
            findings.append(
                Finding("error", "decryption",
                        f"tokens of {len(check.failed_user_ids)} of {check.checked} users do not decrypt with {key_path} (user ids {ids})",
                        "use the key file these tokens were stored with (from your backup); without it, reauthorize those users")
            )
        else:
            findings.append(Finding("ok", "decryption", f"tokens of all {check.checked} users decrypt with {key_path}"))
    elif rows:
        findings.append(
            Finding("error", "decryption", f"{len(rows)} users have tokens but there is no usable key to decrypt them",
                    f"restore {key_path} from your backup")
        )
    max_failures = settings.value(conn, "max_crash_count", strict=False)
    unhealthy = conn.execute(
        select(
            oauth_tokens.c.user_id,
            users.c.twitch_login,
            oauth_tokens.c.token_type,
            oauth_tokens.c.status,
            oauth_tokens.c.needs_reauth,
            oauth_tokens.c.refresh_failures,
        )
        .join(users, users.c.id == oauth_tokens.c.user_id)
        .where(oauth_tokens.c.needs_reauth.is_(True) | (oauth_tokens.c.refresh_failures >= max_failures))
        .order_by(users.c.twitch_login, oauth_tokens.c.token_type)
    ).all()
    for row in unhealthy:
        reasons = []
        if row.needs_reauth:
            reasons.append(f"needs reauthorization (status {row.status})")
        if (row.refresh_failures or 0) >= max_failures:
            reasons.append(f"{row.refresh_failures} refresh failures (max_crash_count {max_failures})")
        findings.append(
            Finding("warning", "reauth", f"user {row.twitch_login} (id {row.user_id}), {row.token_type} token: {', '.join(reasons)}",
                    f"run kissbot auth {row.twitch_login}{' --broadcaster' if row.token_type == 'broadcaster' else ''}")
        )
    if not unhealthy:
        findings.append(Finding("ok", "reauth", "no token needs reauthorization"))


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    return f"{seconds // 3600} h {seconds % 3600 // 60} min" if seconds >= 3600 else f"{seconds // 60} min {seconds % 60} s"


def _check_expiry(conn: Connection, findings: list[Finding]) -> None:
    now = utcnow()
    expired = conn.execute(
        select(users.c.twitch_login, oauth_tokens.c.token_type, oauth_tokens.c.expires_at)
        .join(users, users.c.id == oauth_tokens.c.user_id)
        .where(oauth_tokens.c.expires_at <= now, oauth_tokens.c.needs_reauth.is_(False))
        .order_by(oauth_tokens.c.expires_at)
    ).all()
    if not expired:
        findings.append(Finding("ok", "expiry", "no token has expired"))
        return
    last = conn.execute(
        select(func.max(audit_log.c.timestamp)).where(audit_log.c.event_type == "tokens_refreshed")
    ).scalar()
    oldest = expired[0]
    findings.append(
        Finding("warning", "expiry",
                f"{len(expired)} token(s) expired without being refreshed (the oldest: {oldest.twitch_login}'s "
                f"{oldest.token_type} token, {_age(now - oldest.expires_at)} ago); last refresh: "
                + ("never" if last is None else f"{_age(now - last)} ago"),
                "run `kissbot refresh-worker` (TWITCH_CLIENT_ID, TWITCH_CLIENT_SECRET): it refreshes tokens before they expire")
    )


def _check_instances(conn: Connection, findings: list[Finding]) -> None:
    interval = settings.value(conn, "health_check_interval", strict=False)
    limit = timedelta(seconds=STALE_HEARTBEATS * interval)
    now = utcnow()
    channel, bot = users.alias("channel"), users.alias("bot")
    running = conn.execute(
        select(instances.c.id, instances.c.pid, instances.c.last_heartbeat, channel.c.twitch_login.label("channel"),
               bot.c.twitch_login.label("bot"))
        .join(channel, channel.c.id == instances.c.channel_id)
        .join(bot, bot.c.id == instances.c.bot_user_id)
        .where(instances.c.status == "running")
        .order_by(instances.c.id)
    ).all()
    stale = 0
    for row in running:
        if row.last_heartbeat is not None and now - row.last_heartbeat <= limit:
            continue
        stale += 1
        age = "never" if row.last_heartbeat is None else f"{int((now - row.last_heartbeat).total_seconds())} s ago"
        findings.append(
            Finding("warning", "instances",
                    f"instance {row.id} ({row.bot} on {row.channel}, pid {row.pid}) is running but its last heartbeat was {age} "
                    f"(limit {limit.total_seconds():g} s)",
                    f"check whether pid {row.pid} is alive; if not, restart the bot (registering again marks it running)")
        )
    if not stale:
        findings.append(Finding("ok", "instances", f"{len(running)} running instances, none stale"))
