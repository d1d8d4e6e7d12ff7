"""TwitchIO and pyTwitchAPI keep their tokens in kissbot, driven through their real refresh code against the fake Twitch.

Races run real bot processes (tests/_bots.py) on SQLite and PostgreSQL with
single-use refresh tokens: exactly one refresh request reaches the fake per
rotation, every process ends up holding the stored token, and it is live.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_aio import counts

from kissbot import DatabaseManager
from kissbot.aio import AsyncTokenStore
from kissbot.errors import AuthorizationError, TokenRejected

from kissbot.ext.twitchapi import KissbotUserAuth, UnsupportedTwitchAPI
from kissbot.ext.twitchio import KissbotTokens, UnsupportedTwitchIO

BOTS = Path(__file__).resolve().parent / "_bots.py"
TWITCH_ID, LOGIN = "1209350837", "serda_bot"
TIMEOUT = 60
TOKEN_FILES = (".tio.tokens.json", "user_token.json")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def twitch(fake_twitch):
    """The fake Twitch with single-use refresh tokens and a little latency, so racers overlap."""
    fake_twitch.single_use_refresh = True
    fake_twitch.latency = 0.05
    return fake_twitch


def seed(mgr: DatabaseManager, twitch, *, expired: bool, expires_in: int = 14400) -> Any:
    """A live token of serda_bot at the fake, stored in kissbot (its access token expired at the fake if ``expired``)."""
    token = twitch.mint(LOGIN, TWITCH_ID, ["chat:read", "chat:edit"])
    if expired:
        twitch.expire(token.access_token)
    user = mgr.get_user(TWITCH_ID)
    user_id = user["id"] if user else mgr.create_user(TWITCH_ID, LOGIN, is_bot=True)
    mgr.store_tokens(user_id, token.access_token, token.refresh_token, expires_in, ["chat:read", "chat:edit"])
    return token


def start_bot(library: str, scenario: str, store_url: str, key_file: Path, twitch, go: Path, cwd: Path) -> subprocess.Popen:
    args = [
        sys.executable, str(BOTS), library, scenario, "--url", store_url, "--key-file", str(key_file),
        "--fake", twitch.base_url, "--client-id", twitch.client_id, "--twitch-id", TWITCH_ID, "--go", str(go),
    ]
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc


def wait_ready(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"bot did not start: {line}{proc.stderr.read()}")


def held_by(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])["holds"]


def assert_one_rotation(mgr: DatabaseManager, twitch, spent: str, holders: list[str]) -> None:
    assert twitch.refreshes_per_token() == {spent: 1}, "exactly one refresh request reached Twitch"
    stored = mgr.get_tokens_by_twitch_id(TWITCH_ID)
    assert stored["refresh_token"] != spent and not stored["needs_reauth"]
    assert stored["version"] == 2, "the rotation was stored once, and nothing stored over it"
    assert stored["scopes"] == ["chat:read", "chat:edit"]
    assert twitch.is_live(stored["access_token"])
    assert holders == [digest(stored["access_token"])] * len(holders), "every process holds the stored token"


@pytest.mark.parametrize(
    ("library", "scenario"),
    [("twitchio", "add"), ("twitchio", "helix401"), ("twitchio", "validate"), ("twitchapi", "add"), ("twitchapi", "helix401")],
)
def test_two_bot_processes_racing_spend_a_single_use_refresh_token_once(
    library, scenario, mgr, store_url, key_file, twitch, tmp_path
):
    token = seed(mgr, twitch, expired=scenario == "add")
    go = tmp_path / "go"
    bots = [start_bot(library, scenario, store_url, key_file, twitch, go, tmp_path) for _ in range(2)]
    try:
        wait_ready(bots)
        if scenario != "add":
            twitch.expire(token.access_token)
        go.touch()
        holders = [held_by(bot) for bot in bots]
    finally:
        for bot in bots:
            bot.kill()
    assert_one_rotation(mgr, twitch, token.refresh_token, holders)
    assert not [f for f in TOKEN_FILES if (tmp_path / f).exists()]


@pytest.mark.parametrize("library", ["twitchio", "twitchapi"])
def test_a_bot_racing_the_refresh_worker_spends_the_refresh_token_once(
    library, mgr, store_url, key_file, twitch, tmp_path
):
    token = seed(mgr, twitch, expired=True, expires_in=30)  # due for the worker too
    go = tmp_path / "go"
    bot = start_bot(library, "add", store_url, key_file, twitch, go, tmp_path)
    env = {**os.environ, **twitch.env(), "TWITCH_CLIENT_SECRET": "app-secret"}
    worker_args = [sys.executable, "-m", "kissbot", "refresh-worker", "--once", "--url", store_url,
                   "--key-file", str(key_file), "--validate-interval", "1e9"]
    try:
        wait_ready([bot])
        go.touch()
        worker = subprocess.run(worker_args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
        holders = [held_by(bot)]
    finally:
        bot.kill()
    assert worker.returncode == 0, worker.stderr
    assert_one_rotation(mgr, twitch, token.refresh_token, holders)
    assert not [f for f in TOKEN_FILES if (tmp_path / f).exists()]


# --- in one process -----------------------------------------------------------------------------


def twitchio_client(store: Any, twitch, base: str = "client") -> Any:
    import twitchio
    from twitchio.ext import commands
    from twitchio.http import Route

    Route.BASE, Route.ID_BASE = f"{twitch.base_url}/helix/", f"{twitch.base_url}/"
    options: dict[str, Any] = {"prefix": "!"} if base == "commands" else {}

    class Bot(KissbotTokens, commands.Bot if base == "commands" else twitchio.Client):  # type: ignore[misc]
        pass

    return Bot(token_store=store, client_id=twitch.client_id, client_secret="app-secret", bot_id=TWITCH_ID,
               fetch_client_user=False, **options)


@pytest.mark.parametrize("base", ["client", "commands"])
def test_twitchio_loads_stored_tokens_stores_new_authorisations_and_writes_nothing_on_close(
    mgr, twitch, tmp_path, monkeypatch, base
):
    monkeypatch.chdir(tmp_path)
    token = seed(mgr, twitch, expired=False)
    (tmp_path / ".tio.tokens.json").write_text("{}")  # a stale file TwitchIO would read: ignored
    broadcaster = twitch.mint("some_streamer", "4242", ["channel:read:subscriptions"])

    async def main() -> dict[str, Any]:
        bot = twitchio_client(mgr, twitch, base)
        await bot.login(token="app-token")
        held = {uid: data["token"] for uid, data in bot.tokens.items()}
        await bot.event_oauth_authorized({"access_token": broadcaster.access_token, "refresh_token": broadcaster.refresh_token})
        await bot.close()
        return held

    assert asyncio.run(main()) == {TWITCH_ID: token.access_token}
    assert (tmp_path / ".tio.tokens.json").read_text() == "{}"
    assert twitch.refreshes_per_token() == {}
    assert mgr.get_tokens_by_twitch_id(TWITCH_ID)["last_validated"] is not None
    new = mgr.get_tokens_by_twitch_id("4242", token_type="broadcaster")
    assert (new["access_token"], new["scopes"]) == (broadcaster.access_token, ["channel:read:subscriptions"])
    assert mgr.get_user("4242")["twitch_login"] == "some_streamer"


def test_twitchio_a_rejected_refresh_marks_reauth_and_drops_the_token(mgr, twitch, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    token = seed(mgr, twitch, expired=True)
    twitch.revoke(token.refresh_token)

    async def main() -> dict[str, Any]:
        bot = twitchio_client(mgr, twitch)
        await bot.login(token="app-token")
        held = dict(bot.tokens)
        await bot.close()
        return held

    assert asyncio.run(main()) == {}
    stored = mgr.get_tokens_by_twitch_id(TWITCH_ID)
    assert stored["needs_reauth"] and stored["refresh_token"] == token.refresh_token
    assert mgr.get_audit_log(1)[0]["event_type"] == "token_refresh_rejected"
    assert not (tmp_path / ".tio.tokens.json").exists()


def test_twitchapi_a_400_on_refresh_is_a_typed_error_and_keeps_the_tokens(mgr, twitch, tmp_path, monkeypatch):
    from twitchAPI.twitch import Twitch
    from twitchAPI.type import AuthScope

    monkeypatch.chdir(tmp_path)
    token = seed(mgr, twitch, expired=True)
    twitch.revoke(token.refresh_token)

    async def refuse(*_: Any) -> tuple[str, str]:
        raise AssertionError("no new authorisation in this test")

    async def main() -> None:
        api = Twitch(twitch.client_id, "app-secret", authenticate_app=False,
                     base_url=f"{twitch.base_url}/helix/", auth_base_url=f"{twitch.base_url}/oauth2/")
        auth = KissbotUserAuth(api, mgr, twitch_user_id=TWITCH_ID, scopes=[AuthScope.CHAT_READ],
                               auth_generator_func=refuse)
        with pytest.raises(AssertionError, match="no new authorisation"):
            await auth.bind()
        with pytest.raises(TokenRejected, match=r"^the bot tokens of serda_bot need reauthorisation$"):
            await api.set_user_authentication(token.access_token, [AuthScope.CHAT_READ], token.refresh_token)

    asyncio.run(main())
    stored = mgr.get_tokens_by_twitch_id(TWITCH_ID)
    assert stored["needs_reauth"] and (stored["access_token"], stored["refresh_token"]) == (
        token.access_token, token.refresh_token
    )
    assert twitch.refreshes_per_token() == {token.refresh_token: 1}
    assert not (tmp_path / "user_token.json").exists()


def test_twitchapi_runs_its_authenticator_when_the_store_has_no_token_and_stores_the_answer(mgr, twitch, tmp_path, monkeypatch):
    from twitchAPI.twitch import Twitch
    from twitchAPI.type import AuthScope

    monkeypatch.chdir(tmp_path)
    fresh = twitch.mint(LOGIN, TWITCH_ID, ["chat:read"])

    async def authorise(api: Any, scopes: list[AuthScope]) -> tuple[str, str]:
        return fresh.access_token, fresh.refresh_token

    async def main() -> str | None:
        api = Twitch(twitch.client_id, "app-secret", authenticate_app=False,
                     base_url=f"{twitch.base_url}/helix/", auth_base_url=f"{twitch.base_url}/oauth2/")
        async with AsyncTokenStore(manager=mgr) as store:
            await KissbotUserAuth(api, store, twitch_user_id=TWITCH_ID, scopes=[AuthScope.CHAT_READ],
                                  auth_generator_func=authorise).bind()
        return api.get_user_auth_token()

    assert asyncio.run(main()) == fresh.access_token
    stored = mgr.get_tokens_by_twitch_id(TWITCH_ID)
    assert (stored["refresh_token"], stored["scopes"]) == (fresh.refresh_token, ["chat:read"])
    assert mgr.get_user(TWITCH_ID)["is_bot"]
    assert not (tmp_path / "user_token.json").exists()


def test_an_unknown_twitch_user_is_a_typed_error_at_bind(mgr, twitch):
    from twitchAPI.twitch import Twitch
    from twitchAPI.type import AuthScope

    async def refuse(*_: Any) -> tuple[str, str]:
        return "x", "y"

    async def main() -> None:
        api = Twitch(twitch.client_id, "app-secret", authenticate_app=False,
                     base_url=f"{twitch.base_url}/helix/", auth_base_url=f"{twitch.base_url}/oauth2/")
        auth = KissbotUserAuth(api, mgr, twitch_user_id="42", scopes=[AuthScope.CHAT_READ], auth_generator_func=refuse)
        with pytest.raises(AuthorizationError, match=r"^Twitch refused the new authorisation of Twitch user '42'$"):
            await auth.bind()

    before = counts(mgr)
    asyncio.run(main())
    assert counts(mgr) == before


def test_the_integrations_refuse_library_versions_without_their_hooks(mgr):
    class NotTwitchIO:
        def __init__(self, **kwargs: Any) -> None:
            self._http = object()

    class Bot(KissbotTokens, NotTwitchIO):
        pass

    with pytest.raises(UnsupportedTwitchIO, match=r"^kissbot.ext.twitchio supports twitchio 3.3.x; the installed"):
        Bot(token_store=mgr)

    class NotTwitch:
        auth_base_url = ""

    auth = KissbotUserAuth(NotTwitch(), mgr, twitch_user_id=TWITCH_ID, scopes=[])  # type: ignore[arg-type]
    with pytest.raises(UnsupportedTwitchAPI, match=r"^kissbot.ext.twitchapi supports twitchAPI 4.5.x; the installed"):
        asyncio.run(auth.bind())
