"""`kissbot import-tio` on token files that TwitchIO and pyTwitchAPI wrote themselves (against the fake Twitch)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.twitch import VALIDATE_URL_ENV

BOT, STREAMER = ("serda_bot", "1209350837"), ("el_serda", "44456636")


@pytest.fixture
def runner(fake_twitch) -> CliRunner:
    return CliRunner(env={VALIDATE_URL_ENV: fake_twitch.validate_url})


@pytest.fixture
def store(store_url: str, key_file: Path) -> list[str]:
    """The options naming an existing, empty store."""
    DatabaseManager(url=store_url, key_file=key_file).close()
    return ["--url", store_url, "--key-file", str(key_file), "--no-backup"]


def twitchio_wrote(fake_twitch, directory: Path, *tokens) -> Path:
    """``.tio.tokens.json`` as TwitchIO saves it on close, holding ``tokens``."""
    import twitchio
    from twitchio.http import Route

    Route.BASE, Route.ID_BASE = f"{fake_twitch.base_url}/helix/", f"{fake_twitch.base_url}/"

    async def main() -> None:
        client = twitchio.Client(client_id=fake_twitch.client_id, client_secret="app-secret")
        await client.login(token="app-token", load_tokens=False)
        for token in tokens:
            await client.add_token(token.access_token, token.refresh_token)
        await client.close()  # TwitchIO's save-on-close writes the file

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)  # TwitchIO saves to .tio.tokens.json in the working directory
        asyncio.run(main())
    return directory / ".tio.tokens.json"


def pytwitchapi_wrote(fake_twitch, directory: Path, token) -> Path:
    """``user_token.json`` as pyTwitchAPI's UserAuthenticationStorageHelper writes it."""
    from twitchAPI.oauth import UserAuthenticationStorageHelper
    from twitchAPI.twitch import Twitch
    from twitchAPI.type import AuthScope

    async def authorise(twitch, scopes):
        return token.access_token, token.refresh_token

    async def main() -> None:
        twitch = Twitch(fake_twitch.client_id, "app-secret", authenticate_app=False,
                        base_url=f"{fake_twitch.base_url}/helix/", auth_base_url=f"{fake_twitch.base_url}/oauth2/")
        helper = UserAuthenticationStorageHelper(twitch, [AuthScope.CHAT_READ], storage_path=directory / "user_token.json",
                                                 auth_generator_func=authorise)
        await helper.bind()

    asyncio.run(main())
    return directory / "user_token.json"


def test_create_users_learns_logins_and_keeps_twitchios_last_validated(runner, store, store_url, key_file, fake_twitch, tmp_path):
    tokens = [fake_twitch.mint(*BOT, ["chat:read"]), fake_twitch.mint(*STREAMER, ["channel:read:subscriptions"])]
    path = twitchio_wrote(fake_twitch, tmp_path, *tokens)
    saved = json.loads(path.read_text())
    validations = fake_twitch.requests["/oauth2/validate"]
    result = runner.invoke(cli, ["import-tio", str(path), "--create-users", *store])
    assert result.exit_code == 0, result.output
    assert result.stdout == "users_created: 2\nusers_updated: 0\ntokens_stored: 2\nerrors: 0\n"
    assert fake_twitch.requests["/oauth2/validate"] == validations + 2, "one validate call per token"
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        for (login, twitch_id), token in zip((BOT, STREAMER), tokens):
            assert mgr.get_user(twitch_id)["twitch_login"] == login
            stored = mgr.get_tokens_by_twitch_id(twitch_id)
            assert (stored["access_token"], stored["refresh_token"]) == (token.access_token, token.refresh_token)
            twitchio_time = datetime.fromisoformat(saved[twitch_id]["last_validated"]).astimezone(timezone.utc)
            assert stored["last_validated"] == twitchio_time


def test_token_type_broadcaster_and_a_pytwitchapi_file_without_login(runner, store, store_url, key_file, fake_twitch, tmp_path):
    token = fake_twitch.mint(*STREAMER, ["chat:read"])
    path = pytwitchapi_wrote(fake_twitch, tmp_path, token)
    result = runner.invoke(cli, ["import-tio", str(path), "--create-users", "--token-type", "broadcaster", *store])
    assert result.exit_code == 0, result.output
    assert result.stdout == "users_created: 1\nusers_updated: 0\ntokens_stored: 1\nerrors: 0\n"
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_tokens_by_twitch_id(STREAMER[1]) is None
        stored = mgr.get_tokens_by_twitch_id(STREAMER[1], token_type="broadcaster")
        assert stored["access_token"] == token.access_token and not mgr.get_user(STREAMER[1])["is_bot"]


def test_an_entry_refreshed_after_the_file_was_written_is_skipped_unless_forced(
    runner, store, store_url, key_file, fake_twitch, tmp_path
):
    path = twitchio_wrote(fake_twitch, tmp_path, fake_twitch.mint(*BOT, ["chat:read"]))
    assert runner.invoke(cli, ["import-tio", str(path), "--create-users", *store]).exit_code == 0
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        user_id = mgr.get_user(BOT[1])["id"]
        mgr.store_tokens(user_id, "newer-access", "newer-refresh", 14400)  # a bot refreshed since
        stored = mgr.get_tokens(user_id)
    result = runner.invoke(cli, ["import-tio", str(path), *store])
    assert result.exit_code == 1
    written = f"{stored['last_refresh']:%Y-%m-%d %H:%M:%S}"
    file_time = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
    assert result.stdout == (
        "users_created: 0\nusers_updated: 0\ntokens_stored: 0\nerrors: 1\n"
        f"  - .tio.tokens.json[{BOT[1]}]: the stored bot tokens of serda_bot were written at {written} UTC, "
        f"after .tio.tokens.json ({file_time:%Y-%m-%d %H:%M:%S} UTC); kept them (--force overrides)\n"
    )
    assert result.stderr == f"Error: nothing to import from {path}: every entry was skipped (see above)\n"
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_tokens(user_id)["access_token"] == "newer-access"
    forced = runner.invoke(cli, ["import-tio", str(path), "--force", *store])
    assert forced.exit_code == 0, forced.output
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_tokens(user_id)["access_token"] != "newer-access"


def test_a_token_twitch_refuses_cannot_create_its_user_and_nothing_is_written(
    runner, store, store_url, key_file, fake_twitch, tmp_path
):
    token = fake_twitch.mint(*BOT, ["chat:read"])
    path = pytwitchapi_wrote(fake_twitch, tmp_path, token)
    fake_twitch.expire(token.access_token)
    result = runner.invoke(cli, ["import-tio", str(path), "--create-users", *store])
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: user_token.json: Twitch refused its access token (401), so its user is unknown; "
        "let the bot refresh it, or create the user with kissbot user add\n"
    )
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.list_users() == [] and mgr.list_tokens() == []
