"""Token files that TwitchIO (``.tio.tokens.json``) and pyTwitchAPI (``user_token.json``) wrote themselves.

:func:`read_live_tokens` reads one for ``kissbot import-tio`` on top of
:func:`kissbot.importers.read_token_file`: it keeps TwitchIO's
``last_validated``, learns the login and Twitch user id of each token with one
``/validate`` call when users are to be created, and records when the file was
last written, so that :func:`kissbot.importers.apply_batch` never rolls a row
back to the file's older tokens (:func:`drop_rolled_back`).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import inspect

from kissbot import __version__
from kissbot.errors import ImportSourceError
from kissbot.importers import TokenBatch, TokenEntry, read_token_file
from kissbot.repo import Executor, TokenRepository
from kissbot.twitch import DEFAULT_VALIDATE_URL


def read_live_tokens(
    path: str | os.PathLike[str],
    *,
    login: str | None = None,
    create_users: bool = False,
    token_type: str = "bot",
    force: bool = False,
    validate_url: str = DEFAULT_VALIDATE_URL,
) -> TokenBatch:
    """Read a TwitchIO or pyTwitchAPI token file for import as ``token_type`` tokens.

    TwitchIO's ``last_validated`` (its local time) is kept. With
    ``create_users``, users missing from the store are created: each token is
    validated once at ``validate_url`` for its login and Twitch user id
    (pyTwitchAPI's file then needs no ``login``); a token Twitch refuses, or
    whose id differs from the file's, is an invalid entry. Unless ``force``,
    entries whose stored tokens were written after the file was are skipped.
    """
    path = Path(path)
    pytwitchapi_without_login = create_users and login is None and _is_pytwitchapi(path)
    batch = read_token_file(path, login="" if pytwitchapi_without_login else login)
    problems = list(batch.problems)
    raw = {key.strip(): value for key, value in json.loads(path.read_text(encoding="utf-8")).items()}
    entries = []
    for entry in batch.entries:
        if entry.twitch_user_id is not None:  # TwitchIO's file: keyed by Twitch user id
            validated = _last_validated(raw[entry.twitch_user_id].get("last_validated"), entry.where, problems)
            entry = replace(entry, last_validated=validated)
        entries.append(entry)
    if create_users:
        entries = _identify(entries, validate_url, problems)
    try:
        written_at = None if force else datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    except OSError as exc:
        raise ImportSourceError(f"cannot read {path}: {exc.strerror}") from None
    return replace(
        batch, entries=entries, problems=problems, create_users=create_users, token_type=token_type, written_at=written_at
    )


def drop_rolled_back(
    db: Executor, batch: TokenBatch, ready: list[TokenEntry], users: list[dict[str, Any] | None], skipped: list[str]
) -> tuple[list[TokenEntry], list[dict[str, Any] | None]]:
    """The entries of ``ready`` (and their users) whose stored tokens are older than the file; a line in ``skipped`` for each other."""
    assert batch.written_at is not None
    if "last_refresh" not in {c["name"] for c in inspect(db).get_columns("oauth_tokens")}:
        # A store before migration 0002 (import_tokens' look before migrating it): no
        # kissbot process refreshed its tokens; the write, once migrated, checks again.
        return ready, users
    known = [user["id"] for user in users if user is not None]
    written = TokenRepository(db).written_at(known, token_type=batch.token_type) if known else {}
    kept_entries, kept_users = [], []
    for entry, user in zip(ready, users):
        stored = written.get(user["id"]) if user is not None else None
        if stored is not None and stored > batch.written_at:
            skipped.append(
                f"{entry.where}: the stored {batch.token_type} tokens of {user['twitch_login']} were written at "
                f"{stored:%Y-%m-%d %H:%M:%S} UTC, after {batch.source} ({batch.written_at:%Y-%m-%d %H:%M:%S} UTC); "
                "kept them (--force overrides)"
            )
        else:
            kept_entries.append(entry)
            kept_users.append(user)
    return kept_entries, kept_users


def _is_pytwitchapi(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # read_token_file names the problem
    return isinstance(data, dict) and ("token" in data or "refresh" in data)


def _last_validated(value: Any, where: str, problems: list[str]) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        when = None
    if when is None:
        problems.append(f"{where}: last_validated must be an ISO date and time")
        return None
    # TwitchIO writes datetime.now(): the local time of the machine, without zone.
    return when.astimezone(timezone.utc)


def _identify(entries: list[TokenEntry], validate_url: str, problems: list[str]) -> list[TokenEntry]:
    """Each entry with the login and Twitch user id Twitch gives for its access token."""
    identified = []
    with httpx.Client(timeout=10, headers={"User-Agent": f"kissbot/{__version__}"}) as http:
        for entry in entries:
            try:
                answer = http.get(validate_url, headers={"Authorization": f"OAuth {entry.access_token}"})
            except httpx.HTTPError as exc:
                raise ImportSourceError(
                    f"cannot reach Twitch at {validate_url} to learn the users' logins ({type(exc).__name__})"
                ) from None
            body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
            user_id, login = body.get("user_id"), body.get("login")
            if answer.status_code != 200 or not (isinstance(user_id, str) and isinstance(login, str)):
                problems.append(
                    f"{entry.where}: Twitch refused its access token ({answer.status_code}), so its user is unknown; "
                    "let the bot refresh it, or create the user with kissbot user add"
                )
            elif entry.twitch_user_id is not None and entry.twitch_user_id != user_id:
                problems.append(f"{entry.where}: its access token belongs to Twitch user id {user_id}")
            elif entry.login and entry.login != login.lower():
                problems.append(f"{entry.where}: its access token belongs to {login.lower()}, not {entry.login}")
            else:
                identified.append(replace(entry, twitch_user_id=user_id, login=login.lower()))
    return identified
