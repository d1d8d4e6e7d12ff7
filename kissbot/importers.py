"""Import plaintext tokens into the encrypted store.

Three sources are read into one :class:`TokenBatch`:

* a bot's ``config.yaml`` (:func:`read_yaml_tokens`): ``twitch.tokens.<login>``
  with ``user_id``, ``access_token``, ``refresh_token`` and optional
  ``scopes``; users are created or updated;
* TwitchIO's ``.tio.tokens.json`` (:func:`read_token_file`):
  ``{"<user_id>": {"user_id", "token", "refresh", "last_validated"}}``;
  tokens go to existing users matched by Twitch user id;
* pyTwitchAPI's ``user_token.json`` (``{"token", "refresh"}``), for the
  existing user named by ``login``.

:func:`import_tokens` then validates every entry against the store and writes
them in one transaction, after a backup of an existing SQLite database, or
only computes the figures (``dry_run``) without writing anything at all.
Problems name the entry but never show a token.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from kissbot.backup import backup_sqlite, default_backup_path
from kissbot.engine import DEFAULT_DB_PATH, write_transaction
from kissbot.urls import sqlite_path, to_url
from kissbot.errors import ImportSourceError, InvalidImport, NoDatabase, OutdatedSchema
from kissbot.migrations import read_only_engine
from kissbot.repo import AuditRepository, Executor, TokenRepository, UserRepository
from kissbot.validation import MAX_ECHO, echo, shown

log = logging.getLogger(__name__)

OAUTH_PREFIX = "oauth:"
YAML_EXPIRES_IN = 0
"""YAML tokens have an unknown age: by default they are due for refresh at once."""
TIO_EXPIRES_IN = 14400
"""Tokens from a live token file: the specification's 4 hours."""


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's when the wheel has it) that refuses a mapping key given twice.

    YAML requires unique keys, yet PyYAML keeps the last value: two entries
    for one login would silently become one. Keys brought in by a merge
    (``<<: *defaults``) may still be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the constructor below refuses it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {echo(key)}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@contextmanager
def _collector_paused() -> Iterator[None]:
    # PyYAML's constructor (Python, even over libyaml's parser) allocates a node and
    # an object per scalar, all of which stay alive until the entries are built: the
    # cyclic collector's passes over them took half of the parse of a 10,000-user
    # config.yaml. Left off if the caller had turned it off.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _DuplicateKey(ValueError):
    """A JSON object gives one key twice."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' ``object_pairs_hook``: refuse an object giving a key twice."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(f"duplicate key {echo(key)}")
            seen.add(key)
    return result


@dataclass(frozen=True)
class TokenEntry:
    """One user's tokens read from a file. ``where`` names it in problems (never a token)."""

    where: str
    twitch_user_id: str | None
    login: str | None
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    display_name: str | None = None
    scopes: list[str] | None = None
    is_bot: bool = False
    last_validated: datetime | None = None


@dataclass(frozen=True)
class TokenBatch:
    """What a token file holds: valid entries, one line per invalid one, and how to apply them.

    With ``create_users`` the entries create or update users (config.yaml);
    without, they only go to users that already exist (live token files).
    """

    source: str
    entries: list[TokenEntry]
    problems: list[str]
    create_users: bool
    audit_event: str
    token_type: str = "bot"
    written_at: datetime | None = None
    """When a live token file was last written: stored tokens written after it are kept (see kissbot.live_tokens)."""


@dataclass
class ImportReport:
    """The figures of an import; ``errors`` are human lines naming each entry at fault."""

    users_created: int = 0
    users_updated: int = 0
    tokens_stored: int = 0
    errors: list[str] = field(default_factory=list)
    dry_run: bool = False
    backup: str | None = None
    notes: list[str] = field(default_factory=list)
    logins: dict[str, str] = field(default_factory=dict)
    """Each login whose tokens are (or, in a dry run, would be) stored: ``"create"`` or ``"update"`` its user."""

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "users_created": self.users_created,
            "users_updated": self.users_updated,
            "tokens_stored": self.tokens_stored,
            "errors": list(self.errors),
            "dry_run": self.dry_run,
            "backup": self.backup,
            "notes": list(self.notes),
            "logins": dict(self.logins),
        }


# --- reading files -----------------------------------------------------------------------------


