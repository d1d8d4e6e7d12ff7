"""`kissbot auth` and kissbot.auth: the Device Code and authorization code flows against the fake Twitch."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from kissbot import DatabaseManager
from kissbot.auth import Authorization, TwitchAuth, TwitchTokens, authorize, obtain_tokens, store_authorization
from kissbot.cli import cli
from kissbot.errors import AuthorizationDenied, WrongTwitchAccount
from kissbot.types import utcnow

LOGIN, TWITCH_ID = "serda_bot", "1209350837"
CLI = [sys.executable, "-c", "from kissbot.cli import cli; cli()"]
TIMEOUT = 60


@pytest.fixture
def twitch(fake_twitch):
    fake_twitch.device_interval = 0
    return fake_twitch


def run(twitch, store_url: str, key_file: Path, *args: str, env: dict | None = None):
    full_env = {**twitch.env(), "TWITCH_CLIENT_SECRET": None, **(env or {})}
    return CliRunner().invoke(cli, ["auth", *args, "--url", store_url, "--key-file", str(key_file)], env=full_env)


def snapshot(mgr: DatabaseManager) -> tuple:
    """Every row of every kissbot table, as stored (ciphertext included)."""
    with mgr.engine.connect() as conn:
        return tuple(
            tuple(map(tuple, conn.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()))
            for table in ("users", "oauth_tokens", "audit_log", "config")
        )


def digests(directory: Path) -> dict[str, str]:
    """Every file of ``directory`` by name, with the SHA-256 of its content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def device_lines(twitch, login: str = LOGIN, token_type: str = "bot", scopes: str = "chat:read chat:edit") -> list[str]:
    user_code = twitch.device_codes[-1][1]
    return [
        f"Authorizing {login} ({token_type} token, scopes {scopes}).",
        f"Open {twitch.base_url}/activate?public=true&device-code={user_code}",
        f"and enter the code {user_code} (it expires in 30 min).",
        "Waiting for the authorization on Twitch (Ctrl-C to cancel)...",
    ]


def test_device_flow_creates_the_user_and_stores_encrypted_tokens(mgr, twitch, store_url, key_file):
    twitch.login_as(LOGIN, TWITCH_ID)
    before = utcnow()
    result = run(twitch, store_url, key_file, LOGIN, "--scopes", "chat:read,chat:edit")
    after = utcnow()
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        *device_lines(twitch),
        f"Authorized {LOGIN} (Twitch id {TWITCH_ID}, user created): bot tokens stored, "
        "scopes chat:read chat:edit, expiring in 14400 s",
    ]
    [(device_code, _user_code)] = twitch.device_codes
    access, refresh = twitch.issued
    for secret in (access, refresh, device_code):
        assert secret not in result.output
    user = mgr.get_user(TWITCH_ID)
    assert (user["twitch_login"], user["is_bot"]) == (LOGIN, True)
    tokens = mgr.get_tokens(user["id"])
    assert (tokens["access_token"], tokens["refresh_token"]) == (access, refresh)
    assert tokens["scopes"] == ["chat:read", "chat:edit"]
    assert (tokens["needs_reauth"], tokens["status"]) == (False, "valid")
    assert before + timedelta(seconds=14399) <= tokens["expires_at"] <= after + timedelta(seconds=14400)
    assert twitch.is_live(access)
    [event] = mgr.get_audit_log(event_type="tokens_authorized")
    assert (event["user_id"], event["details"]) == (user["id"], {
        "login": LOGIN, "token_type": "bot", "scopes": ["chat:read", "chat:edit"], "expires_in": 14400,
        "flow": "device_code",
    })
    with mgr.engine.connect() as conn:
        stored = " ".join(map(str, conn.execute(text("SELECT * FROM oauth_tokens")).one()))
        audit = " ".join(map(str, conn.execute(text("SELECT * FROM audit_log")).all()))
    for secret in (access, refresh, device_code):
        assert secret not in stored and secret not in audit


def test_no_plaintext_token_in_any_file(tmp_path, twitch, sqlite_url, key_file):
    DatabaseManager(url=sqlite_url, key_file=key_file).close()
    twitch.login_as(LOGIN, TWITCH_ID)
    assert run(twitch, sqlite_url, key_file, LOGIN, "--scopes", "chat:read").exit_code == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"kissbot.db", ".kissbot.key"}
    for path in files:
        data = path.read_bytes()
        for secret in twitch.issued:
            assert secret.encode() not in data, path


