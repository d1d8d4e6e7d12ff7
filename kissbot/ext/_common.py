"""What the library integrations share: the stored tokens a bot loads, and storing a new authorisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kissbot.manager import DatabaseManager
from kissbot.repo import TokenRepository, UserRepository


@dataclass(frozen=True)
class StoredRow:
    """Which token row a library's token came from."""

    twitch_user_id: str
    user_id: int
    login: str
    token_type: str


def usable_tokens(manager: DatabaseManager, twitch_user_id: str | None = None) -> list[tuple[StoredRow, dict[str, Any]]]:
    """Every token row not needing reauthorisation (of one Twitch user, if given), decrypted, ``bot`` rows first."""
    twitch_ids = {u["id"]: u["twitch_user_id"] for u in manager.list_users()}
    rows = [r for r in manager.list_tokens() if not r["needs_reauth"]]
    if twitch_user_id is not None:
        rows = [r for r in rows if twitch_ids[r["user_id"]] == str(twitch_user_id)]
    found = []
    for row in sorted(rows, key=lambda r: r["token_type"] != "bot"):
        tokens = manager.get_tokens(row["user_id"], token_type=row["token_type"])
        if tokens is not None:
            stored = StoredRow(twitch_ids[row["user_id"]], row["user_id"], row["twitch_login"], row["token_type"])
            found.append((stored, tokens))
    return found


def store_authorization(
    manager: DatabaseManager,
    twitch_user_id: str,
    login: str,
    access_token: str,
    refresh_token: str,
    expires_in: int,
    scopes: list[str],
    *,
    token_type: str,
) -> StoredRow:
    """Store tokens a user just authorised (creating the user if needed), validated now, in one transaction."""
    with manager.session() as session:
        users = UserRepository(session)
        user = users.get_user(twitch_user_id)
        user_id = user["id"] if user else users.create_user(twitch_user_id, login, is_bot=token_type == "bot")
        tokens = TokenRepository(session)
        tokens.store_tokens(user_id, access_token, refresh_token, expires_in, scopes, token_type=token_type)
        tokens.record_validation(user_id, token_type=token_type)
    return StoredRow(str(twitch_user_id), user_id, login.lower(), token_type)
