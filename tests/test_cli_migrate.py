"""`kissbot migrate-yaml` and `kissbot import-tio` through the real CLI, on real files."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import re
import sqlite3
import stat
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.backup import backup_sqlite, default_backup_path
from kissbot.cli import cli
from kissbot.crypto import fingerprint, read_key_ring
from kissbot.errors import BackupError, ImportSourceError, NoDatabase
from kissbot.importers import read_yaml_tokens
from kissbot.types import utcnow

# A copy of a deployment's config.yaml: bot settings, API keys and, among them, twitch.tokens.
DEPLOYMENT_CONFIG = """\
# KissBot Neural V3.0 - production config
apis:
  openai_key: sk-proj-notarealkey0000000000000000
  rawg_key: 0123456789abcdef0123456789abcdef
  timeout: 10.0
bot:
  channel: el_serda
  cooldown: 5
  debug: false
  name: serda_bot
  personality: taquin, cash, second degré
llm:
  enabled: true
  provider: local
  model_endpoint: http://127.0.0.1:1234/v1/chat/completions
  inference:
    ask: {max_tokens: 200, temperature: 0.3, stop_tokens: ["\\n", "🔚"]}
logging:
  file: serdabot_v2.log
  level: INFO
twitch:
  bot_id: '1209350837'
  channels:
  - el_serda
  - morthy_
  client_id: m60vyrfkbrrdo3xp6h4rpneq6bh9d6
  client_secret: notarealclientsecret0000000000
  prefix: '!'
  tokens:
    Serda_Bot:
      user_id: 1209350837
      access_token: oauth:a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5
      refresh_token: r1s2t3u4v5w6x7y8z9a0b1c2d3e4f5g6h7i8j9k0l1m2n3o4p5
      scopes: [chat:read, chat:edit, user:bot]
    El_Serda:
      user_id: '44456636'
      access_token: zz9y8x7w6v5u4t3s2r1q0p9o8n7m6l
      refresh_token: qq1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c2v3b4
    morthy_:
      user_id: 157593948
      access_token: oauth:mo4rthyaccesstokenvalue0000000
      refresh_token: mo4rthyrefreshtokenvalue00000000000000000000000000
    Çaféïne:
      user_id: "987654321"
      access_token: cafe1neaccesstokenvalue00000000
      refresh_token: cafe1nerefreshtokenvalue000000000000000000000000000