def test_pending_polls_then_success(mgr, twitch, store_url, key_file):
    twitch.device_answers = ["authorization_pending"] * 3
    twitch.login_as(LOGIN, TWITCH_ID)
    result = run(twitch, store_url, key_file, LOGIN, "--scopes", "chat:read")
    assert result.exit_code == 0, result.output
    assert twitch.requests["/oauth2/token"] == 4
    assert [f["grant_type"] for f in twitch.token_forms] == ["urn:ietf:params:oauth:grant-type:device_code"] * 4
    assert mgr.get_tokens(mgr.get_user(TWITCH_ID)["id"])["access_token"] == twitch.issued[0]


def test_slow_down_adds_five_seconds_to_the_interval(mgr, fake_twitch):
    fake_twitch.device_interval = 2
    fake_twitch.device_answers = ["authorization_pending", "slow_down", "authorization_pending", "slow_down"]
    fake_twitch.login_as(LOGIN, TWITCH_ID)
    waits: list[float] = []
    with TwitchAuth.from_env(sleep=waits.append, **_urls(fake_twitch)) as auth:
        done = authorize(mgr, auth, LOGIN, ["chat:read"])
    assert waits == [2, 2, 7, 7, 12]
    assert (done.login, done.twitch_user_id, done.user_created, done.scopes) == (LOGIN, TWITCH_ID, True, ("chat:read",))


def _urls(twitch) -> dict[str, str]:
    return {
        "client_id": twitch.client_id, "token_url": twitch.token_url, "validate_url": twitch.validate_url,
        "device_url": twitch.device_url, "authorize_url": twitch.authorize_url,
    }


@pytest.mark.parametrize(
    "ending, message",
    [
        ("access_denied", "the authorization was denied on Twitch: nothing stored"),
        ("expired_token", "the device code expired before the authorization was granted: nothing stored"),
        ("deny", "the authorization was denied on Twitch: nothing stored"),
    ],
)
def test_a_refused_or_expired_authorization_stores_nothing(tmp_path, mgr, twitch, store_url, key_file, ending, message):
    if ending == "deny":
        twitch.deny()
    else:
        twitch.device_answers = ["authorization_pending", ending]
    before, files = snapshot(mgr), digests(tmp_path)
    result = run(twitch, store_url, key_file, LOGIN, "--scopes", "chat:read")
    assert result.exit_code == 1
    assert result.output.splitlines() == [*device_lines(twitch, scopes="chat:read"), f"Error: {message}"]
    assert (snapshot(mgr), digests(tmp_path)) == (before, files)


def test_a_token_for_another_login_is_refused(tmp_path, mgr, twitch, store_url, key_file):
    twitch.login_as("other_bot", "42")
    before, files = snapshot(mgr), digests(tmp_path)
    result = run(twitch, store_url, key_file, LOGIN, "--scopes", "chat:read")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        "Error: the token Twitch issued belongs to 'other_bot', not 'serda_bot': "
        "log in to Twitch as that account and try again; nothing stored"
    )
    assert (snapshot(mgr), digests(tmp_path)) == (before, files)
    for secret in twitch.issued:
        assert secret not in result.output


def test_a_stored_login_with_another_twitch_id_is_refused(mgr, bot):
    authorization = Authorization(TwitchTokens("a", "r", 3600, ("chat:read",)), LOGIN, "999", LOGIN, "device_code")
    before = snapshot(mgr)
    with pytest.raises(WrongTwitchAccount, match=f"^user 'serda_bot' is stored with Twitch id {TWITCH_ID}, but Twitch"):
        store_authorization(mgr, authorization)
    assert snapshot(mgr) == before


def test_reauthorizing_clears_needs_reauth_and_keeps_the_user(mgr, bot, twitch, store_url, key_file):
    mgr.store_tokens(bot, "old-access", "old-refresh", 3600, ["chat:read", "chat:edit"])
    mgr.mark_tokens_expired(bot)
    twitch.login_as(LOGIN, TWITCH_ID)
    result = run(twitch, store_url, key_file, LOGIN)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        f"Authorized {LOGIN} (Twitch id {TWITCH_ID}): bot tokens stored, scopes chat:read chat:edit, expiring in 14400 s"
    )
    assert twitch.device_codes and twitch.token_forms[0]["scopes"] == "chat:read chat:edit", "the stored scopes"
    tokens = mgr.get_tokens(bot)
    assert (tokens["access_token"], tokens["needs_reauth"], tokens["version"]) == (twitch.issued[0], False, 2)
    assert len(mgr.list_users()) == 1


