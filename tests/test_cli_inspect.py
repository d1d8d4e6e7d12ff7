"""Inspection commands (users, tokens, instances, audit, config, stats) through the real CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.crypto import generate_key
from kissbot.errors import KeyFileError, NoDatabase
from kissbot.repo import TokenRepository

ACCESS = {"serda_bot": "botaccesstoken0123456789abcdef", "el_serda": "chanaccesstoken0123456789abcde"}
REFRESH = {"serda_bot": "botrefreshtoken0123456789abcdefghijklmnopqrstuvwxy", "el_serda": "chanrefreshtoken0123456789abcdefghijklmnopqrstuvwx"}


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def store(store_url: str, tmp_path: Path):
    """A store with a bot, a channel, their tokens and an instance; returns the CLI's store options."""
    key = tmp_path / "k.key"
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        bot = mgr.create_user("1209350837", "serda_bot", display_name="Serda_Bot", is_bot=True)
        chan = mgr.create_user("44456636", "el_serda", display_name="El_Serda")
        mgr.store_tokens(bot, ACCESS["serda_bot"], REFRESH["serda_bot"], 3600, scopes=["chat:read"])
        mgr.store_tokens(chan, ACCESS["el_serda"], REFRESH["el_serda"], 60)
        mgr.increment_refresh_failures(chan)
        mgr.mark_tokens_expired(chan)
        mgr.register_instance("el_serda", "serda_bot", pid=4242)
    return ["--url", store_url, "--key-file", str(key)]


def run(runner, *args: str):
    result = runner.invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result