def _read_text(path: Path, what: str) -> str:
    try:
        # Non-blocking, so that a FIFO is refused instead of waiting for a writer forever.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise ImportSourceError(f"{what} {path} is not a regular file")
            return fh.read().decode("utf-8")
    except FileNotFoundError:
        raise ImportSourceError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise ImportSourceError(f"{what} {path} is a directory") from None
    except UnicodeDecodeError:
        raise ImportSourceError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ImportSourceError(f"cannot read {what} {path}: {exc.strerror}") from None


def _token_field(data: dict[str, Any], key: str, where: str, problems: list[str]) -> str | None:
    value = data.get(key)
    if value is None:
        problems.append(f"{where}: {key} is missing")
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: {key} must be a string")
        return None
    value = value.strip()
    if value.lower().startswith(OAUTH_PREFIX):
        value = value[len(OAUTH_PREFIX):].strip()
    if not value:
        problems.append(f"{where}: {key} is empty")
        return None
    return value


def _user_id_field(value: Any, where: str, problems: list[str]) -> str | None:
    if value is None or value == "":
        problems.append(f"{where}: user_id is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        problems.append(f"{where}: user_id must be a number or a string of digits")
        return None
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        problems.append(f"{where}: user_id must be a number or a string of digits")
        return None
    return text


def _scopes_field(value: Any, where: str, problems: list[str]) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list) and all(isinstance(s, str) and s for s in value):
        return list(value)
    problems.append(f"{where}: scopes must be a list of strings")
    return None


@_collector_paused()
def read_yaml_tokens(path: str | os.PathLike[str], bot: str | None = None) -> TokenBatch:
    """Read ``twitch.tokens`` from a bot's ``config.yaml`` (other sections are ignored).

    Logins are the keys, matched case-insensitively: the entry is stored
    under the lowercase login with the key's spelling as ``display_name``.
    ``user_id`` may be a number or a string; an ``oauth:`` prefix is stripped
    from tokens; ``scopes`` (a list or a space-separated string) and
    ``is_bot`` are optional. Without ``is_bot``, the bot account is the login
    ``bot`` if given, else the config's ``bot.name``, else the user whose id is
    ``twitch.bot_id``; a ``bot`` that no entry has raises
    :class:`~kissbot.errors.ImportSourceError`.
    Raises :class:`~kissbot.errors.ImportSourceError` if the file is missing,
    is not YAML or has no ``twitch.tokens``; entry problems (missing, empty or
    non-string fields, duplicate logins or user ids) are listed in the batch.
    """
    path = Path(path)
    text = _read_text(path, "config file")
    try:
        config = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        # Only the position and the parser's complaint, masked: the snippet, a tag or a key could hold a secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = shown(getattr(exc, "problem", None) or "cannot be parsed", limit=2 * MAX_ECHO)
        raise ImportSourceError(f"{path} is not valid YAML: {problem}{where}") from None
    except ValueError:
        # PyYAML's constructor lets Python's own error out of an impossible date (2024-13-01) or number (0x_).
        raise ImportSourceError(f"{path} is not valid YAML: it holds a date or number that cannot be read") from None
    except RecursionError:
        raise ImportSourceError(f"{path} is not valid YAML: it is nested too deeply") from None
    twitch = config.get("twitch") if isinstance(config, dict) else None
    tokens = twitch.get("tokens") if isinstance(twitch, dict) else None
    if tokens is None:
        raise ImportSourceError(f"{path} has no twitch.tokens section: nothing to migrate")
    if not isinstance(tokens, dict):
        raise ImportSourceError(f"{path}: twitch.tokens must map each login to its tokens")
    if not tokens:
        raise ImportSourceError(f"{path}: twitch.tokens is empty: nothing to migrate")
    spellings = Counter(key.strip().lower() for key in tokens if isinstance(key, str))
    bot_id = twitch.get("bot_id")
    bot_id = str(bot_id) if isinstance(bot_id, (int, str)) and not isinstance(bot_id, bool) else None
    if bot is not None:
        bot_login: str | None = bot.strip().lower()
        if not spellings[bot_login]:
            raise ImportSourceError(f"{path} has no twitch.tokens entry for the bot login {shown(bot)}")
    else:
        section = config.get("bot")
        name = section.get("name") if isinstance(section, dict) else None
        bot_login = name.strip().lower() if isinstance(name, str) else None

    problems: list[str] = []
    parsed: list[TokenEntry] = []
    ids: list[tuple[str, str, str]] = []  # (where, login as written, user_id) of every entry whose user_id reads
    for key, data in tokens.items():
        where = f"twitch.tokens.{shown(key)}"
        if not isinstance(key, str) or not key.strip():
            problems.append(f"{where}: the login must be a non-empty string")
            continue
        entry_problems: list[str] = []
        # Which of two entries for one login is right cannot be known: every copy is refused.
        if spellings[key.strip().lower()] > 1:
            others = [k for k in tokens if isinstance(k, str) and k != key and k.strip().lower() == key.strip().lower()]
            entry_problems.append(f"{where}: duplicate login (also given as {', '.join(map(shown, others))})")
        if not isinstance(data, dict):
            problems.extend(entry_problems)
            problems.append(f"{where}: expected user_id, access_token and refresh_token")
            continue
        user_id = _user_id_field(data.get("user_id"), where, entry_problems)
        if user_id is not None:
            ids.append((where, key.strip(), user_id))
        access = _token_field(data, "access_token", where, entry_problems)
        refresh = _token_field(data, "refresh_token", where, entry_problems)
        scopes = _scopes_field(data.get("scopes"), where, entry_problems)
        is_bot = data.get("is_bot")
        if is_bot is not None and not isinstance(is_bot, bool):
            entry_problems.append(f"{where}: is_bot must be true or false")
        if entry_problems:
            problems.extend(entry_problems)
            continue
        display = key.strip()
        if is_bot is None:
            is_bot = display.lower() == bot_login if bot_login is not None else user_id == bot_id
        parsed.append(
            TokenEntry(
                where=where,
                twitch_user_id=user_id,
                login=display.lower(),
                access_token=access,
                refresh_token=refresh,
                display_name=display,
                scopes=scopes,
                is_bot=is_bot,
            )
        )
    # Every entry's user_id counts, valid entry or not: a missing field does not hide a duplicate id.
    given = Counter(user_id for _, _, user_id in ids)
    for where, name, user_id in ids:
        if given[user_id] > 1:
            others = [other for w, other, i in ids if i == user_id and w != where]
            problems.append(f"{where}: user_id {user_id} is also given for {', '.join(others)}")
    entries = [e for e in parsed if given[e.twitch_user_id] == 1]
    return TokenBatch(path.name, entries, problems, create_users=True, audit_event="tokens_migrated")


