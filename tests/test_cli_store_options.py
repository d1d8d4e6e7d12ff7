"""Store options (before the command, from the environment, no key unless decrypting) and new databases."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli


def listing(directory: Path) -> dict[str, bytes]:
    return {os.fspath(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def store(store_url: str, tmp_path: Path) -> tuple[str, Path]:
    """A store holding a bot's tokens; returns its URL and its key file."""
    key = tmp_path / "keys" / "bot.key"
    key.parent.mkdir()
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        bot = mgr.create_user("1209350837", "serda_bot", is_bot=True)
        mgr.store_tokens(bot, "botaccesstoken0123456789abcdef", "botrefreshtoken0123456789abcdef", 3600)
        mgr.register_instance("serda_bot", "serda_bot", pid=4242)
    return store_url, key


NO_KEY_NEEDED = [
    ["users"], ["stats"], ["instances"], ["audit"], ["config", "list"], ["config", "get", "max_crash_count"],
    ["config", "set", "log_retention_days", "10"], ["user", "add", "el_serda", "--twitch-id", "44456636"],
    ["instances", "reap"], ["cleanup-logs"], ["tokens"], ["tokens", "--json", "--limit", "1"],
]


@pytest.mark.parametrize("command", NO_KEY_NEEDED, ids=" ".join)
def test_commands_that_decrypt_nothing_need_no_key(store, tmp_path, command):
    url, key = store
    moved = key.with_name("elsewhere.key")
    key.rename(moved)
    result = CliRunner().invoke(cli, [*command, "--url", url, "--key-file", str(key)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert not key.exists()
    # Token values still need it, and say where it was looked for.
    result = CliRunner().invoke(cli, ["tokens", "--reveal", "--url", url, "--key-file", str(key)])
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: key file {key} not found but ")
    assert not key.exists()


def test_store_options_before_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db, key = tmp_path / "bot" / "bot.db", tmp_path / "bot.key"
    db.parent.mkdir()
    with DatabaseManager(db, key) as mgr:
        mgr.create_user("1209350837", "serda_bot", is_bot=True)
    runner = CliRunner()
    result = runner.invoke(cli, ["--db", str(db), "--key-file", str(key), "users"])
    assert result.exit_code == 0, result.output
    assert "serda_bot" in result.stdout
    result = runner.invoke(cli, ["--url", f"sqlite:///{db}", "config", "get", "max_crash_count"])
    assert (result.exit_code, result.stdout) == (0, "3\n"), result.output
    # The command's own option wins over the group's.
    result = runner.invoke(cli, ["--db", "nope.db", "users", "--db", str(db)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["--db", "nope.db", "users"])
    assert (result.exit_code, result.stderr) == (1, "Error: database nope.db does not exist; create it with kissbot init-db\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot", "bot.key"]


def test_kissbot_db_environment_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "bot.db"
    with DatabaseManager(db) as mgr:
        mgr.create_user("1209350837", "serda_bot", is_bot=True)
    runner = CliRunner()
    result = runner.invoke(cli, ["users"], env={"KISSBOT_DB": str(db)})
    assert result.exit_code == 0, result.output
    assert "serda_bot" in result.stdout
    # --db before or after the command beats the environment.
    before = listing(tmp_path)
    for args in (["--db", "nope.db", "users"], ["users", "--db", "nope.db"]):
        result = runner.invoke(cli, args, env={"KISSBOT_DB": str(db)})
        assert (result.exit_code, result.stderr) == (1, "Error: database nope.db does not exist; create it with kissbot init-db\n")
    assert listing(tmp_path) == before
    assert "KISSBOT_DB" in runner.invoke(cli, ["users", "--help"]).stdout


def test_a_database_that_does_not_exist_is_created_with_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="kissbot"):
        DatabaseManager(db_path="kisbot.db").close()  # a typo of kissbot.db
    assert caplog.records[0].getMessage() == f"database {tmp_path / 'kisbot.db'} did not exist: created a new, empty store"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kissbot"):
        DatabaseManager(db_path="kisbot.db").close()
        # init-db creates the file it is asked for: no warning.
        result = CliRunner().invoke(cli, ["init-db", "--db", "new.db"])
    assert result.exit_code == 0, result.output
    assert (result.stderr, caplog.records) == ("", [])


@pytest.mark.parametrize(
    ("command", "hint"),
    [(["copy", "--to", "copy.db"], "use kissbot copy --from STORE --to TARGET [--key-file KEY]"),
     (["backups", "list", "backups"], "it lists the backups at its URL argument")],
    ids=lambda v: v[0] if isinstance(v, list) else "",
)
@pytest.mark.parametrize("before", [["--db", "bot.db"], ["--url", "sqlite:///bot.db"], ["--key-file", "bot.key"],
                                    ["--synchronous", "FULL"]], ids=lambda v: v[0])
def test_commands_without_a_store_refuse_the_store_options_given_before_them(tmp_path, monkeypatch, command, hint, before):
    monkeypatch.chdir(tmp_path)
    with DatabaseManager("bot.db", "bot.key") as mgr:
        mgr.create_user("1209350837", "serda_bot", is_bot=True)
    (tmp_path / "backups").mkdir()
    snapshot = listing(tmp_path)
    result = CliRunner().invoke(cli, [*before, *command])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == f"Error: kissbot {'copy' if command[0] == 'copy' else 'backups list'} does not take {before[0]}: {hint}\n"
    assert listing(tmp_path) == snapshot