def test_needing_reauth_walks_every_flagged_token(mgr, bot, twitch, store_url, key_file):
    mgr.store_tokens(bot, "a1", "r1", 3600, ["chat:read"])
    mgr.store_tokens(bot, "a2", "r2", 3600, ["channel:read:subscriptions"], token_type="broadcaster")
    other = mgr.create_user("77", "fine_bot", is_bot=True)
    mgr.store_tokens(other, "a3", "r3", 3600)
    result = run(twitch, store_url, key_file, "--needing-reauth")
    assert (result.exit_code, result.output) == (0, "No token needs reauthorization.\n")
    mgr.mark_tokens_expired(bot)
    mgr.mark_tokens_expired(bot, token_type="broadcaster")
    twitch.login_as(LOGIN, TWITCH_ID)
    result = run(twitch, store_url, key_file, "--needing-reauth")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line for line in lines if line.startswith(("Authorizing", "Authorized"))] == [
        f"Authorizing {LOGIN} (bot token, scopes chat:read).",
        f"Authorized {LOGIN} (Twitch id {TWITCH_ID}): bot tokens stored, scopes chat:read, expiring in 14400 s",
        f"Authorizing {LOGIN} (broadcaster token, scopes channel:read:subscriptions).",
        f"Authorized {LOGIN} (Twitch id {TWITCH_ID}): broadcaster tokens stored, scopes channel:read:subscriptions, "
        "expiring in 14400 s",
    ]
    assert [mgr.get_tokens(bot, token_type=t)["needs_reauth"] for t in ("bot", "broadcaster")] == [False, False]
    assert mgr.get_tokens(other)["version"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Error: give either LOGIN or --needing-reauth"),
        ([LOGIN, "--needing-reauth"], "Error: give either LOGIN or --needing-reauth"),
        ([LOGIN], "Error: serda_bot has no stored bot token to take the scopes from: give --scopes"),
        (["bad login!", "--scopes", "chat:read"], "Error: 'bad login!' is not a Twitch login (1 to 25 letters, digits or _)"),
    ],
)
def test_bad_arguments_are_one_line_errors(mgr, twitch, store_url, key_file, args, message):
    before = snapshot(mgr)
    result = run(twitch, store_url, key_file, *args)
    assert (result.exit_code, result.output) == (1, message + "\n")
    assert snapshot(mgr) == before and twitch.requests == {}


def test_credentials_and_database_are_checked_before_asking_twitch(tmp_path, twitch, sqlite_url, key_file):
    db = tmp_path / "kissbot.db"
    result = run(twitch, sqlite_url, key_file, LOGIN, "--scopes", "chat:read")
    assert (result.exit_code, result.output) == (1, f"Error: database {db} does not exist; create it with kissbot init-db\n")
    DatabaseManager(url=sqlite_url, key_file=key_file).close()
    files = digests(tmp_path)
    result = run(twitch, sqlite_url, key_file, LOGIN, "--scopes", "chat:read", env={"TWITCH_CLIENT_ID": None})
    assert (result.exit_code, result.output) == (1, "Error: no Twitch client id: set TWITCH_CLIENT_ID or pass --client-id\n")
    result = run(twitch, sqlite_url, key_file, LOGIN, "--scopes", "chat:read", "--code-flow")
    assert (result.exit_code, result.output.splitlines()[-1]) == (
        1, "Error: the authorization code flow needs the client secret: set TWITCH_CLIENT_SECRET"
    )
    assert twitch.requests == {}
    assert digests(tmp_path) == files