def read_token_file(path: str | os.PathLike[str], login: str | None = None) -> TokenBatch:
    """Read a live token file: TwitchIO's ``.tio.tokens.json`` or, with ``login``, pyTwitchAPI's ``user_token.json``.

    TwitchIO's file maps each Twitch user id to ``{"user_id", "token",
    "refresh", "last_validated"}``; its entries go to the existing users with
    those ids. pyTwitchAPI's file is one ``{"token", "refresh"}`` for the
    existing user ``login``. Raises :class:`~kissbot.errors.ImportSourceError`
    if the file is missing, is not JSON, or is neither format.
    """
    path = Path(path)
    text = _read_text(path, "token file")
    try:
        data = json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as exc:
        raise ImportSourceError(f"{path} is not valid JSON: {exc}") from None
    except ValueError as exc:
        lineno = getattr(exc, "lineno", None)
        where = f" (line {lineno}, column {exc.colno})" if lineno is not None else ""
        raise ImportSourceError(f"{path} is not valid JSON{where}") from None
    except RecursionError:
        raise ImportSourceError(f"{path} is not valid JSON: it is nested too deeply") from None
    if not isinstance(data, dict) or not data:
        raise ImportSourceError(f"{path} holds no tokens")
    problems: list[str] = []
    entries: list[TokenEntry] = []
    if "token" in data or "refresh" in data:
        if login is None:
            raise ImportSourceError(f"{path} is a pyTwitchAPI token file: name its user with --login")
        access = _token_field(data, "token", path.name, problems)
        refresh = _token_field(data, "refresh", path.name, problems)
        if not problems:
            entries.append(TokenEntry(path.name, None, login.strip().lower(), access, refresh))
        return TokenBatch(path.name, entries, problems, create_users=False, audit_event="tokens_imported")
    if login is not None:
        raise ImportSourceError(f"{path} is a TwitchIO token file: its users are named by id, drop --login")
    for key, value in data.items():
        where = f"{path.name}[{shown(key)}]"
        entry_problems: list[str] = []
        user_id = _user_id_field(key, where, entry_problems)
        if not isinstance(value, dict):
            problems.append(f"{where}: expected token and refresh")
            continue
        access = _token_field(value, "token", where, entry_problems)
        refresh = _token_field(value, "refresh", where, entry_problems)
        inner = value.get("user_id")
        if inner is not None and user_id is not None and str(inner).strip() != user_id:
            entry_problems.append(f"{where}: user_id {shown(inner)} does not match its key")
        if entry_problems:
            problems.extend(entry_problems)
            continue
        entries.append(TokenEntry(where, user_id, None, access, refresh))
    return TokenBatch(path.name, entries, problems, create_users=False, audit_event="tokens_imported")


