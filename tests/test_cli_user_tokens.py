"""`kissbot user add` and `kissbot tokens set`: adding a user and its tokens by hand, through the real CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli

ACCESS = "handaccesstoken0123456789abcdef"
REFRESH = "handrefreshtoken0123456789abcdefghijklmnopqrstuvwxy"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def opts(store_url: str, tmp_path: Path) -> list[str]:
    DatabaseManager(url=store_url, key_file=tmp_path / "k.key").close()
    return ["--url", store_url, "--key-file", str(tmp_path / "k.key")]


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_user_add_creates_the_user(runner, opts, store_url, tmp_path):
    result = runner.invoke(cli, ["user", "add", "Serda_Bot", "--twitch-id", "1209350837", "--bot", *opts])
    assert (result.exit_code, result.output) == (0, "User serda_bot created (id 1, Twitch id 1209350837, bot)\n")
    with DatabaseManager(url=store_url, key_file=tmp_path / "k.key") as mgr:
        user = mgr.get_user_by_login("serda_bot")
    assert (user["twitch_user_id"], user["display_name"], bool(user["is_bot"])) == ("1209350837", "Serda_Bot", True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serda_bot", "--twitch-id", "99"], "Error: a user with login 'serda_bot' already exists\n"),
        (["other", "--twitch-id", "1209350837"], "Error: a user with Twitch user id '1209350837' already exists\n"),
        (["bad login", "--twitch-id", "5"], "Error: 'bad login' is not a Twitch login (1 to 25 letters, digits or _)\n"),
        (["fine", "--twitch-id", "12ab"], "Error: --twitch-id '12ab' is not a numeric Twitch id\n"),
    ],
    ids=["login-taken", "id-taken", "bad-login", "bad-id"],
)
def test_user_add_refuses_bad_or_taken_names_and_writes_nothing(runner, tmp_path, args, message):
    db, key = tmp_path / "k.db", tmp_path / "k.key"
    with DatabaseManager(db, key) as mgr:
        mgr.create_user("1209350837", "serda_bot")
    before = digest(tmp_path)
    result = runner.invoke(cli, ["user", "add", *args, "--db", str(db), "--key-file", str(key)])
    assert (result.exit_code, result.output) == (1, message)
    assert digest(tmp_path) == before


def test_tokens_set_reads_stdin_stores_encrypted_and_masks(runner, opts, store_url, tmp_path):
    with DatabaseManager(url=store_url, key_file=tmp_path / "k.key") as mgr:
        uid = mgr.create_user("1209350837", "serda_bot", is_bot=True)
        mgr.store_tokens(uid, "old-access", "old-refresh", 60)
        mgr.mark_tokens_expired(uid)
    result = runner.invoke(
        cli,
        ["tokens", "set", "serda_bot", "--expires-in", "14400", "--scopes", "chat:read, chat:edit", *opts],
        input=f"oauth:{ACCESS}\n{REFRESH}\n",
    )
    assert (result.exit_code, result.output) == (0, "Stored bot tokens of serda_bot (hand…), expiring in 14400 s\n")
    with DatabaseManager(url=store_url, key_file=tmp_path / "k.key") as mgr:
        tokens = mgr.get_tokens(uid)
        events = [e["event_type"] for e in mgr.get_audit_log(limit=1)]
    assert (tokens["access_token"], tokens["refresh_token"], tokens["scopes"]) == (ACCESS, REFRESH, ["chat:read", "chat:edit"])
    assert not tokens["needs_reauth"]
    assert events == ["tokens_refreshed"]


@pytest.mark.parametrize(
    ("login", "stdin", "message"),
    [
        ("nobody", f"{ACCESS}\n{REFRESH}\n", "Error: no user with login 'nobody'; create it with kissbot user add\n"),
        ("serda_bot", f"{ACCESS}\n", "Error: no refresh token given (stdin: the access token, then the refresh token, one per line)\n"),
        ("serda_bot", "\n", "Error: no access token given (stdin: the access token, then the refresh token, one per line)\n"),
    ],
    ids=["unknown-login", "no-refresh-token", "no-access-token"],
)
def test_tokens_set_refusals_write_nothing_not_even_a_key(runner, tmp_path, login, stdin, message):
    db, key = tmp_path / "k.db", tmp_path / "k.key"
    with DatabaseManager(db, key, create=True) as mgr:
        mgr.create_user("1209350837", "serda_bot")
    key.unlink(missing_ok=True)
    before = digest(tmp_path)
    result = runner.invoke(cli, ["tokens", "set", login, "--expires-in", "60", "--db", str(db), "--key-file", str(key)], input=stdin)
    assert (result.exit_code, result.output) == (1, message)
    assert digest(tmp_path) == before


def test_tokens_are_never_taken_from_the_command_line(runner):
    result = runner.invoke(cli, ["tokens", "set", "--help"])
    assert "--access-token" not in result.output and "--refresh-token" not in result.output
    assert "stdin" in result.output
