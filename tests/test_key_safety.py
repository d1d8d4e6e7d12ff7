"""The key ring's bounds and ownership (issue 14 item 8), the key beside its database (issue 18 item 1),
backup notices and errors that name the key they need (issue 18 item 3)."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.crypto import KeyRing, fingerprint, read_key_ring
from kissbot.errors import DecryptionError, KeyFileError

ELSEWHERE = "--key-file PATH or KISSBOT_KEY_FILE"
TOP = 2**31 - 1


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_key(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def with_tokens(db: Path, key_file: Path | None = None, users: int = 1) -> DatabaseManager:
    mgr = DatabaseManager(db, key_file)
    for n in range(1, users + 1):
        mgr.store_tokens(mgr.create_user(str(n), f"user{n}"), f"access-{n}", f"refresh-{n}", 3600)
    return mgr


# --- 14.8: bounded versions, owner -----------------------------------------------------------


def test_a_key_version_beyond_the_integer_column_is_refused_and_nothing_changes(tmp_path, runner):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with_tokens(db, key_file).close()
    write_key(key_file, f"v9223372036854775807:{Fernet.generate_key().decode()}\n")
    before = digest(tmp_path)
    result = runner.invoke(cli, ["key", "rotate", "--db", str(db), "--key-file", str(key_file)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: key file {key_file}: entry 1 has key version 922337203685…, above the highest ({TOP}): "
        f"restore {key_file} from your backup, or point to the right key with {ELSEWHERE}\n"
    )
    assert digest(tmp_path) == before


def test_a_key_version_of_2_to_the_63_from_the_environment_is_refused(tmp_path, monkeypatch):
    db = tmp_path / "kissbot.db"
    DatabaseManager(db, tmp_path / "first.key").close()
    before = digest(tmp_path)
    monkeypatch.setenv("KISSBOT_KEY", f"v{2**63}:{Fernet.generate_key().decode()}")
    with pytest.raises(KeyFileError, match=rf"^KISSBOT_KEY: entry 1 has key version 922337203685…, above the highest \({TOP}\)"):
        DatabaseManager(db)
    assert digest(tmp_path) == before
    with pytest.raises(KeyFileError, match=f"^key version {2**63} is out of range: versions go from 1 to {TOP}$"):
        KeyRing(((2**63, Fernet.generate_key()),))


def test_rotation_stops_at_the_highest_version_in_one_line(store_url, tmp_path, runner):
    key_file = tmp_path / "top.key"
    write_key(key_file, f"v{TOP}:{Fernet.generate_key().decode()}\n")
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, "access-1", "refresh-1", 3600)
        assert mgr.get_config("encryption_key_version") == TOP
    before = key_file.read_bytes()
    result = runner.invoke(cli, ["key", "rotate", "--url", store_url, "--key-file", str(key_file)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: cannot rotate: key version {TOP} is the highest there can be ({TOP}); keep using it, "
        "or start again from a new key with kissbot key reset (which deletes every token)\n"
    )
    assert key_file.read_bytes() == before
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_tokens(uid)["refresh_token"] == "refresh-1"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_key_file_owned_by_another_user_is_refused(tmp_path, runner):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with_tokens(db, key_file).close()
    os.chown(key_file, 65534, -1)  # nobody; still mode 0600
    before = digest(tmp_path)
    expected = (
        f"key file {key_file} is owned by uid 65534, not by the user running kissbot (uid 0): "
        f"run kissbot as its owner, or give it to this user (chown 0 {key_file})"
    )
    with pytest.raises(KeyFileError) as caught:
        DatabaseManager(db, key_file)
    assert str(caught.value) == expected
    result = runner.invoke(cli, ["tokens", "--db", str(db), "--key-file", str(key_file)])
    assert (result.exit_code, result.stderr) == (1, f"Error: {expected}\n")
    assert digest(tmp_path) == before


# --- 18.1: the key beside its database --------------------------------------------------------


def test_the_default_key_file_is_beside_the_database(tmp_path, monkeypatch, runner):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with_tokens(Path("sub/bot.db")).close()
    assert (tmp_path / "sub" / ".kissbot.key").exists()
    assert not (tmp_path / ".kissbot.key").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(cli, ["tokens", "--reveal", "--db", str(tmp_path / "sub" / "bot.db"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"twitch_login": "user1"' in result.stdout
    assert os.listdir(elsewhere) == []


def test_a_missing_key_names_the_full_path_and_how_to_point_elsewhere(tmp_path, monkeypatch, runner):
    (tmp_path / "srv").mkdir()
    db = tmp_path / "srv" / "kissbot.db"
    with_tokens(db, users=3).close()
    (tmp_path / "srv" / ".kissbot.key").rename(tmp_path / "saved.key")
    monkeypatch.chdir(tmp_path)
    before = digest(tmp_path)
    result = runner.invoke(cli, ["tokens", "--reveal", "--db", "srv/kissbot.db"])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: key file {tmp_path}/srv/.kissbot.key not found but srv/kissbot.db holds tokens for 3 users; "
        f"restore the key from your backup, or point to it with {ELSEWHERE}\n"
    )
    assert digest(tmp_path) == before
    monkeypatch.setenv("KISSBOT_KEY_FILE", str(tmp_path / "saved.key"))
    assert runner.invoke(cli, ["tokens", "--reveal", "--db", "srv/kissbot.db"]).exit_code == 0


def test_an_existing_store_with_its_key_in_the_current_directory_keeps_working(tmp_path, monkeypatch, runner, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with_tokens(Path("sub/bot.db"), Path(".kissbot.key")).close()  # where kissbot put it before
    warning = (
        f"using key file {tmp_path}/.kissbot.key (the current directory) for sub/bot.db: kissbot looks beside "
        f"the database first, move the key to {tmp_path}/sub/.kissbot.key"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kissbot"), DatabaseManager("sub/bot.db") as mgr:
        assert mgr.get_tokens(1)["access_token"] == "access-1"
    assert [r.getMessage() for r in caplog.records] == [warning]
    result = runner.invoke(cli, ["tokens", "--reveal", "--db", "sub/bot.db"])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"Warning: {warning}\nWarning: printing full OAuth tokens; anyone who sees them can act as these users.\n"
    assert not (tmp_path / "sub" / ".kissbot.key").exists()


# --- 18.3: backup notices, the key a row needs ------------------------------------------------


def test_creating_and_rotating_a_key_says_to_back_it_up(tmp_path, runner, caplog):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with caplog.at_level(logging.WARNING, logger="kissbot"):
        with_tokens(db).close()
    first = fingerprint(read_key_ring(key_file).key(1))
    assert [r.getMessage() for r in caplog.records] == [
        f"database {db} did not exist: created a new, empty store",
        f"new key: back up {key_file} now: fingerprint {first[:8]}… (key version 1); "
        "without it the tokens cannot be decrypted"
    ]
    assert all(key.decode() not in r.getMessage() for r in caplog.records for key in [read_key_ring(key_file).key(1)])
    result = runner.invoke(cli, ["key", "rotate", "--db", str(db)])
    assert result.exit_code == 0, result.output
    second = fingerprint(read_key_ring(key_file).key(2))
    assert result.stdout == f"Rotated to key version 2 ({second}): 1 token rows re-encrypted\n"
    assert result.stderr.endswith(
        f"Warning: key version 2 added (earlier backups of the key file lack it): back up {key_file} now: "
        f"fingerprint {second[:8]}… (key version 2); without it the tokens cannot be decrypted\n"
    )


def test_undecryptable_rows_name_the_key_version_and_fingerprint_they_need(tmp_path, runner):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with_tokens(db, key_file, users=3).close()
    old = fingerprint(read_key_ring(key_file).key(1))
    backup = tmp_path / "old.db"
    assert runner.invoke(cli, ["backup", str(backup), "--db", str(db)]).exit_code == 0
    assert runner.invoke(cli, ["key", "rotate", "--db", str(db)]).exit_code == 0
    assert runner.invoke(cli, ["key", "retire", "1", "--db", str(db)]).exit_code == 0
    result = runner.invoke(cli, ["restore", str(backup), "--db", str(db)])
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: {backup}: tokens of 3 of 3 users do not decrypt with the current key: they need key version 1 "
        f"(fingerprint {old}), restore that key from your backup; nothing restored\n"
    )
    # A row that its key does not decrypt names the version and the fingerprint recorded for it.
    current = fingerprint(read_key_ring(key_file).key(2))
    foreign = Fernet(Fernet.generate_key()).encrypt(b"access-2").decode()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE oauth_tokens SET access_token_encrypted = ? WHERE user_id = 2", (foreign,))
    with DatabaseManager(db, key_file) as mgr, pytest.raises(DecryptionError) as caught:
        mgr.get_tokens(2)
    assert str(caught.value) == (
        f"Failed to decrypt tokens for user 2 (key version 2, fingerprint {current}): wrong key or corrupted data"
    )