# --- applying a batch --------------------------------------------------------------------------


_Known = tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]
"""The store's users that a batch names: by Twitch user id, and by login."""


def _known_users(db: Executor | None, entries: list[TokenEntry]) -> _Known:
    if db is None:
        return {}, {}
    found = UserRepository(db).find_users(
        (e.twitch_user_id for e in entries if e.twitch_user_id), (e.login for e in entries if e.login)
    )
    return {u["twitch_user_id"]: u for u in found}, {u["twitch_login"]: u for u in found}


def _match(known: _Known, entry: TokenEntry, create_users: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The existing user of ``entry`` (None: to be created), or a problem line."""
    by_id = known[0].get(entry.twitch_user_id) if entry.twitch_user_id else None
    by_login = known[1].get(entry.login) if entry.login else None
    if create_users:
        if by_id is not None and by_id["twitch_login"] != entry.login:
            return None, f"{entry.where}: user_id {entry.twitch_user_id} already belongs to login {by_id['twitch_login']!r} in the database"
        if by_login is not None and by_login["twitch_user_id"] != entry.twitch_user_id:
            return None, (
                f"{entry.where}: login {entry.login!r} belongs to Twitch user id {by_login['twitch_user_id']} "
                f"in the database, not {entry.twitch_user_id}"
            )
        return by_id, None
    user = by_id if entry.twitch_user_id else by_login
    if user is None:
        what = f"Twitch user id {entry.twitch_user_id}" if entry.twitch_user_id else f"login {entry.login!r}"
        return None, f"{entry.where}: no user with {what} in the database; skipped"
    return user, None


def apply_batch(
    db: Executor | None, batch: TokenBatch, *, expires_in: int, skip_invalid: bool = False, dry_run: bool = False
) -> ImportReport:
    """Validate ``batch`` against the store ``db`` and store its tokens.

    ``db`` is a session or connection (None: an empty store, for a dry run of
    a database that does not exist yet). Entries that clash with the store (a
    user id owned by another login, a login owned by another user id) join the
    batch's problems: unless ``skip_invalid``, any problem raises
    :class:`~kissbot.errors.InvalidImport` before anything is written. Entries
    for users that do not exist (live token files) are reported and skipped.
    Each user gets exactly one ``batch.audit_event`` without secrets. The
    store is read and written set-wise: one query per 400 entries (or one for
    a store with fewer users than that) finds the users the batch names, and
    the users, tokens and events are written with one statement each, whatever
    the batch's size. The caller owns the
    transaction; with ``dry_run`` nothing is written.
    """
    known = _known_users(db, batch.entries)
    problems = list(batch.problems)
    skipped: list[str] = []
    # The entries to store, and the user each has in the store (None: to be created).
    ready: list[TokenEntry] = []
    users: list[dict[str, Any] | None] = []
    for entry in batch.entries:
        user, problem = _match(known, entry, batch.create_users)
        if problem is None:
            ready.append(entry)
            users.append(user)
        elif batch.create_users:
            problems.append(problem)
        else:
            skipped.append(problem)
    if batch.written_at is not None and db is not None:
        from kissbot.live_tokens import drop_rolled_back

        ready, users = drop_rolled_back(db, batch, ready, users, skipped)
    if problems and not skip_invalid:
        raise InvalidImport(problems)
    created = users.count(None)
    report = ImportReport(
        users_created=created,
        users_updated=len(ready) - created,
        tokens_stored=len(ready),
        errors=problems + skipped,
        dry_run=dry_run,
        logins={
            e.login or (user or {}).get("twitch_login") or e.where: "create" if user is None else "update"
            for e, user in zip(ready, users)
        },
    )
    if not (dry_run or db is None):
        _write(db, batch, ready, users, expires_in)
    return report


def _write(
    db: Executor, batch: TokenBatch, ready: list[TokenEntry], users: list[dict[str, Any] | None], expires_in: int
) -> None:
    # Generators and parallel lists rather than a tuple per entry: fewer objects that
    # live through the write, so fewer full garbage collections (~50 ms each).
    user_repo = UserRepository(db)
    new_ids = user_repo.create_users(
        [
            {"twitch_user_id": e.twitch_user_id, "twitch_login": e.login, "display_name": e.display_name, "is_bot": e.is_bot}
            for e, user in zip(ready, users)
            if user is None
        ]
    )
    user_repo.set_display_names(
        {
            user["id"]: e.display_name
            for e, user in zip(ready, users)
            if user is not None and e.display_name and user["display_name"] != e.display_name
        }
    )
    user_repo.mark_bots(user["id"] for e, user in zip(ready, users) if user is not None and e.is_bot and not user["is_bot"])
    user_ids = [new_ids[e.twitch_user_id] if user is None else user["id"] for e, user in zip(ready, users)]
    logins = [e.login or user["twitch_login"] for e, user in zip(ready, users)]
    TokenRepository(db).store_many_tokens(
        ((user_id, e.access_token, e.refresh_token, e.scopes) for user_id, e in zip(user_ids, ready)),
        expires_in,
        token_type=batch.token_type,
    )
    validated = {user_id: e.last_validated for user_id, e in zip(user_ids, ready) if e.last_validated is not None}
    if validated:
        TokenRepository(db).set_last_validated(validated, token_type=batch.token_type)
    AuditRepository(db).log_events(
        batch.audit_event,
        (
            (user_id, {"login": login, "source": batch.source, "user_created": user is None})
            for user_id, login, user in zip(user_ids, logins, users)
        ),
    )
    if log.isEnabledFor(logging.INFO):
        for login in logins:
            log.info("stored the tokens of %s from %s", login, batch.source)


def import_tokens(
    batch: TokenBatch,
    *,
    db_path: str | os.PathLike[str] = DEFAULT_DB_PATH,
    key_file: str | os.PathLike[str] | None = None,
    url: str | None = None,
    expires_in: int = YAML_EXPIRES_IN,
    skip_invalid: bool = False,
    dry_run: bool = False,
    backup: bool = True,
) -> ImportReport:
    """Apply ``batch`` to a store (see :func:`apply_batch`): the whole run, safely.

    Every entry is checked first, on a read-only look at the store (for a
    database at an older migration, inside the write transaction); an invalid
    batch (unless ``skip_invalid``) raises
    :class:`~kissbot.errors.InvalidImport` with nothing written. Then, if the
    store is an existing SQLite file and ``backup`` is true, a consistent
    backup ``<db>.backup_YYYYMMDD_HHMMSS`` is taken; the database (and key)
    are created if needed (only for ``config.yaml`` batches: live token files
    need existing users, so a missing database raises
    :class:`~kissbot.errors.NoDatabase`), and the entries are written in ONE
    transaction. With ``dry_run`` the same figures are computed and nothing at
    all is written: no database, no key file, no backup.
    """
    from kissbot.manager import DatabaseManager

    def open_store(create: bool) -> DatabaseManager:
        return DatabaseManager(db_path, key_file, url=url, create=create)

    log.info("%s: %d entries to import, %d invalid", batch.source, len(batch.entries), len(batch.problems))
    planned: ImportReport | None = None
    try:
        probe = open_store(create=False)
    except NoDatabase:
        if not batch.create_users:
            raise
        planned = apply_batch(None, batch, expires_in=expires_in, skip_invalid=skip_invalid, dry_run=True)
    except OutdatedSchema:
        # Only the real run may migrate it, after the backup; the entries are
        # checked first on the old schema (its users table is the same), read-only.
        if dry_run:
            raise
        look = read_only_engine(to_url(url if url is not None else db_path))
        try:
            with look.connect() as conn:
                planned = apply_batch(conn, batch, expires_in=expires_in, skip_invalid=skip_invalid, dry_run=True)
        finally:
            look.dispose()
    else:
        with probe, probe.engine.connect() as conn:
            planned = apply_batch(conn, batch, expires_in=expires_in, skip_invalid=skip_invalid, dry_run=True)
    if planned is not None and (dry_run or planned.tokens_stored == 0):
        planned.dry_run = dry_run
        return planned

    notes: list[str] = []
    taken: str | None = None
    path = sqlite_path(to_url(url if url is not None else db_path))
    if backup and path is None:
        notes.append("backup skipped: kissbot backs up SQLite files only; back this database up with its own tools")
    elif backup and path.exists():
        taken = os.fspath(backup_sqlite(path, default_backup_path(path)))
    try:
        with open_store(create=True) as mgr, write_transaction(mgr.engine) as conn:
            report = apply_batch(conn, batch, expires_in=expires_in, skip_invalid=skip_invalid)
    except BaseException:
        if taken is not None:
            os.unlink(taken)  # nothing was written, so the backup of it is not kept either
        raise
    report.backup, report.notes = taken, notes
    return report