"""

PLAINTEXT = {
    "serda_bot": ("a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5", "r1s2t3u4v5w6x7y8z9a0b1c2d3e4f5g6h7i8j9k0l1m2n3o4p5"),
    "el_serda": ("zz9y8x7w6v5u4t3s2r1q0p9o8n7m6l", "qq1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c2v3b4"),
    "morthy_": ("mo4rthyaccesstokenvalue0000000", "mo4rthyrefreshtokenvalue00000000000000000000000000"),
    "çaféïne": ("cafe1neaccesstokenvalue00000000", "cafe1nerefreshtokenvalue000000000000000000000000000"),
}
DISPLAY = {"serda_bot": "Serda_Bot", "el_serda": "El_Serda", "morthy_": "morthy_", "çaféïne": "Çaféïne"}
TWITCH_IDS = {"serda_bot": "1209350837", "el_serda": "44456636", "morthy_": "157593948", "çaféïne": "987654321"}
BACKUP_NAME = re.compile(r"kissbot\.db\.backup_\d{8}_\d{6}(_\d+)?$")

FIRST_RUN = "users_created: 4\nusers_updated: 0\ntokens_stored: 4\nerrors: 0\n"
SECOND_RUN = "users_created: 0\nusers_updated: 4\ntokens_stored: 4\nerrors: 0\n"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def deploy(tmp_path: Path) -> Path:
    """A deployment directory holding config.yaml (and later kissbot.db, .kissbot.key)."""
    d = tmp_path / "deploy"
    d.mkdir()
    (d / "config.yaml").write_text(DEPLOYMENT_CONFIG, encoding="utf-8")
    return d


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``directory`` with its mode and bytes."""
    return {
        os.fspath(p.relative_to(directory)): (p.stat().st_mode, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def store_args(d: Path) -> list[str]:
    return ["--db", str(d / "kissbot.db"), "--key-file", str(d / ".kissbot.key")]


def migrate(runner, d: Path, *extra: str, config: str = "config.yaml"):
    return runner.invoke(cli, ["migrate-yaml", str(d / config), *store_args(d), *extra])


def test_migrate_yaml_stores_every_token_encrypted(runner, deploy):
    result = migrate(runner, deploy)
    assert result.exit_code == 0, result.output
    assert result.stdout == FIRST_RUN
    assert stat.S_IMODE((deploy / ".kissbot.key").stat().st_mode) == 0o600

    raw = (deploy / "kissbot.db").read_bytes()
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        for login, (access, refresh) in PLAINTEXT.items():
            assert access.encode() not in raw and refresh.encode() not in raw
            user = mgr.get_user_by_login(login.upper())
            assert (user["twitch_login"], user["display_name"], user["twitch_user_id"]) == (
                login, DISPLAY[login], TWITCH_IDS[login],
            )
            assert bool(user["is_bot"]) is (login == "serda_bot")
            tokens = mgr.get_tokens(user["id"])
            assert (tokens["access_token"], tokens["refresh_token"]) == (access, refresh)
        assert mgr.get_tokens(mgr.get_user_by_login("serda_bot")["id"])["scopes"] == ["chat:read", "chat:edit", "user:bot"]
        # Unknown age: every token is due for refresh now.
        assert {t["twitch_login"] for t in mgr.get_tokens_needing_refresh(buffer_minutes=0.01)} == set(PLAINTEXT)
        migrated = mgr.get_audit_log(event_type="tokens_migrated")
        assert sorted(e["details"]["login"] for e in migrated) == sorted(PLAINTEXT)
        everything = json.dumps(mgr.get_audit_log(limit=1000), default=str)
    for access, refresh in PLAINTEXT.values():
        assert access[:8] not in everything and refresh[:8] not in everything


def test_second_run_reports_updated_after_a_consistent_backup(runner, deploy):
    assert migrate(runner, deploy).exit_code == 0
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        before = sorted(u["twitch_login"] for u in mgr.list_users())
    result = migrate(runner, deploy)
    assert result.exit_code == 0, result.output
    first, rest = result.stdout.split("\n", 1)
    assert re.fullmatch(rf"Backup: {re.escape(str(deploy))}/kissbot\.db\.backup_\d{{8}}_\d{{6}}(_\d+)?", first)
    assert rest == SECOND_RUN
    backup = Path(first.removeprefix("Backup: "))
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    with closing(sqlite3.connect(backup)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert sorted(r[0] for r in conn.execute("SELECT twitch_login FROM users")) == before
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        assert len(mgr.list_users()) == 4
        assert len(mgr.get_audit_log(event_type="tokens_migrated")) == 8


def test_one_audit_event_per_migrated_user_and_nothing_else(runner, deploy):
    # The issue asks for exactly one event per user: no user_created or
    # tokens_created/tokens_refreshed beside tokens_migrated, first run or second.
    for run in (1, 2):
        assert migrate(runner, deploy, "--no-backup").exit_code == 0
        with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
            events = mgr.get_audit_log(limit=1000)
            ids = {u["twitch_login"]: u["id"] for u in mgr.list_users()}
        assert [e["event_type"] for e in events] == ["tokens_migrated"] * 4 * run
        latest = sorted((e["details"]["login"], e["user_id"], e["details"]["user_created"]) for e in events[:4])
        assert latest == sorted((login, ids[login], run == 1) for login in PLAINTEXT)


def test_many_users_on_both_backends(runner, tmp_path, store_url):
    # More entries than one IN (...) list holds: validation and writes go by chunks.
    n = 1000
    tokens = {f"User_{i}": {"user_id": 700000 + i, "access_token": f"acc{i:06d}", "refresh_token": f"ref{i:06d}"} for i in range(n)}
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"twitch": {"tokens": tokens}}))
    key = tmp_path / "k.key"
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        taken = mgr.create_user("999", "user_999")
        mgr.store_tokens(taken, "old-access", "old-refresh", 60)
        mgr.create_user("700998", "someone_else")
    args = ["migrate-yaml", str(config), "--url", store_url, "--key-file", str(key), "--no-backup"]
    refused = runner.invoke(cli, args)
    assert refused.exit_code == 1
    assert refused.stderr == (
        "Error: twitch.tokens.User_998: user_id 700998 already belongs to login 'someone_else' in the database\n"
        "Error: twitch.tokens.User_999: login 'user_999' belongs to Twitch user id 999 in the database, not 700999\n"
    )
    result = runner.invoke(cli, [*args, "--skip-invalid", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["users_created"] == n - 2
    again = json.loads(runner.invoke(cli, [*args, "--skip-invalid", "--json"]).stdout)
    assert (again["users_created"], again["users_updated"], len(again["errors"])) == (0, n - 2, 2)
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        assert len(mgr.list_users()) == n
        for i in (0, 399, 400, 997):
            user = mgr.get_user_by_login(f"user_{i}")
            assert (user["twitch_user_id"], user["display_name"]) == (str(700000 + i), f"User_{i}")
            tokens_i = mgr.get_tokens(user["id"])
            assert (tokens_i["access_token"], tokens_i["refresh_token"], tokens_i["version"]) == (f"acc{i:06d}", f"ref{i:06d}", 2)
        assert mgr.get_tokens(taken)["access_token"] == "old-access"
        assert len(mgr.get_audit_log(limit=5000, event_type="tokens_migrated")) == 2 * (n - 2)


def test_json_report(runner, deploy):
    first = migrate(runner, deploy, "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {
        "users_created": 4, "users_updated": 0, "tokens_stored": 4, "errors": [],
        "dry_run": False, "backup": None, "notes": [], "logins": {login: "create" for login in PLAINTEXT},
    }
    second = json.loads(migrate(runner, deploy, "--json").stdout)
    assert BACKUP_NAME.search(second.pop("backup"))
    assert second == {
        "users_created": 0, "users_updated": 4, "tokens_stored": 4, "errors": [], "dry_run": False, "notes": [],
        "logins": {login: "update" for login in PLAINTEXT},
    }


def test_migrate_yaml_on_postgresql(runner, deploy, postgresql_url):
    args = ["migrate-yaml", str(deploy / "config.yaml"), "--url", postgresql_url, "--key-file", str(deploy / "k.key")]
    note = "Note: backup skipped: kissbot backs up SQLite files only; back this database up with its own tools\n"
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == note + FIRST_RUN
    assert runner.invoke(cli, args).stdout == note + SECOND_RUN
    with DatabaseManager(url=postgresql_url, key_file=deploy / "k.key") as mgr:
        for login, (access, refresh) in PLAINTEXT.items():
            tokens = mgr.get_tokens(mgr.get_user_by_login(login)["id"])
            assert (tokens["access_token"], tokens["refresh_token"]) == (access, refresh)
        with mgr.engine.connect() as conn:
            stored = conn.exec_driver_sql("SELECT access_token_encrypted FROM oauth_tokens").scalars().all()
    assert stored and all(s.startswith("gAAAAA") for s in stored)
    assert not set(stored) & {a for a, _ in PLAINTEXT.values()}


def test_dry_run_writes_nothing_at_all(runner, deploy):
    before = snapshot(deploy)
    result = migrate(runner, deploy, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Dry run: nothing was written.\n" + "".join(f"would create {u}\n" for u in PLAINTEXT) + FIRST_RUN
    assert snapshot(deploy) == before

    assert migrate(runner, deploy).exit_code == 0
    before = snapshot(deploy)
    again = migrate(runner, deploy, "--dry-run", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == {
        "users_created": 0, "users_updated": 4, "tokens_stored": 4, "errors": [],
        "dry_run": True, "backup": None, "notes": [], "logins": {login: "update" for login in PLAINTEXT},
    }
    assert snapshot(deploy) == before


BAD_CONFIGS = {
    "malformed": ("twitch:\n  tokens:\n    serda_bot: [\n", "Error: {d}/bad.yaml is not valid YAML: "),
    "missing": (None, "Error: config file {d}/bad.yaml not found"),
    "no-tokens": ("bot:\n  name: serda_bot\ntwitch:\n  client_id: abc\n", "Error: {d}/bad.yaml has no twitch.tokens section"),
    "incomplete": (
        DEPLOYMENT_CONFIG.replace("      refresh_token: qq1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c2v3b4\n", ""),
        "Error: twitch.tokens.El_Serda: refresh_token is missing",
    ),
}


@pytest.mark.parametrize("existing", [False, True], ids=["no-db", "existing-db"])
@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_1_and_byte_identical(runner, deploy, case, existing):
    text, message = BAD_CONFIGS[case]
    if existing:
        assert migrate(runner, deploy).exit_code == 0
    if text is not None:
        (deploy / "bad.yaml").write_text(text, encoding="utf-8")
    before = snapshot(deploy)
    result = migrate(runner, deploy, config="bad.yaml")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message.format(d=deploy)), result.stderr
    assert "Traceback" not in result.output
    assert snapshot(deploy) == before


def test_invalid_entries_abort_with_one_line_each_unless_skip_invalid(runner, deploy):
    assert migrate(runner, deploy).exit_code == 0
    (deploy / "more.yaml").write_text(
        "twitch:\n"
        "  tokens:\n"
        "    NewBot:\n"
        "      user_id: 42\n"
        "      access_token: newbotaccess000000000000000000\n"
        "      refresh_token: newbotrefresh0000000000000000000\n"
        "    Thief:\n"
        "      user_id: 44456636\n"
        "      access_token: x1\n"
        "      refresh_token: y1\n"
        "    empty_one:\n"
        "      user_id: 43\n"
        "      access_token: ''\n"
        "      refresh_token: 12345\n"
        "    Twin:\n"
        "      user_id: 50\n"
        "      access_token: a\n"
        "      refresh_token: b\n"
        "    twin:\n"
        "      user_id: 51\n"
        "      access_token: a\n"
        "      refresh_token: b\n",
        encoding="utf-8",
    )
    problems = [
        "Error: twitch.tokens.empty_one: access_token is empty",
        "Error: twitch.tokens.empty_one: refresh_token must be a string",
        "Error: twitch.tokens.Twin: duplicate login (also given as twin)",
        "Error: twitch.tokens.twin: duplicate login (also given as Twin)",
        "Error: twitch.tokens.Thief: user_id 44456636 already belongs to login 'el_serda' in the database",
    ]
    before = snapshot(deploy)
    result = migrate(runner, deploy, config="more.yaml")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == problems
    assert snapshot(deploy) == before

    dry = migrate(runner, deploy, "--skip-invalid", "--dry-run", config="more.yaml")
    assert dry.exit_code == 0
    assert snapshot(deploy) == before
    skipped = migrate(runner, deploy, "--skip-invalid", "--no-backup", config="more.yaml")
    assert skipped.exit_code == 0, skipped.output
    figures = "users_created: 1\nusers_updated: 0\ntokens_stored: 1\nerrors: 5\n" + "".join(
        f"  - {p.removeprefix('Error: ')}\n" for p in problems
    )
    assert skipped.stdout == figures
    assert dry.stdout == "Dry run: nothing was written.\nwould create newbot\n" + figures
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        assert sorted(u["twitch_login"] for u in mgr.list_users()) == sorted([*PLAINTEXT, "newbot"])
    assert not list(deploy.glob("kissbot.db.backup_*"))


def test_login_owned_by_another_user_id_is_refused(runner, deploy):
    assert migrate(runner, deploy).exit_code == 0
    (deploy / "renamed.yaml").write_text(
        "twitch:\n  tokens:\n    EL_SERDA:\n      user_id: 1\n      access_token: a\n      refresh_token: b\n", encoding="utf-8"
    )
    result = migrate(runner, deploy, config="renamed.yaml")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: twitch.tokens.EL_SERDA: login 'el_serda' belongs to Twitch user id 44456636 in the database, not 1\n"
    )


def test_expires_in_and_no_backup(runner, deploy):
    assert migrate(runner, deploy).exit_code == 0
    result = migrate(runner, deploy, "--expires-in", "3600", "--no-backup")
    assert result.stdout == SECOND_RUN
    assert not list(deploy.glob("kissbot.db.backup_*"))
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        expires = mgr.get_tokens(mgr.get_user_by_login("serda_bot")["id"])["expires_at"]
        assert mgr.get_tokens_needing_refresh(buffer_minutes=30) == []
    assert utcnow() + timedelta(minutes=55) < expires <= utcnow() + timedelta(hours=1)


def test_verbose_logs_to_stderr_without_secrets(runner, deploy):
    quiet = migrate(runner, deploy)
    fp = fingerprint(read_key_ring(deploy / ".kissbot.key").key(1))
    assert quiet.stderr == (
        f"Warning: database {deploy}/kissbot.db did not exist: created a new, empty store\n"
        f"Warning: new key: back up {deploy}/.kissbot.key now: fingerprint {fp[:8]}… (key version 1); "
        "without it the tokens cannot be decrypted\n"
    )
    info = migrate(runner, deploy, "-v")
    assert info.exit_code == 0
    assert info.stdout.endswith(SECOND_RUN)
    assert "INFO     kissbot.importers: config.yaml: 4 entries to import, 0 invalid" in info.stderr
    assert "DEBUG" not in info.stderr
    debug = migrate(runner, deploy, "-vv")
    assert "INSERT INTO audit_log" in debug.stderr
    for access, refresh in PLAINTEXT.values():
        for out in (info.output, debug.output):
            assert access[:8] not in out and refresh[:8] not in out


def test_read_yaml_tokens_normalises_entries(deploy):
    batch = read_yaml_tokens(deploy / "config.yaml")
    assert batch.problems == []
    assert [(e.login, e.display_name, e.twitch_user_id) for e in batch.entries] == [
        (login, DISPLAY[login], TWITCH_IDS[login]) for login in PLAINTEXT
    ]
    assert all(PLAINTEXT[e.login][0] not in repr(e) for e in batch.entries)


def test_a_large_config_is_parsed_without_collector_passes_and_the_collector_is_left_as_it_was(tmp_path):
    entries = "".join(
        f"    user{i}:\n      user_id: '{1000 + i}'\n      access_token: a{i:029d}\n      refresh_token: r{i:049d}\n"
        for i in range(3000)
    )
    big, broken = tmp_path / "config.yaml", tmp_path / "broken.yaml"
    big.write_text("twitch:\n  tokens:\n" + entries)
    broken.write_text("twitch:\n  tokens: [\n")
    passes: list[str] = []
    gc.callbacks.append(lambda phase, _info: passes.append(phase))
    try:
        assert len(read_yaml_tokens(big).entries) == 3000
        # PyYAML keeps every node alive: a pass over them would find nothing to free. At most
        # one pass, as the collector is turned back on (without the pause: one per few hundred nodes).
        assert passes.count("start") <= 1
        assert gc.isenabled()
        with pytest.raises(ImportSourceError):
            read_yaml_tokens(broken)
        assert gc.isenabled()
        gc.disable()
        try:
            read_yaml_tokens(big)
            assert not gc.isenabled()  # the caller's choice is kept
        finally:
            gc.enable()
    finally:
        gc.callbacks.pop()


# --- what config.yaml's values mean -------------------------------------------------------------
# YAML 1.1 as PyYAML's safe loader reads it (libyaml's when the wheel has it): these values must keep
# exactly the meaning and the errors they had.

ONE_ENTRY = "twitch:\n  tokens:\n    {login}:\n      user_id: {user_id}\n      access_token: {access}\n      refresh_token: {refresh}\n{extra}"
VALUE_ERRORS = {
    "refresh-tilde": ({"refresh": "~"}, "twitch.tokens.Bot: refresh_token is missing"),
    "refresh-null": ({"refresh": "null"}, "twitch.tokens.Bot: refresh_token is missing"),
    "refresh-empty": ({"refresh": ""}, "twitch.tokens.Bot: refresh_token is missing"),
    "access-int": ({"access": "12345"}, "twitch.tokens.Bot: access_token must be a string"),
    "access-hex": ({"access": "0x1F"}, "twitch.tokens.Bot: access_token must be a string"),
    "access-float": ({"access": "1.5"}, "twitch.tokens.Bot: access_token must be a string"),
    "access-yes": ({"access": "yes"}, "twitch.tokens.Bot: access_token must be a string"),
    "access-date": ({"access": "2024-01-31"}, "twitch.tokens.Bot: access_token must be a string"),
    "access-list": ({"access": "[a, b]"}, "twitch.tokens.Bot: access_token must be a string"),
    "user-id-float": ({"user_id": "12.5"}, "twitch.tokens.Bot: user_id must be a number or a string of digits"),
    "user-id-on": ({"user_id": "on"}, "twitch.tokens.Bot: user_id must be a number or a string of digits"),
    "user-id-tilde": ({"user_id": "~"}, "twitch.tokens.Bot: user_id is missing"),
    "login-number": ({"login": "123"}, "twitch.tokens.123: the login must be a non-empty string"),
    "login-yes": ({"login": "yes"}, "twitch.tokens.True: the login must be a non-empty string"),
    "login-null": ({"login": "~"}, "twitch.tokens.None: the login must be a non-empty string"),
    "is-bot-quoted": ({"extra": "      is_bot: 'yes'\n"}, "twitch.tokens.Bot: is_bot must be true or false"),
    "is-bot-number": ({"extra": "      is_bot: 1\n"}, "twitch.tokens.Bot: is_bot must be true or false"),
}


@pytest.mark.parametrize("case", sorted(VALUE_ERRORS))
def test_yaml_values_of_the_wrong_type_are_one_line_errors(runner, deploy, case):
    fields, problem = VALUE_ERRORS[case]
    values = {"login": "Bot", "user_id": "42", "access": "botaccess", "refresh": "botrefresh", "extra": "", **fields}
    (deploy / "bad.yaml").write_text(ONE_ENTRY.format(**values), encoding="utf-8")
    before = snapshot(deploy)
    result = migrate(runner, deploy, config="bad.yaml")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"Error: {problem}\n")
    assert snapshot(deploy) == before


def test_yaml_values_keep_their_yaml_1_1_meaning(runner, deploy):
    (deploy / "edge.yaml").write_text(
        "defaults: &viewer\n"
        "  scopes: [chat:read]\n"
        "started: 2024-01-31 10:00:00\n"
        "twitch:\n"
        "  bot_id: 77\n"
        "  tokens:\n"
        "    '123':\n"                        # quoted: a login of digits
        "      user_id: '0042'\n"             # quoted: the digits as written
        "      access_token: '12345'\n"
        "      refresh_token: 1e5\n"          # YAML 1.1 floats need a dot: a string
        "      scopes: chat:read chat:edit\n"
        "    Bot:\n"
        "      user_id: 77\n"
        "      access_token: oauth:yes\n"
        "      refresh_token: !!str 67890\n"  # an explicit tag
        "      is_bot: off\n"                 # YAML 1.1 boolean: false, although user_id is bot_id
        "    Friend:\n"
        "      <<: *viewer\n"                 # a merge key and an alias
        "      user_id: 0x10\n"               # YAML 1.1 hexadecimal: 16
        "      access_token: \"friend access\"\n"
        "      refresh_token: |\n"
        "        friendrefresh\n"
        "      is_bot: Yes\n",
        encoding="utf-8",
    )
    result = migrate(runner, deploy, config="edge.yaml")
    assert result.exit_code == 0, result.output
    assert result.stdout == "users_created: 3\nusers_updated: 0\ntokens_stored: 3\nerrors: 0\n"
    expected = {
        "123": ("0042", False, "12345", "1e5", ["chat:read", "chat:edit"]),
        "bot": ("77", False, "yes", "67890", []),
        "friend": ("16", True, "friend access", "friendrefresh", ["chat:read"]),
    }
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        for login, (twitch_id, is_bot, access, refresh, scopes) in expected.items():
            user = mgr.get_user_by_login(login)
            assert (user["twitch_user_id"], bool(user["is_bot"])) == (twitch_id, is_bot)
            tokens = mgr.get_tokens(user["id"])
            assert (tokens["access_token"], tokens["refresh_token"], tokens["scopes"]) == (access, refresh, scopes)


@pytest.mark.parametrize("before_tokens, problem", [
    ("bot:\n  started: 2024-13-01\n", "it holds a date or number that cannot be read"),
    ("bot:\n  mask: 0x_\n", "it holds a date or number that cannot be read"),
    ("bot: {name: x}\n---\n", "but found another document at line 2, column 1"),
    ("bot: !!python/name:os.system x\n", "could not determine a constructor for the tag"),
    ("bot: *nowhere\n", "found undefined alias at line 1, column 6"),
], ids=["impossible-date", "bad-number", "two-documents", "python-tag", "undefined-alias"])
def test_unreadable_yaml_anywhere_in_the_config_is_one_line_error(runner, deploy, before_tokens, problem):
    entry = ONE_ENTRY.format(login="Bot", user_id="42", access="botaccess", refresh="botrefresh", extra="")
    (deploy / "bad.yaml").write_text(before_tokens + entry, encoding="utf-8")
    before = snapshot(deploy)
    result = migrate(runner, deploy, config="bad.yaml")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith(f"Error: {deploy}/bad.yaml is not valid YAML: "), result.stderr
    assert problem in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert snapshot(deploy) == before


# --- import-tio ---------------------------------------------------------------------------------


def write_tio(d: Path, entries: dict) -> Path:
    path = d / ".tio.tokens.json"
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def tio_entry(user_id: str, token: str, refresh: str) -> dict:
    return {"user_id": user_id, "token": token, "refresh": refresh, "last_validated": "2025-11-05T00:46:08.123456+00:00"}


def test_import_tio_updates_known_users_and_reports_unknown_ids(runner, deploy):
    assert migrate(runner, deploy).exit_code == 0
    tio = write_tio(deploy, {
        "1209350837": tio_entry("1209350837", "livebotaccess00000000000000000", "livebotrefresh000000000000000000000000000000000000"),
        "44456636": tio_entry("44456636", "livechanaccess0000000000000000", "livechanrefresh00000000000000000000000000000000000"),
        "555": tio_entry("555", "strangeraccess0000000000000000", "strangerrefresh0000000000000000000000000000000000"),
    })
    result = runner.invoke(cli, ["import-tio", str(tio), *store_args(deploy), "--no-backup"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "users_created: 0\nusers_updated: 2\ntokens_stored: 2\nerrors: 1\n"
        "  - .tio.tokens.json[555]: no user with Twitch user id 555 in the database; skipped\n"
    )
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        bot = mgr.get_tokens(mgr.get_user("1209350837")["id"])
        assert bot["access_token"] == "livebotaccess00000000000000000"
        assert utcnow() + timedelta(hours=3, minutes=55) < bot["expires_at"] <= utcnow() + timedelta(hours=4)
        assert mgr.get_tokens(mgr.get_user("157593948")["id"])["access_token"] == PLAINTEXT["morthy_"][0]
        assert mgr.get_user("555") is None
        assert len(mgr.get_audit_log(event_type="tokens_imported")) == 2
        # One event per user and no other: the migration's four, then the import's two.
        assert sorted(e["event_type"] for e in mgr.get_audit_log(limit=100)) == ["tokens_imported"] * 2 + ["tokens_migrated"] * 4


def test_import_tio_dry_run_and_bad_files_write_nothing(runner, deploy):
    assert migrate(runner, deploy).exit_code == 0
    tio = write_tio(deploy, {"44456636": tio_entry("44456636", "livechanaccess0000000000000000", "r")})
    before = snapshot(deploy)
    dry = runner.invoke(cli, ["import-tio", str(tio), *store_args(deploy), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["users_updated"] == 1
    assert snapshot(deploy) == before

    bad = {
        "not-json": ("{\"1\": ", "Error: {d}/.tio.tokens.json is not valid JSON (line 1, column 7)"),
        "no-token": ('{"44456636": {"user_id": "44456636", "refresh": "r"}}', "Error: .tio.tokens.json[44456636]: token is missing"),
        "mismatch": (
            '{"44456636": {"user_id": "1", "token": "t", "refresh": "r"}}',
            "Error: .tio.tokens.json[44456636]: user_id 1 does not match its key",
        ),
        "pytwitchapi-without-login": ('{"token": "t", "refresh": "r"}', "Error: {d}/.tio.tokens.json is a pyTwitchAPI token file: name its user with --login"),
    }
    for text, message in bad.values():
        tio.write_text(text, encoding="utf-8")
        before = snapshot(deploy)
        result = runner.invoke(cli, ["import-tio", str(tio), *store_args(deploy)])
        assert result.exit_code == 1, text
        assert result.stderr == message.format(d=deploy) + "\n"
        assert snapshot(deploy) == before


def test_import_pytwitchapi_user_token_with_login(runner, deploy):
    assert migrate(runner, deploy).exit_code == 0
    path = deploy / "user_token.json"
    path.write_text(json.dumps({"token": "pytwitchaccess0000000000000000", "refresh": "pytwitchrefresh00000000000000"}))
    result = runner.invoke(cli, ["import-tio", str(path), "--login", "El_Serda", "--expires-in", "600", *store_args(deploy)])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("users_created: 0\nusers_updated: 1\ntokens_stored: 1\nerrors: 0\n")
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        assert mgr.get_tokens(mgr.get_user("44456636")["id"])["access_token"] == "pytwitchaccess0000000000000000"


def test_import_tio_needs_an_existing_database(runner, deploy):
    tio = write_tio(deploy, {"1": tio_entry("1", "t", "r")})
    before = snapshot(deploy)
    result = runner.invoke(cli, ["import-tio", str(tio), *store_args(deploy)])
    assert result.exit_code == 1
    assert result.stderr == f"Error: database {deploy}/kissbot.db does not exist; create it with kissbot init-db\n"
    assert snapshot(deploy) == before


# --- backup -------------------------------------------------------------------------------------


def _write_forever(db: str, started) -> None:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    i = 0
    while True:
        conn.execute("INSERT INTO t (v) VALUES (?)", (i,))
        i += 1
        if i == 200:
            started.set()


def test_backup_sqlite_is_consistent_while_another_process_writes(tmp_path):
    db = tmp_path / "live.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)")
    started = multiprocessing.Event()
    writer = multiprocessing.Process(target=_write_forever, args=(str(db), started), daemon=True)
    writer.start()
    try:
        assert started.wait(timeout=60)
        with sqlite3.connect(db, timeout=30) as conn:
            committed = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        dest = backup_sqlite(db, default_backup_path(db))
    finally:
        writer.kill()
        writer.join(timeout=30)
    assert re.fullmatch(r"live\.db\.backup_\d{8}_\d{6}", dest.name)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    with closing(sqlite3.connect(dest)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count, highest = conn.execute("SELECT count(*), max(v) FROM t").fetchone()
    assert count >= committed and highest == count - 1
    assert sorted(p.name for p in tmp_path.iterdir() if "backup" in p.name) == [dest.name]


def test_backup_refuses_to_overwrite_and_needs_a_source(tmp_path):
    db = tmp_path / "kissbot.db"
    with pytest.raises(NoDatabase):
        backup_sqlite(db, tmp_path / "b")
    sqlite3.connect(db).close()
    first = default_backup_path(db)
    backup_sqlite(db, first)
    second = default_backup_path(db)
    assert second != first and BACKUP_NAME.search(second.name)
    with pytest.raises(BackupError, match="already exists"):
        backup_sqlite(db, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kissbot.db", first.name])


def test_backup_of_a_file_that_is_not_a_database_leaves_nothing(tmp_path):
    bogus = tmp_path / "kissbot.db"
    bogus.write_bytes(b"not a database" * 200)
    with pytest.raises(BackupError):
        backup_sqlite(bogus, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kissbot.db"]


def test_store_url_is_untouched_by_a_dry_run(runner, deploy, store_url):
    # On either backend, a dry run against an existing store changes no row.
    key = deploy / "k.key"
    with DatabaseManager(url=store_url, key_file=key) as mgr:
        mgr.create_user("44456636", "el_serda")
    result = runner.invoke(cli, ["migrate-yaml", str(deploy / "config.yaml"), "--url", store_url, "--key-file", str(key), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Dry run: nothing was written.\nwould create serda_bot\nwould update el_serda\nwould create morthy_\n"
        "would create çaféïne\nusers_created: 3\nusers_updated: 1\ntokens_stored: 4\nerrors: 0\n"
    )
    engine = sqlalchemy.create_engine(store_url)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM users").scalar() == 1
            assert conn.exec_driver_sql("SELECT count(*) FROM oauth_tokens").scalar() == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("command", [["migrate-yaml", "config.yaml"], ["migrate-yaml", "config.yaml", "--dry-run"], ["users"], ["tokens"]])
def test_a_bad_key_file_leaves_the_directory_byte_identical(runner, deploy, command):
    assert migrate(runner, deploy).exit_code == 0
    (deploy / "bad.key").write_text("not a fernet key\n")
    (deploy / "bad.key").chmod(0o600)
    before = snapshot(deploy)
    args = [deploy / a if a.endswith(".yaml") else a for a in command]
    result = runner.invoke(cli, [*map(str, args), "--db", str(deploy / "kissbot.db"), "--key-file", str(deploy / "bad.key")])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: key file {deploy}/bad.key does not hold a valid Fernet key: restore {deploy}/bad.key from your backup, "
        "or point to the right key with --key-file PATH or KISSBOT_KEY_FILE\n"
    )
    assert snapshot(deploy) == before


def test_migrate_yaml_backs_up_an_old_database_before_migrating_it(runner, deploy):
    from kissbot.engine import create_engine
    from kissbot.migrations import HEAD, upgrade

    engine = create_engine(deploy / "kissbot.db")
    upgrade(engine, "0001")
    engine.dispose()
    result = migrate(runner, deploy)
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n", 1)[1] == FIRST_RUN
    (backup,) = deploy.glob("kissbot.db.backup_*")
    with closing(sqlite3.connect(backup)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
    with closing(sqlite3.connect(deploy / "kissbot.db")) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == (HEAD,)


def test_import_tio_into_an_old_database_migrates_it_after_a_backup(runner, deploy):
    from kissbot.engine import create_engine
    from kissbot.migrations import upgrade

    engine = create_engine(deploy / "kissbot.db")
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO users (twitch_user_id, twitch_login) VALUES ('44456636', 'el_serda')")
    engine.dispose()
    tio = write_tio(deploy, {"44456636": tio_entry("44456636", "livechanaccess0000000000000000", "r")})
    result = runner.invoke(cli, ["import-tio", str(tio), *store_args(deploy)])
    assert result.exit_code == 0, result.output
    assert result.stdout.split("\n", 1)[1] == "users_created: 0\nusers_updated: 1\ntokens_stored: 1\nerrors: 0\n"
    assert len(list(deploy.glob("kissbot.db.backup_*"))) == 1
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        assert mgr.get_tokens(mgr.get_user("44456636")["id"])["access_token"] == "livechanaccess0000000000000000"


# --- issue 18 item 7: the bot account, the dry run's plan, every problem at once, nothing imported ---------


def _config_without_bot_id(deploy: Path, bot_section: str = "") -> str:
    text = DEPLOYMENT_CONFIG.replace("  bot_id: '1209350837'\n", "")
    if not bot_section:
        text = text.replace("  name: serda_bot\n", "")
    (deploy / "config.yaml").write_text(text, encoding="utf-8")
    return text


def _bots(deploy: Path) -> set[str]:
    with DatabaseManager(deploy / "kissbot.db", deploy / ".kissbot.key") as mgr:
        return {u["twitch_login"] for u in mgr.list_users() if u["is_bot"]}


def test_the_bot_account_comes_from_bot_name(runner, deploy):
    # KissBot's config names its account in bot.name (here without twitch.bot_id).
    _config_without_bot_id(deploy, bot_section="keep")
    result = migrate(runner, deploy)
    assert result.exit_code == 0, result.output
    assert _bots(deploy) == {"serda_bot"}


def test_the_bot_account_comes_from_the_bot_option(runner, deploy):
    _config_without_bot_id(deploy)
    before = snapshot(deploy)
    refused = migrate(runner, deploy, "--bot", "nobody")
    assert (refused.exit_code, refused.stdout) == (1, "")
    assert refused.stderr == f"Error: {deploy / 'config.yaml'} has no twitch.tokens entry for the bot login nobody\n"
    assert snapshot(deploy) == before
    result = migrate(runner, deploy, "--bot", "SERDA_BOT")
    assert result.exit_code == 0, result.output
    assert _bots(deploy) == {"serda_bot"}


def test_without_a_bot_named_no_user_is_a_bot(runner, deploy):
    _config_without_bot_id(deploy)
    assert migrate(runner, deploy).exit_code == 0
    assert _bots(deploy) == set()


def test_dry_run_lists_each_login_with_create_or_update(runner, deploy):
    plan = "".join(f"would create {login}\n" for login in PLAINTEXT)
    result = migrate(runner, deploy, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Dry run: nothing was written.\n" + plan + FIRST_RUN
    assert migrate(runner, deploy, "--no-backup").exit_code == 0
    (deploy / "config.yaml").write_text(
        DEPLOYMENT_CONFIG + "    NewOne:\n      user_id: 5\n      access_token: a5\n      refresh_token: r5\n", encoding="utf-8"
    )
    again = migrate(runner, deploy, "--dry-run", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["logins"] == {**{login: "update" for login in PLAINTEXT}, "newone": "create"}


def test_every_problem_is_reported_in_one_run(runner, deploy):
    (deploy / "config.yaml").write_text(
        "twitch:\n"
        "  tokens:\n"
        "    first:\n"
        "      user_id: 50\n"
        "      refresh_token: b\n"           # access_token missing
        "    second:\n"
        "      user_id: 50\n"                # the same Twitch id as first
        "      access_token: a\n"
        "      refresh_token: b\n"
        "    Twin:\n"
        "      user_id: 60\n"
        "      access_token: ''\n"           # empty, and a duplicate login
        "      refresh_token: b\n"
        "    twin:\n"
        "      user_id: 61\n"
        "      access_token: a\n"
        "      refresh_token: b\n",
        encoding="utf-8",
    )
    before = snapshot(deploy)
    result = migrate(runner, deploy)
    assert (result.exit_code, result.stdout) == (1, "")
    assert sorted(result.stderr.splitlines()) == sorted([
        "Error: twitch.tokens.first: access_token is missing",
        "Error: twitch.tokens.first: user_id 50 is also given for second",
        "Error: twitch.tokens.second: user_id 50 is also given for first",
        "Error: twitch.tokens.Twin: duplicate login (also given as twin)",
        "Error: twitch.tokens.Twin: access_token is empty",
        "Error: twitch.tokens.twin: duplicate login (also given as Twin)",
    ])
    assert snapshot(deploy) == before


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_skip_invalid_with_every_entry_invalid_exits_1(runner, deploy, dry_run):
    (deploy / "config.yaml").write_text(
        "twitch:\n  tokens:\n    a:\n      user_id: 1\n    b:\n      user_id: x\n      access_token: a\n      refresh_token: b\n",
        encoding="utf-8",
    )
    before = snapshot(deploy)
    result = migrate(runner, deploy, "--skip-invalid", *dry_run)
    assert result.exit_code == 1
    assert result.stderr == "Error: nothing to migrate from config.yaml: every entry is invalid (see above)\n"
    assert "errors: 3" in result.stdout
    assert snapshot(deploy) == before


def test_a_second_run_marks_the_bot_account_of_an_earlier_migration(runner, deploy):
    # Stores migrated before the bot account was read have every user with is_bot = no.
    _config_without_bot_id(deploy)
    assert migrate(runner, deploy, "--no-backup").exit_code == 0
    assert _bots(deploy) == set()
    result = migrate(runner, deploy, "--no-backup", "--bot", "serda_bot")
    assert result.exit_code == 0, result.output
    assert _bots(deploy) == {"serda_bot"}
    # A run that names no bot leaves the flag as it is.
    assert migrate(runner, deploy, "--no-backup").exit_code == 0
    assert _bots(deploy) == {"serda_bot"}