def listing(directory: Path) -> dict[str, bytes]:
    return {os.fspath(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


READ_COMMANDS = [
    ["users"], ["tokens"], ["tokens", "--reveal"], ["instances"], ["audit"], ["stats"],
    ["config", "list"], ["config", "get", "max_crash_count"], ["config", "set", "x", "1"], ["instances", "reset", "1"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_missing_database_is_one_line_and_creates_nothing(runner, tmp_path, command):
    work = tmp_path / "work"
    work.mkdir()
    result = runner.invoke(cli, [*command, "--db", str(work / "kissbot.db"), "--key-file", str(work / ".kissbot.key")])
    assert result.exit_code == 1
    assert result.stderr == f"Error: database {work}/kissbot.db does not exist; create it with kissbot init-db\n"
    assert list(work.iterdir()) == []


def test_empty_postgresql_database_is_refused_not_created(runner, postgresql_url, tmp_path):
    result = runner.invoke(cli, ["users", "--url", postgresql_url, "--key-file", str(tmp_path / "k")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: database ") and "has no kissbot tables; create them with kissbot init-db" in result.stderr
    with pytest.raises(NoDatabase):
        DatabaseManager(url=postgresql_url, key_file=tmp_path / "k", create=False)
    assert list(tmp_path.iterdir()) == []


def test_inspection_of_a_store_without_key_creates_no_key(runner, tmp_path):
    db, key = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    run(runner, "init-db", "--db", str(db))
    for command in (["users"], ["tokens"], ["config", "list"], ["stats"], ["audit"], ["instances"]):
        run(runner, *command, "--db", str(db), "--key-file", str(key))
    assert not key.exists()


def test_users(runner, store):
    result = run(runner, "users", *store)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["id", "login", "display_name", "twitch_user_id", "bot", "created_at"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["2", "el_serda", "El_Serda", "44456636", "no"],
        ["1", "serda_bot", "Serda_Bot", "1209350837", "yes"],
    ]
    users = json.loads(run(runner, "users", "--json", *store).stdout)
    assert [(u["twitch_login"], u["twitch_user_id"], bool(u["is_bot"])) for u in users] == [
        ("el_serda", "44456636", False), ("serda_bot", "1209350837", True),
    ]
    assert users[0]["created_at"].endswith("+00:00")


TOKENS_TABLE = """\
login      type  expires_at                           needs_reauth  failures
el_serda   bot   2001-02-03T04:05:06+00:00 (expired)  yes           1
serda_bot  bot   2099-02-03T04:05:06+00:00            no            0
"""


def pin_times(store_url: str, key: Path) -> None:
    """Give the fixture's tokens fixed times: el_serda's expired in 2001, serda_bot's expire in 2099."""
    from datetime import datetime, timezone

    from sqlalchemy import update

    from kissbot.models import oauth_tokens

    when = {"el_serda": datetime(2001, 2, 3, 4, 5, 6, tzinfo=timezone.utc), "serda_bot": datetime(2099, 2, 3, 4, 5, 6, tzinfo=timezone.utc)}
    with DatabaseManager(url=store_url, key_file=key) as mgr, mgr.session() as s:
        for login, expires in when.items():
            user_id = mgr.get_user_by_login(login)["id"]
            s.execute(update(oauth_tokens).where(oauth_tokens.c.user_id == user_id).values(
                expires_at=expires, updated_at=datetime(2000, 1, 1, tzinfo=timezone.utc)))


def expected_tokens_json(store_url: str) -> list[dict]:
    with DatabaseManager(url=store_url, need_key=False, create=False) as mgr:
        ids = {login: mgr.get_user_by_login(login)["id"] for login in ("el_serda", "serda_bot")}
    common = {"token_type": "bot", "updated_at": "2000-01-01T00:00:00+00:00"}
    return [
        {"user_id": ids["el_serda"], "twitch_login": "el_serda", **common, "status": "expired", "scopes": [],
         "expires_at": "2001-02-03T04:05:06+00:00", "needs_reauth": True, "refresh_failures": 1, "expired": True},
        {"user_id": ids["serda_bot"], "twitch_login": "serda_bot", **common, "status": "valid", "scopes": ["chat:read"],
         "expires_at": "2099-02-03T04:05:06+00:00", "needs_reauth": False, "refresh_failures": 0, "expired": False},
    ]


def test_tokens_lists_metadata_and_no_value(runner, store, store_url, tmp_path):
    pin_times(store_url, tmp_path / "k.key")
    text = run(runner, "tokens", *store)
    assert (text.stdout, text.stderr) == (TOKENS_TABLE, "")
    data = run(runner, "tokens", "--json", *store)
    assert data.stderr == ""
    rows = json.loads(data.stdout)
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected_tokens_json(store_url)]
    assert rows == expected_tokens_json(store_url)
    for secret in [*ACCESS.values(), *REFRESH.values()]:
        assert secret[:4] not in text.output + data.output


def test_tokens_listing_decrypts_nothing_and_needs_no_key(runner, store, store_url, tmp_path):
    from sqlalchemy import event, update
    from sqlalchemy.engine import Engine

    from kissbot.models import oauth_tokens

    key = tmp_path / "k.key"
    pin_times(store_url, key)
    with DatabaseManager(url=store_url, key_file=key) as mgr, mgr.session() as s:
        s.execute(update(oauth_tokens).values(access_token_encrypted="gAAAAAgarbage", refresh_token_encrypted="not fernet",
                                              updated_at=oauth_tokens.c.updated_at))
    key.rename(tmp_path / "away.key")
    before = listing(tmp_path)
    sent: list[str] = []
    record = lambda _conn, _cursor, statement, *_rest: sent.append(statement)  # noqa: E731
    event.listen(Engine, "before_cursor_execute", record)
    try:
        assert run(runner, "tokens", *store).stdout == TOKENS_TABLE
        assert json.loads(run(runner, "tokens", "--json", *store).stdout) == expected_tokens_json(store_url)
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert [s for s in sent if "_encrypted" in s] == []
    assert listing(tmp_path) == before
    revealed = runner.invoke(cli, ["tokens", "--reveal", *store])
    assert (revealed.exit_code, revealed.stdout) == (1, "")
    assert revealed.stderr.startswith(f"Error: key file {key} not found but ") and len(revealed.stderr.splitlines()) == 1
    assert listing(tmp_path) == before


def test_expired_tokens_are_marked_in_the_table_json_and_api(runner, store, store_url, tmp_path):
    from sqlalchemy import update

    from kissbot.models import oauth_tokens
    from kissbot.types import utcnow

    with DatabaseManager(url=store_url, key_file=tmp_path / "k.key") as mgr:
        bot = mgr.get_user_by_login("serda_bot")["id"]
        with mgr.session() as s:
            s.execute(update(oauth_tokens).where(oauth_tokens.c.user_id == bot).values(expires_at=utcnow()))
        assert (mgr.get_tokens(bot)["expired"], mgr.get_tokens(bot)["status"]) == (True, "valid")
        assert mgr.get_tokens(mgr.get_user_by_login("el_serda")["id"])["expired"] is False
    lines = run(runner, "tokens", *store).stdout.splitlines()
    (bot_line,) = [line for line in lines if line.startswith("serda_bot")]
    assert bot_line.split()[3] == "(expired)"
    assert "(expired)" not in "".join(line for line in lines if line.startswith("el_serda"))
    rows = {r["twitch_login"]: r for r in json.loads(run(runner, "tokens", "--json", *store).stdout)}
    assert (rows["serda_bot"]["expired"], rows["el_serda"]["expired"]) == (True, False)


def test_tokens_reveal_prints_full_values_with_a_warning(runner, store):
    result = run(runner, "tokens", "--reveal", "--json", *store)
    assert result.stderr.startswith("Warning: printing full OAuth tokens")
    rows = {r["twitch_login"]: r for r in json.loads(result.stdout)}
    assert {login: r["access_token"] for login, r in rows.items()} == ACCESS
    assert {login: r["refresh_token"] for login, r in rows.items()} == REFRESH


def test_tokens_that_do_not_decrypt_are_flagged_not_fatal(runner, store, store_url):
    from kissbot.crypto import TokenCipher
    from kissbot.engine import create_engine, writer
    from kissbot.repo import UserRepository

    # A stranger's key would be refused at open (fingerprint), so write the row below the manager.
    stranger = create_engine(store_url, cipher=TokenCipher(generate_key()))
    try:
        with writer(stranger).begin() as conn:
            uid = UserRepository(conn).get_user_by_login("el_serda")["id"]
            TokenRepository(conn).store_tokens(uid, "strangeraccess", "strangerrefresh", 60)
    finally:
        stranger.dispose()
    result = run(runner, "tokens", "--reveal", *store)
    chan, bot = result.stdout.splitlines()[1:]
    assert chan.split()[0] == "el_serda" and " ".join(chan.split()).endswith("(does not decrypt) (does not decrypt)")
    assert bot.split()[-2:] == [ACCESS["serda_bot"], REFRESH["serda_bot"]]
    rows = {r["twitch_login"]: r for r in json.loads(run(runner, "tokens", "--reveal", "--json", *store).stdout)}
    assert (rows["el_serda"]["decrypt_error"], rows["el_serda"]["access_token"]) == (True, None)
    assert (rows["serda_bot"]["decrypt_error"], rows["serda_bot"]["access_token"]) == (False, ACCESS["serda_bot"])
    assert run(runner, "tokens", *store).stdout.splitlines()[1].split()[:2] == ["el_serda", "bot"]


def test_instances_list_and_reset(runner, store, store_url, tmp_path):
    with DatabaseManager(url=store_url, key_file=tmp_path / "k.key") as mgr:
        (instance,) = mgr.list_instances()
        for _ in range(3):
            mgr.stop_instance(instance["id"], crash=True)
    listed = run(runner, "instances", *store).stdout.splitlines()
    assert listed[0].split() == ["id", "channel", "bot", "status", "pid", "last_heartbeat", "crashes"]
    fields = listed[1].split()
    assert (fields[:5], fields[-1]) == ([str(instance["id"]), "el_serda", "serda_bot", "disabled", "-"], "3")
    result = run(runner, "instances", "reset", str(instance["id"]), *store)
    assert result.stdout == f"Instance {instance['id']} reset: status stopped, crash count 0\n"
    (row,) = json.loads(run(runner, "instances", "--json", *store).stdout)
    assert (row["status"], row["crash_count"], row["channel_login"], row["bot_login"]) == ("stopped", 0, "el_serda", "serda_bot")

    missing = runner.invoke(cli, ["instances", "reset", "999", *store])
    assert (missing.exit_code, missing.stderr) == (1, "Error: no instance with id 999\n")



def test_options_given_to_a_subgroup_reach_its_subcommands(runner, store, tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # no kissbot.db here: a subcommand that dropped them would say so
    for args in (["instances", *store, "reset", "1"], ["instances", "--db", "nope.db", "reset", "1", *store]):
        result = runner.invoke(cli, args)
        assert (result.exit_code, result.stdout) == (0, "Instance 1 reset: status stopped, crash count 0\n"), result.output
    verbose = runner.invoke(cli, ["instances", "-v", *store, "reset", "999"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr and verbose.stderr.endswith("Error: no instance with id 999\n")
    stored = runner.invoke(cli, ["tokens", *store, "set", "el_serda", "--expires-in", "60"], input="new-access\nnew-refresh\n")
    assert (stored.exit_code, stored.stdout) == (0, "Stored bot tokens of el_serda (new-…), expiring in 60 s\n"), stored.output
    assert list((tmp_path / "work").iterdir()) == []


def test_audit_filters(runner, store):
    everything = json.loads(run(runner, "audit", "--json", *store).stdout)
    assert [e["event_type"] for e in everything][:2] == ["instance_started", "tokens_expired"]
    assert everything[0]["user_login"] == "serda_bot" and everything[0]["channel_login"] == "el_serda"
    created = json.loads(run(runner, "audit", "--json", "--event-type", "user_created", *store).stdout)
    assert sorted(e["details"]["login"] for e in created) == ["el_serda", "serda_bot"]
    mine = json.loads(run(runner, "audit", "--json", "--user", "EL_SERDA", *store).stdout)
    assert mine and {e["user_id"] for e in mine} == {everything[1]["user_id"]}
    assert len(json.loads(run(runner, "audit", "--json", "--limit", "2", *store).stdout)) == 2
    text = run(runner, "audit", "--limit", "1", *store).stdout
    assert text.endswith(' info    instance_started user=serda_bot channel=el_serda {"instance_id": 1, "pid": 4242}\n')
    unknown = runner.invoke(cli, ["audit", "--user", "nobody", *store])
    assert (unknown.exit_code, unknown.stderr) == (1, "Error: no user with login 'nobody'\n")


def test_config_get_set_list(runner, store):
    assert run(runner, "config", "get", "max_crash_count", *store).stdout == "3\n"
    assert run(runner, "config", "set", "log_retention_days", "60", "--description", "Keep two months", *store).stdout == (
        "log_retention_days = 60\n"
    )
    assert json.loads(run(runner, "config", "get", "log_retention_days", "--json", *store).stdout) == {
        "key": "log_retention_days", "value": 60,
    }
    rows = {r["key"]: r for r in json.loads(run(runner, "config", "list", "--json", *store).stdout)}
    assert (rows["log_retention_days"]["value"], rows["log_retention_days"]["description"]) == (60, "Keep two months")
    text = run(runner, "config", "list", *store).stdout.splitlines()
    assert text[0].split() == ["key", "value", "description"]
    assert [line.split(None, 2) for line in text if line.startswith("log_retention_days")] == [
        ["log_retention_days", "60", "Keep two months"]
    ]
    missing = runner.invoke(cli, ["config", "get", "nope", *store])
    assert (missing.exit_code, missing.stderr) == (1, "Error: no config key 'nope'; see kissbot config list\n")


def test_stats_on_missing_database_is_refused(runner, tmp_path):
    result = runner.invoke(cli, ["stats", "--db", str(tmp_path / "nope.db"), "--key-file", str(tmp_path / "k")])
    assert result.exit_code == 1
    assert list(tmp_path.iterdir()) == []


# --- library additions -------------------------------------------------------------------------


def test_list_tokens_decrypts_only_when_asked(mgr, bot):
    mgr.store_tokens(bot, "access-secret", "refresh-secret", 60, scopes=["chat:read"])
    (row,) = mgr.list_tokens()
    assert "access_token" not in row and "refresh_token" not in row
    assert (row["twitch_login"], row["scopes"], row["needs_reauth"], row["refresh_failures"]) == ("serda_bot", ["chat:read"], False, 0)
    (row,) = mgr.list_tokens(decrypt=True)
    assert (row["access_token"], row["refresh_token"], row["decrypt_error"]) == ("access-secret", "refresh-secret", False)


def test_list_tokens_lists_each_token_type(mgr, bot):
    mgr.store_tokens(bot, "bot-access", "bot-refresh", 60)
    with mgr.session() as session:
        TokenRepository(session).store_tokens(bot, "caster-access", "caster-refresh", 60, token_type="broadcaster")
    rows = mgr.list_tokens(decrypt=True)
    assert [(r["token_type"], r["access_token"]) for r in rows] == [("bot", "bot-access"), ("broadcaster", "caster-access")]


def test_list_tokens_needs_no_key_unless_decrypting(tmp_path):
    db = tmp_path / "kissbot.db"
    with DatabaseManager(db, tmp_path / "a.key") as mgr:
        mgr.create_user("1", "bot")
    with DatabaseManager(db, tmp_path / "missing.key", create=False) as mgr:
        assert mgr.list_tokens() == []
        assert mgr.list_users()[0]["twitch_login"] == "bot"
        with pytest.raises(KeyFileError):
            mgr.store_tokens(1, "a", "r", 60)
    assert not (tmp_path / "missing.key").exists()


def test_create_false_refuses_a_missing_file_and_still_needs_the_key_for_tokens(tmp_path):
    with pytest.raises(NoDatabase, match="does not exist; create it with kissbot init-db"):
        DatabaseManager(tmp_path / "nope.db", tmp_path / "k", create=False)
    assert list(tmp_path.iterdir()) == []
    db = tmp_path / "kissbot.db"
    with DatabaseManager(db, tmp_path / "k") as mgr:
        mgr.store_tokens(mgr.create_user("1", "bot"), "a", "r", 60)
    (tmp_path / "k").unlink()
    with pytest.raises(KeyFileError, match="holds tokens for 1 users"):
        DatabaseManager(db, tmp_path / "k", create=False)


def test_list_instances_has_logins(mgr, bot):
    mgr.create_user("2", "chan")
    instance_id = mgr.register_instance("chan", "serda_bot", pid=1)
    mgr.stop_instance(instance_id)
    (row,) = mgr.list_instances()
    assert (row["id"], row["status"], row["channel_login"], row["bot_login"]) == (instance_id, "stopped", "chan", "serda_bot")


def test_token_repository_list_on_a_session(mgr, bot):
    mgr.store_tokens(bot, "a", "r", 60)
    with mgr.session() as session:
        assert [r["user_id"] for r in TokenRepository(session).list_tokens()] == [bot]


def test_read_only_commands_never_migrate_an_old_database(runner, tmp_path):
    from kissbot.engine import create_engine
    from kissbot.migrations import HEAD, upgrade

    db = tmp_path / "kissbot.db"
    engine = create_engine(db)
    upgrade(engine, "0001")
    engine.dispose()
    before = listing(tmp_path)
    (tmp_path / "config.yaml").write_text("twitch:\n  tokens:\n    bot:\n      user_id: 1\n      access_token: a\n      refresh_token: r\n")
    for command in (["users"], ["stats"], ["migrate-yaml", str(tmp_path / "config.yaml"), "--dry-run"]):
        result = runner.invoke(cli, [*command, "--db", str(db), "--key-file", str(tmp_path / "k")])
        assert result.exit_code == 1, command
        assert result.stderr == f"Error: database {db} is at migration 0001, this kissbot needs {HEAD}: migrate it with kissbot init-db\n"
    (tmp_path / "config.yaml").unlink()
    assert listing(tmp_path) == before
