"""Typed config (issue 14 item 3, issue 18 item 2): known keys are checked where written and where read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import sqlalchemy
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.errors import ConfigurationError, CorruptConfig
from kissbot.settings import SETTINGS

GARBAGE = {
    "encryption_key_version": "abc",
    "token_refresh_interval": "1e400",
    "health_check_interval": "30s",
    "max_crash_count": "NaN",
    "log_retention_days": "-5",
    "max_refresh_failures": "",
    "token_validate_interval": "[1]",
    "key_fingerprint_v1": "X",
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def store(tmp_path: Path) -> list[str]:
    """A SQLite store with a user, tokens and a running instance; the CLI options that reach it."""
    db, key = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with DatabaseManager(db, key) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.create_user("2", "el_serda")
        mgr.store_tokens(bot, "access-token-1", "refresh-token-1", 3600)
        mgr.register_instance("el_serda", "serda_bot", 4242)
    return ["--db", str(db), "--key-file", str(key)]


def corrupt(url: str, values: dict[str, str]) -> None:
    """Write config values below kissbot, as an operator could in SQL."""
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        for key, value in values.items():
            conn.execute(sqlalchemy.text("DELETE FROM config WHERE key = :k"), {"k": key})
            conn.execute(sqlalchemy.text("INSERT INTO config (key, value) VALUES (:k, :v)"), {"k": key, "v": value})
    engine.dispose()


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("health_check_interval", "30s", "an integer from 1 to 86400 (Secondes entre checks), not '30s'"),
        ("max_crash_count", "abc", "an integer from 1 to 1000 (Crashes avant désactivation), not 'abc'"),
        ("max_crash_count", "0", "an integer from 1 to 1000 (Crashes avant désactivation), not '0'"),
        ("log_retention_days", "1e400", "an integer from 0 to 36500 (Rétention des audit logs), not '1e400'"),
        ("log_retention_days", "-1", "an integer from 0 to 36500 (Rétention des audit logs), not '-1'"),
        ("max_crash_count", "-2.5", "an integer from 1 to 1000 (Crashes avant désactivation), not '-2.5'"),
        ("token_refresh_interval", "NaN", "an integer from 0 to 86400 (Secondes avant expiration), not 'NaN'"),
        ("token_refresh_interval", "9" * 40, f"an integer from 0 to 86400 (Secondes avant expiration), not '{'9' * 24}…'"),
    ],
)
def test_config_set_refuses_a_value_out_of_type_or_range_and_writes_nothing(runner, store, tmp_path, key, value, message):
    before = digest(tmp_path)
    result = runner.invoke(cli, ["config", "set", key, value, *store])
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"Error: config {key} must be {message}\n")
    assert digest(tmp_path) == before


@pytest.mark.parametrize("args", [["log_retention_days", "--days"], ["mine", "-x"], ["mine", "1", "--bogus"]], ids=" ".join)
def test_config_set_still_refuses_an_unknown_option(runner, store, tmp_path, args):
    before = digest(tmp_path)
    result = runner.invoke(cli, ["config", "set", *args, *store])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr in (f"Error: No such option: {args[-1]}\n", f"Error: Got unexpected extra argument ({args[-1]})\n")
    assert digest(tmp_path) == before


@pytest.mark.parametrize(
    "key", ["encryption_key_version", "key_fingerprint_v1", "key_fingerprint_v2"]
)
def test_config_set_refuses_internal_keys(runner, store, tmp_path, key):
    before = digest(tmp_path)
    result = runner.invoke(cli, ["config", "set", key, "abc", *store])
    assert (result.exit_code, result.stderr) == (
        1, f"Error: config {key} is kept by kissbot and cannot be set; see kissbot key status\n",
    )
    assert digest(tmp_path) == before
    assert runner.invoke(cli, ["key", "status", *store]).exit_code == 0


@pytest.mark.parametrize(
    ("key", "known"),
    [("KEY_FINGERPRINT_V1", "key_fingerprint_v1"), ("Encryption_Key_Version", "encryption_key_version"),
     ("Log_Retention_Days", "log_retention_days"), (" max_crash_count", "max_crash_count")],
)
def test_config_set_refuses_a_key_that_differs_from_a_known_one_only_in_case_or_spaces(runner, store, tmp_path, key, known):
    before = digest(tmp_path)
    result = runner.invoke(cli, ["config", "set", key, "5", *store])
    assert (result.exit_code, result.stdout, result.stderr) == (
        1, "", f"Error: config {key!r} is not kissbot's {known}: write it as {known}\n",
    )
    assert digest(tmp_path) == before


def test_set_config_checks_known_keys_and_keeps_other_keys_free(mgr):
    with pytest.raises(ConfigurationError, match="^config encryption_key_version is kept by kissbot"):
        mgr.set_config("encryption_key_version", 2)
    with pytest.raises(ConfigurationError, match="^config key_fingerprint_v1 is kept by kissbot"):
        mgr.set_config("key_fingerprint_v1", "0123456789abcdef")
    for bad in ("30s", 0, 1.5, True, None, float("nan"), 10**30):
        with pytest.raises(ConfigurationError, match="^config health_check_interval must be an integer from 1 to 86400"):
            mgr.set_config("health_check_interval", bad)
    mgr.set_config("health_check_interval", " 45 ")
    mgr.set_config("max_crash_count", 5)
    assert (mgr.get_config("health_check_interval"), mgr.get_config("max_crash_count")) == (45, 5)
    mgr.set_config("custom_setting", {"nested": [1, 2]})
    assert mgr.get_config("custom_setting") == {"nested": [1, 2]}
    with pytest.raises(ConfigurationError, match="^config ratio: the value is not JSON"):
        mgr.set_config("ratio", float("nan"))


def test_a_corrupt_value_never_blocks_opening_and_names_the_fix(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.create_user("2", "el_serda")
        mgr.store_tokens(bot, "access-token-1", "refresh-token-1", 3600)
        instance = mgr.register_instance("el_serda", "serda_bot", 4242)
    corrupt(store_url, GARBAGE)
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_tokens(bot)["access_token"] == "access-token-1"
        with pytest.raises(CorruptConfig) as caught:
            mgr.get_active_instances()
        assert str(caught.value) == (
            "config health_check_interval holds '30s', not an integer from 1 to 86400: "
            "fix it with kissbot config set health_check_interval 30"
        )
        with pytest.raises(CorruptConfig, match="^config max_crash_count holds 'NaN', not an integer from 1 to 1000: fix it"):
            mgr.stop_instance(instance, crash=True)
        with pytest.raises(CorruptConfig, match="^config log_retention_days holds '-5'"):
            mgr.cleanup_old_logs()
        with pytest.raises(CorruptConfig, match="^config health_check_interval holds '30s'"):
            mgr.get_config("health_check_interval")
        assert {r["key"]: r["value"] for r in mgr.list_config()}["health_check_interval"] == "30s"
        mgr.set_config("health_check_interval", 30)
        mgr.set_config("max_crash_count", 3)
        assert [i["id"] for i in mgr.get_active_instances()] == [instance]
        assert mgr.stop_instance(instance, crash=True) == "crashed"
        # The internal keys were recorded again by the open (a bot's open writes them, a read-only one does not).
        assert mgr.get_config("encryption_key_version") == 1
        assert len(mgr.get_config("key_fingerprint_v1")) == 16


def test_commands_on_a_store_with_every_key_corrupt_say_one_line(runner, store, tmp_path):
    corrupt(f"sqlite:///{tmp_path / 'kissbot.db'}", GARBAGE)
    fix_interval = (
        "Error: config health_check_interval holds '30s', not an integer from 1 to 86400: "
        "fix it with kissbot config set health_check_interval 30\n"
    )
    for command in (["stats"], ["instances", "reap"]):
        result = runner.invoke(cli, [*command, *store])
        assert (result.exit_code, result.stderr) == (1, fix_interval), command
    result = runner.invoke(cli, ["cleanup-logs", *store])
    assert (result.exit_code, result.stderr) == (
        1,
        "Error: config log_retention_days holds '-5', not an integer from 0 to 36500: "
        "fix it with kissbot config set log_retention_days 30\n",
    )
    assert runner.invoke(cli, ["key", "status", *store]).exit_code == 0
    for key, value in SETTINGS.items():
        if not value.internal:
            assert runner.invoke(cli, ["config", "set", key, str(value.default), *store]).exit_code == 0
    assert runner.invoke(cli, ["stats", *store]).exit_code == 0


def test_doctor_reports_every_corrupt_key_as_a_finding(runner, store, tmp_path):
    corrupt(f"sqlite:///{tmp_path / 'kissbot.db'}", GARBAGE)
    result = runner.invoke(cli, ["doctor", *store])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    config_lines = [line for line in result.stdout.splitlines() if line.startswith("[error] config ")]
    assert config_lines == [
        "[error] config encryption_key_version holds 'abc', not an integer from 1 to 2147483647; "
        "fix: fix it with kissbot key rotate (it records the version again)",
        "[error] config health_check_interval holds '30s', not an integer from 1 to 86400; "
        "fix: fix it with kissbot config set health_check_interval 30",
        "[error] config key_fingerprint_v1 holds 'X', not a key fingerprint (16 hex digits); "
        "fix: kissbot ignores it and records the key's fingerprint again when a bot opens the store",
        "[error] config log_retention_days holds '-5', not an integer from 0 to 36500; "
        "fix: fix it with kissbot config set log_retention_days 30",
        "[error] config max_crash_count holds 'NaN', not an integer from 1 to 1000; "
        "fix: fix it with kissbot config set max_crash_count 3",
        "[error] config max_refresh_failures holds '', not an integer from 1 to 1000; "
        "fix: fix it with kissbot config set max_refresh_failures 3",
        "[error] config token_refresh_interval holds '1e400', not an integer from 0 to 86400; "
        "fix: fix it with kissbot config set token_refresh_interval 60",
        "[error] config token_validate_interval holds '[1]', not an integer from 0 to 604800; "
        "fix: fix it with kissbot config set token_validate_interval 3600",
    ]
    assert "[ok] 1 running instances, none stale" in result.stdout