def test_qr_code_of_the_verification_url(mgr, twitch, store_url, key_file):
    twitch.login_as(LOGIN, TWITCH_ID)
    result = run(twitch, store_url, key_file, LOGIN, "--scopes", "chat:read", "--qr")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    qr = lines[3:lines.index("Waiting for the authorization on Twitch (Ctrl-C to cancel)...")]
    assert len(qr) > 10 and all(set(line) <= set(" ▀▄█") for line in qr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser(url: str) -> None:
    """The human: opens the URL on Twitch, then follows the redirect to kissbot's local server."""
    redirect = httpx.get(url, timeout=10)
    assert redirect.status_code == 302
    assert httpx.get(redirect.headers["Location"], timeout=10).status_code == 200


def test_code_flow_through_the_api(mgr, fake_twitch):
    fake_twitch.client_secret = "app-secret"
    fake_twitch.login_as(LOGIN, TWITCH_ID)
    port = free_port()
    with TwitchAuth(client_secret="app-secret", **_urls(fake_twitch)) as auth:
        opened = []
        done = authorize(
            mgr, auth, LOGIN, ["chat:read", "chat:edit"], token_type="broadcaster", code_flow_port=port,
            show_url=lambda url: (opened.append(url), threading.Thread(target=browser, args=(url,)).start()),
        )
    assert opened[0].startswith(f"{fake_twitch.authorize_url}?client_id=")
    assert f"redirect_uri=http%3A%2F%2Flocalhost%3A{port}" in opened[0]
    assert (done.token_type, done.scopes, done.user_created) == ("broadcaster", ("chat:read", "chat:edit"), True)
    assert mgr.get_user(TWITCH_ID)["is_bot"] is False
    assert mgr.get_tokens(done.user_id, token_type="broadcaster")["access_token"] == fake_twitch.issued[0]
    [event] = mgr.get_audit_log(event_type="tokens_authorized")
    assert event["details"]["flow"] == "authorization_code"
    form = fake_twitch.token_forms[0]
    assert (form["grant_type"], form["redirect_uri"]) == ("authorization_code", f"http://localhost:{port}")


def test_code_flow_denied_stores_nothing(mgr, fake_twitch):
    fake_twitch.client_secret = "app-secret"
    fake_twitch.deny()
    before = snapshot(mgr)
    with TwitchAuth(client_secret="app-secret", **_urls(fake_twitch)) as auth, pytest.raises(AuthorizationDenied):
        obtain_tokens(
            auth, LOGIN, ["chat:read"], code_flow_port=free_port(),
            show_url=lambda url: threading.Thread(target=browser, args=(url,)).start(),
        )
    assert snapshot(mgr) == before and fake_twitch.token_forms == []


def spawn(twitch, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "auth", *args], env={**os.environ, **twitch.env(), **env},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_code_flow_cli(tmp_path, fake_twitch, sqlite_url, key_file):
    DatabaseManager(url=sqlite_url, key_file=key_file).close()
    fake_twitch.client_secret = "app-secret"
    fake_twitch.login_as(LOGIN, TWITCH_ID)
    port = free_port()
    args = [LOGIN, "--scopes", "chat:read", "--code-flow", "--port", str(port), "--url", sqlite_url, "--key-file", str(key_file)]
    proc = spawn(fake_twitch, args, {"TWITCH_CLIENT_SECRET": "app-secret"})
    try:
        assert proc.stdout.readline() == f"Authorizing {LOGIN} (bot token, scopes chat:read).\n"
        assert proc.stdout.readline() == "Open this URL in a browser and authorize:\n"
        browser(proc.stdout.readline().strip())
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode, err) == (0, "")
    assert out == f"Authorized {LOGIN} (Twitch id {TWITCH_ID}, user created): bot tokens stored, scopes chat:read, expiring in 14400 s\n"
    for secret in [*fake_twitch.issued, "app-secret"]:
        assert secret not in out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_while_polling_stores_nothing(tmp_path, fake_twitch, sqlite_url, key_file):
    DatabaseManager(url=sqlite_url, key_file=key_file).close()
    files = digests(tmp_path)
    fake_twitch.device_interval = 0
    args = [LOGIN, "--scopes", "chat:read", "--url", sqlite_url, "--key-file", str(key_file)]
    proc = spawn(fake_twitch, args, {})
    try:
        deadline = time.monotonic() + TIMEOUT
        while fake_twitch.requests["/oauth2/token"] < 3:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the command never polled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert err.endswith("\nAborted!\n"), err  # a KeyboardInterrupt Python ignored in a finalizer may precede it
    assert out.splitlines()[-1] == "Waiting for the authorization on Twitch (Ctrl-C to cancel)..."
    assert digests(tmp_path) == files
    [(device_code, _)] = fake_twitch.device_codes
    assert device_code not in out + err
