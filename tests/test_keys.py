"""Key files, key sources, fingerprints, rotation, retirement and reset (issue 5)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy
from click.testing import CliRunner
from cryptography.fernet import Fernet

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.crypto import KeyFileCipher, KeyRing, TokenCipher, decrypts_with, fingerprint, read_key_ring
from kissbot.engine import create_engine
from kissbot.errors import DecryptionError, KeyFileError, ValidationError
from kissbot.keys import check_key, resolve_key_source, retire_key, rotate_keys

DATA = Path(__file__).parent / "data"
CLI = [sys.executable, "-c", "from kissbot.cli import cli; cli()"]


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def db_file(tmp_path):
    return tmp_path / "kissbot.db"


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of ``directory`` with its bytes and mode."""
    return {
        p.name: p.read_bytes() + oct(p.lstat().st_mode).encode() if not p.is_symlink() else b"->" + os.readlink(p).encode()
        for p in sorted(directory.iterdir())
    }


def fill(mgr: DatabaseManager, n: int) -> list[int]:
    from kissbot.repo import TokenRepository, UserRepository

    with mgr.session() as s:
        ids = [UserRepository(s).create_user(str(i), f"user{i}") for i in range(n)]
        for uid in ids:
            TokenRepository(s).store_tokens(uid, f"access-{uid}", f"refresh-{uid}", 3600)
    return ids


def raw_rows(db: Path | str) -> list[tuple[int, int, str, str]]:
    """``(user_id, key_version, access ciphertext, refresh ciphertext)`` of every token row, read below kissbot."""
    engine = sqlalchemy.create_engine(db if isinstance(db, str) else f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(
                "SELECT user_id, key_version, access_token_encrypted, refresh_token_encrypted FROM oauth_tokens"
            )]
    finally:
        engine.dispose()


# --- creation ---------------------------------------------------------------------------------


def test_key_file_is_created_0600_under_a_permissive_umask(db_file, key_file):
    old = os.umask(0)
    try:
        DatabaseManager(db_file, key_file).close()
    finally:
        os.umask(old)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in key_file.parent.iterdir() if p.name.endswith(".tmp")] == []
    Fernet(key_file.read_bytes())


def test_creation_refuses_to_follow_a_dangling_symlink(db_file, key_file, tmp_path):
    target = tmp_path / "elsewhere.key"
    key_file.symlink_to(target)
    with pytest.raises(KeyFileError, match="is a symlink"):
        DatabaseManager(db_file, key_file)
    assert not target.exists()


CHILD = """
import sys, time
from pathlib import Path
from kissbot import DatabaseManager
from kissbot.crypto import fingerprint
Path(sys.argv[3] + sys.argv[4]).touch()
go = Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
with DatabaseManager(sys.argv[1], sys.argv[2], busy_timeout_ms=120_000) as mgr:  # the first migrates; a loaded CI box is slow
    print(mgr.get_config("key_fingerprint_v1"), fingerprint(Path(sys.argv[2]).read_bytes().strip()))
"""


@pytest.mark.slow
def test_eight_simultaneous_first_starts_agree_on_one_key(tmp_path):
    db, key, go = tmp_path / "kissbot.db", tmp_path / ".kissbot.key", tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(key), str(go), f".ready{n}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(8)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready*"))) < 8:  # every child imported kissbot and waits at the barrier
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "children did not start"
        time.sleep(0.01)
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    lines = {out.strip() for out, _ in outputs}
    assert len(lines) == 1, lines
    recorded, from_file = lines.pop().split()
    assert recorded == from_file == fingerprint(key.read_bytes())
    assert len(read_key_ring(key).versions) == 1
    assert key.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if "key" in p.name) == [".kissbot.key"]


# --- refusal ------------------------------------------------------------------------------------


def _refusals(tmp_path: Path, key_file: Path, case: str) -> str:
    if case == "0644":
        key_file.write_bytes(Fernet.generate_key())
        key_file.chmod(0o644)
        return f"key file {key_file} is readable by others (mode 0644): run chmod 600 {key_file}"
    if case == "symlink":
        real = tmp_path / "real.key"
        real.write_bytes(Fernet.generate_key())
        real.chmod(0o600)
        key_file.symlink_to(real)
        return (
            f"key file {key_file} is a symlink, which kissbot does not follow: replace it with the key itself "
            f"(cp --remove-destination \"$(readlink -f {key_file})\" {key_file})"
        )
    key_file.write_text("this is not a fernet key\n")
    key_file.chmod(0o600)
    return (
        f"key file {key_file} does not hold a valid Fernet key: restore {key_file} from your backup, "
        "or point to the right key with --key-file PATH or KISSBOT_KEY_FILE"
    )


@pytest.mark.parametrize("case", ["0644", "symlink", "garbage"])
def test_unsafe_or_invalid_key_file_is_refused_in_one_line(tmp_path, db_file, key_file, runner, case):
    DatabaseManager(db_file, tmp_path / "setup.key").close()
    expected = _refusals(tmp_path, key_file, case)
    before = snapshot(tmp_path)
    with pytest.raises(KeyFileError) as caught:
        DatabaseManager(db_file, key_file)
    assert str(caught.value) == expected
    result = runner.invoke(cli, ["stats", "--db", str(db_file), "--key-file", str(key_file)])
    assert result.exit_code == 1
    assert result.output == f"Error: {expected}\n"
    assert snapshot(tmp_path) == before, "a refused key changes nothing"


def test_refusal_through_the_real_cli_is_one_line_without_traceback(tmp_path, db_file, key_file):
    DatabaseManager(db_file, tmp_path / "setup.key").close()
    expected = _refusals(tmp_path, key_file, "0644")
    proc = subprocess.run(
        [*CLI, "key", "status", "--db", str(db_file), "--key-file", str(key_file)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"Problem: {expected}\n"


def test_group_writable_key_is_refused_too(db_file, key_file):
    key_file.write_bytes(Fernet.generate_key())
    key_file.chmod(0o620)
    with pytest.raises(KeyFileError, match=r"is writable by others \(mode 0620\): run chmod 600"):
        DatabaseManager(db_file, key_file)


def test_missing_key_with_tokens_refuses_through_the_cli_and_creates_nothing(tmp_path, db_file, key_file, runner):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 3)
    key_file.unlink()
    before = snapshot(tmp_path)
    result = runner.invoke(cli, ["tokens", "--reveal", "--db", str(db_file), "--key-file", str(key_file)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: key file {key_file} not found but {db_file} holds tokens for 3 users; restore the key from your backup, "
        "or point to it with --key-file PATH or KISSBOT_KEY_FILE\n"
    )
    assert snapshot(tmp_path) == before


# --- sources -------------------------------------------------------------------------------------


def test_kissbot_key_environment_wins_over_the_key_file(store_url, key_file, monkeypatch):
    key = Fernet.generate_key()
    monkeypatch.setenv("KISSBOT_KEY", key.decode())
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "bot")
        mgr.store_tokens(uid, "access", "refresh", 60)
        assert mgr.key_file is None
        assert mgr.get_config("key_fingerprint_v1") == fingerprint(key)
    assert not key_file.exists(), "no key file is made when KISSBOT_KEY is set"
    monkeypatch.delenv("KISSBOT_KEY")
    with DatabaseManager(url=store_url, key=key) as mgr:
        assert mgr.get_tokens(uid)["access_token"] == "access"


def test_kissbot_key_holds_several_keys_newest_first(monkeypatch):
    old, new = Fernet.generate_key(), Fernet.generate_key()
    monkeypatch.setenv("KISSBOT_KEY", f"{new.decode()}, {old.decode()}")
    ring = resolve_key_source().ring
    assert ring.versions == (2, 1) and ring.key(2) == new and ring.key(1) == old
    monkeypatch.setenv("KISSBOT_KEY", f"v7:{new.decode()},v5:{old.decode()}")
    assert resolve_key_source().ring.versions == (7, 5)
    cipher = TokenCipher(resolve_key_source().ring)
    assert cipher.current_version == 7
    assert decrypts_with(new, cipher.encrypt("x"))


def test_key_argument_beats_the_environment_and_key_file_env_is_the_fallback(tmp_path, monkeypatch):
    argument = Fernet.generate_key()
    monkeypatch.setenv("KISSBOT_KEY", Fernet.generate_key().decode())
    assert resolve_key_source(argument).ring.key(1) == argument
    monkeypatch.delenv("KISSBOT_KEY")
    monkeypatch.setenv("KISSBOT_KEY_FILE", str(tmp_path / "env.key"))
    assert resolve_key_source().path == tmp_path / "env.key"
    assert resolve_key_source(key_file="given.key").path == Path("given.key").absolute()
    monkeypatch.delenv("KISSBOT_KEY_FILE")
    assert resolve_key_source().path == Path(".kissbot.key").absolute()


def test_garbage_kissbot_key_is_refused_without_echoing_it(monkeypatch, db_file, runner):
    monkeypatch.setenv("KISSBOT_KEY", "hunter2-not-a-key")
    result = runner.invoke(cli, ["stats", "--db", str(db_file)])
    assert result.exit_code == 1
    assert result.output == (
        "Error: KISSBOT_KEY does not hold a valid Fernet key: "
        "set it to a Fernet key, or several comma-separated, newest first\n"
    )


def test_rotation_refuses_keys_from_the_environment(monkeypatch, db_file, runner):
    DatabaseManager(db_file, key=Fernet.generate_key()).close()
    monkeypatch.setenv("KISSBOT_KEY", Fernet.generate_key().decode())
    result = runner.invoke(cli, ["key", "rotate", "--db", str(db_file)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: keys come from KISSBOT_KEY, which kissbot cannot rewrite: to rotate keys, ")


# --- fingerprints -------------------------------------------------------------------------------


def test_first_open_records_the_fingerprint_and_a_wrong_key_is_refused_before_decrypting(store_url, key_file, tmp_path):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_config("key_fingerprint_v1") == fingerprint(key_file.read_bytes())
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(Fernet.generate_key())
    wrong.chmod(0o600)
    with pytest.raises(KeyFileError, match=f"^key file {wrong} does not match .*: key version 1 has fingerprint "):
        DatabaseManager(url=store_url, key_file=wrong)
    engine = create_engine(store_url)
    try:
        problems = check_key(engine, read_key_ring(wrong), "key file wrong.key", "db")
        assert len(problems) == 1 and problems[0].startswith("key file wrong.key does not match db")
        assert check_key(engine, read_key_ring(key_file)) == []
    finally:
        engine.dispose()


def test_store_without_fingerprints_is_probed_before_its_key_is_recorded(db_file, key_file, tmp_path):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 2)
    with sqlite3.connect(db_file) as conn:  # a store written before fingerprints existed
        conn.execute("DELETE FROM config WHERE key LIKE 'key_fingerprint_v%'")
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(Fernet.generate_key())
    wrong.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        DatabaseManager(db_file, wrong)
    assert str(caught.value) == (
        f"key file {wrong} does not decrypt the tokens in {db_file} (key version 1); "
        "use the key they were written with (restore it from your backup, or point to it with --key-file PATH or "
        "KISSBOT_KEY_FILE)"
    )
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT count(*) FROM config WHERE key LIKE 'key_fingerprint_v%'").fetchone() == (0,)
    DatabaseManager(db_file, key_file).close()
    with sqlite3.connect(db_file) as conn:
        assert conn.execute("SELECT value FROM config WHERE key = 'key_fingerprint_v1'").fetchone() == (
            fingerprint(key_file.read_bytes()),
        )


# --- rotation -----------------------------------------------------------------------------------


def test_rotation_reencrypts_every_row_and_running_bots_follow(store_url, key_file, runner):
    bot = DatabaseManager(url=store_url, key_file=key_file)  # a bot running through the rotation
    ids = fill(bot, 25)
    old_key = key_file.read_bytes()
    result = runner.invoke(cli, ["key", "rotate", "--url", store_url, "--key-file", str(key_file), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.endswith("Rotated to key version 2 (%s): 25 token rows re-encrypted\n" % fingerprint(read_key_ring(key_file).key(2)))
    ring = read_key_ring(key_file)
    assert ring.versions == (2, 1) and ring.key(1) == old_key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert bot.get_tokens(ids[0])["access_token"] == f"access-{ids[0]}", "the bot reads rotated rows"
    bot.store_tokens(ids[1], "new-access", "new-refresh", 60)
    assert bot.engine.dialect._kissbot_cipher.current_version == 2
    status = json.loads(runner.invoke(cli, ["key", "status", "--url", store_url, "--key-file", str(key_file), "--json"]).output)
    assert status["encryption_key_version"] == 2
    assert [(v["version"], v["rows"], v["primary"]) for v in status["versions"]] == [(2, 25, True), (1, 0, False)]
    assert status["problems"] == []
    retire = runner.invoke(cli, ["key", "retire", "1", "--url", store_url, "--key-file", str(key_file)])
    assert retire.exit_code == 0, retire.output
    assert read_key_ring(key_file).versions == (2,)
    assert bot.get_tokens(ids[1])["access_token"] == "new-access"
    with DatabaseManager(url=store_url, key_file=key_file) as fresh:
        assert fresh.get_tokens(ids[2])["refresh_token"] == f"refresh-{ids[2]}"
    bot.close()
    audit = [e["event_type"] for e in DatabaseManager(url=store_url, key_file=key_file).get_audit_log(5)]
    assert audit[:3] == ["key_retired", "tokens_refreshed", "key_rotated"]


def test_retire_refuses_the_primary_and_versions_still_in_use(db_file, key_file, runner):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 3)
    args = ["--db", str(db_file), "--key-file", str(key_file)]
    primary = runner.invoke(cli, ["key", "retire", "1", *args])
    assert primary.output == f"Error: key version 1 is the primary key of {key_file}: run kissbot key rotate, then retire it\n"
    missing = runner.invoke(cli, ["key", "retire", "9", *args])
    assert missing.output == f"Error: key file {key_file} has no key version 9 (it holds 1)\n"
    # a half-done rotation: the key file holds v2, the rows are still at v1
    ring = read_key_ring(key_file).adding(2, Fernet.generate_key())
    key_file.write_bytes(ring.dumps())
    before = key_file.read_bytes()
    in_use = runner.invoke(cli, ["key", "retire", "1", *args])
    assert in_use.exit_code == 1
    assert in_use.output == "Error: key version 1 still encrypts 3 token rows: run kissbot key rotate first\n"
    assert key_file.read_bytes() == before


def test_missing_version_after_rotation_is_refused_at_open(db_file, key_file, tmp_path):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 2)
    old_file = tmp_path / "old.key"
    old_file.write_bytes(key_file.read_bytes())
    old_file.chmod(0o600)
    engine = create_engine(db_file)
    rotate_keys(engine, resolve_key_source(key_file=key_file), db=str(db_file))
    engine.dispose()
    with pytest.raises(KeyFileError) as caught:
        DatabaseManager(db_file, old_file)
    assert str(caught.value) == (
        f"key file {old_file} lacks key version 2, which encrypts 2 token rows in {db_file}; "
        "restore the key file from your backup, or point to one that has it with --key-file PATH or KISSBOT_KEY_FILE"
    )


def test_rotation_leaves_undecryptable_rows_at_their_version_and_fails_closed(db_file, key_file):
    with DatabaseManager(db_file, key_file) as mgr:
        ids = fill(mgr, 4)
    with sqlite3.connect(db_file) as conn:
        conn.execute("UPDATE oauth_tokens SET refresh_token_encrypted = 'gAAAAAbroken' WHERE user_id = ?", (ids[1],))
    engine = create_engine(db_file)
    with pytest.raises(DecryptionError) as caught:
        rotate_keys(engine, resolve_key_source(key_file=key_file), batch_size=2)
    engine.dispose()
    assert str(caught.value).startswith(
        f"rotation to key version 2 is unfinished: 1 token rows cannot be decrypted (first: user {ids[1]}, bot, key version 1)"
    )
    assert (caught.value.user_id, caught.value.key_version) == (ids[1], 1)
    assert sorted((uid, kv) for uid, kv, _, _ in raw_rows(db_file)) == [(i, 1 if i == ids[1] else 2) for i in ids]
    with DatabaseManager(db_file, key_file) as mgr:
        assert mgr.get_config("encryption_key_version") == 1
        assert mgr.get_tokens(ids[0])["access_token"] == f"access-{ids[0]}"


def test_rows_a_bot_rewrites_during_a_batch_keep_the_bots_value_and_end_up_rotated(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        ids = fill(mgr, 6)
    ring = read_key_ring(key_file)
    engine = create_engine(store_url)
    # Before each of the rotation's first two UPDATEs (its first two passes, as
    # the batch holds every row), bots commit new tokens for rows it has just
    # read: with the old key (a bot that encrypted before the key file changed)
    # or with the new one.
    races = [[(ids[1], 1), (ids[3], 2)], [(ids[1], 1)]]
    written = {}

    @sqlalchemy.event.listens_for(engine, "before_cursor_execute")
    def bots_write_first(conn, cursor, statement, parameters, context, executemany):
        if not races or not statement.lstrip().startswith("UPDATE oauth_tokens"):
            return
        new_ring = read_key_ring(key_file)
        for uid, version in races.pop(0):
            cipher = TokenCipher(KeyRing(((version, new_ring.key(version)),)))
            written[uid] = f"bot-access-{uid}-{len(races)}"
            conn.execute(  # in lower case, not to be taken for the rotation's UPDATE
                sqlalchemy.text(
                    "update oauth_tokens set access_token_encrypted = :a, refresh_token_encrypted = :r, "
                    "key_version = :kv, version = version + 1 where user_id = :uid"
                ),
                {"a": cipher.encrypt(written[uid]), "r": cipher.encrypt("bot-refresh"), "kv": version, "uid": uid},
            )

    result = rotate_keys(engine, resolve_key_source(key_file=key_file), db="the store", batch_size=10)
    engine.dispose()
    assert races == []
    assert result.rows == 5, "the old-key row is re-encrypted once, by the third pass; the new-key row is left alone"
    new_key = read_key_ring(key_file).key(2)
    assert new_key != ring.key(1)
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        for uid in ids:
            assert mgr.get_tokens(uid)["access_token"] == written.get(uid, f"access-{uid}"), "no bot write was overwritten"
        assert mgr.get_audit_log(1)[0]["details"]["rows"] == 5
        assert mgr.get_config("encryption_key_version") == 2
    rows = raw_rows(store_url)
    assert {kv for _, kv, _, _ in rows} == {2}
    assert all(decrypts_with(new_key, a) and decrypts_with(new_key, r) for _, _, a, r in rows)


def test_rotation_reencrypts_a_row_labelled_with_the_wrong_key_version(db_file, key_file):
    with DatabaseManager(db_file, key_file) as mgr:
        ids = fill(mgr, 2)
    engine = create_engine(db_file)
    rotate_keys(engine, resolve_key_source(key_file=key_file))
    with sqlite3.connect(db_file) as conn:  # encrypted with v2, labelled v1
        conn.execute("UPDATE oauth_tokens SET key_version = 1 WHERE user_id = ?", (ids[0],))
    result = rotate_keys(engine, resolve_key_source(key_file=key_file))
    engine.dispose()
    assert (result.to_version, result.rows, result.resumed) == (2, 1, True)
    assert {kv for _, kv, _, _ in raw_rows(db_file)} == {2}
    with DatabaseManager(db_file, key_file) as mgr:
        assert [mgr.get_tokens(uid)["access_token"] for uid in ids] == [f"access-{uid}" for uid in ids]


ROTATION_ROWS = 3000


@pytest.mark.slow
def test_rotation_killed_midway_resumes_and_every_row_stays_readable(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        fill(mgr, ROTATION_ROWS)
    old_key = key_file.read_bytes()
    store = ["--url", store_url, "--key-file", str(key_file)]
    proc = subprocess.Popen([*CLI, "key", "rotate", *store, "--batch-size", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watcher = sqlalchemy.create_engine(store_url)
    deadline = time.monotonic() + 120
    try:
        while True:
            assert time.monotonic() < deadline, "rotation never made progress"
            assert proc.poll() is None, "rotation finished before it could be killed: use more rows"
            # Readers never block the rotation; kill it as soon as some rows moved.
            with watcher.connect() as conn:
                moved = conn.exec_driver_sql("SELECT count(*) FROM oauth_tokens WHERE key_version = 2").scalar()
            if moved:
                proc.kill()
                break
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        watcher.dispose()
    rows = raw_rows(store_url)
    killed_at = sum(1 for _, kv, _, _ in rows if kv == 2)
    assert 0 < killed_at < ROTATION_ROWS, "the rotation must have been killed mid-way"
    assert proc.returncode == -9
    ring = read_key_ring(key_file)
    assert ring.versions == (2, 1) and ring.key(1) == old_key, "the new key was saved before any row moved"
    new_key = ring.key(2)
    for _, kv, access, refresh in rows:  # every row readable with its own version's key
        assert decrypts_with(ring.key(kv), access) and decrypts_with(ring.key(kv), refresh)

    retire = subprocess.run([*CLI, "key", "retire", "1", *store], capture_output=True, text=True, timeout=60)
    assert retire.returncode == 1
    assert retire.stderr == (
        f"Error: key version 1 still encrypts {ROTATION_ROWS - killed_at} token rows: run kissbot key rotate first\n"
    )

    again = subprocess.run([*CLI, "key", "rotate", *store], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (
        f"Resumed rotation to key version 2 ({fingerprint(new_key)}): {ROTATION_ROWS - killed_at} token rows re-encrypted\n"
    )
    rows = raw_rows(store_url)
    assert len(rows) == ROTATION_ROWS and {kv for _, kv, _, _ in rows} == {2}
    assert all(decrypts_with(new_key, a) and decrypts_with(new_key, r) for _, _, a, r in rows)
    assert not any(decrypts_with(old_key, a) or decrypts_with(old_key, r) for _, _, a, r in rows)
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_config("encryption_key_version") == 2
        assert mgr.get_tokens(1)["access_token"] == "access-1"
        assert mgr.get_tokens(ROTATION_ROWS)["refresh_token"] == f"refresh-{ROTATION_ROWS}"


BOT = """
import sys
from pathlib import Path
from kissbot import DatabaseManager
db, key, first, ready, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
mgr = DatabaseManager(db, key)
i = 0
while True:
    last = stop.exists()
    uid = first + i % 50
    mgr.store_tokens(uid, f"bot-access-{i}", f"bot-refresh-{i}", 3600)
    assert mgr.get_tokens(uid)["access_token"] == f"bot-access-{i}"
    assert mgr.get_tokens(first + (i + 25) % 50)["refresh_token"].startswith(("refresh-", "bot-refresh-"))
    ready.touch()
    i += 1
    if last:
        break
print(mgr.get_tokens(uid, token_type="bot")["access_token"] == f"bot-access-{i - 1}", mgr.engine.dialect._kissbot_cipher.current_version)
"""


@pytest.mark.slow
def test_bots_keep_reading_and_writing_during_rotation(db_file, key_file, tmp_path):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 400)
    stop = tmp_path / "stop"
    bots = []
    for n in range(2):
        ready = tmp_path / f"ready{n}"
        bots.append((ready, subprocess.Popen(
            [sys.executable, "-c", BOT, str(db_file), str(key_file), str(1 + 50 * n), str(ready), str(stop)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )))
    deadline = time.monotonic() + 60
    while not all(ready.exists() for ready, _ in bots):
        assert time.monotonic() < deadline and all(p.poll() is None for _, p in bots), "bots did not start"
        time.sleep(0.01)
    rotation = subprocess.run([*CLI, "key", "rotate", "--db", str(db_file), "--key-file", str(key_file), "--batch-size", "10"],
                              capture_output=True, text=True, timeout=120)
    stop.touch()
    outputs = [p.communicate(timeout=120) for _, p in bots]
    assert all(p.returncode == 0 for _, p in bots), [err for _, err in outputs]
    assert rotation.returncode == 0, rotation.stderr
    assert [out.split() for out, _ in outputs] == [["True", "2"], ["True", "2"]], "bots now write with key v2"
    ring = read_key_ring(key_file)
    rows = raw_rows(db_file)
    assert all(decrypts_with(ring.key(2), a) and decrypts_with(ring.key(2), r) for _, kv, a, r in rows if kv == 2)
    assert all(decrypts_with(ring.key(1), a) or decrypts_with(ring.key(2), a) for _, kv, a, _ in rows if kv == 1)
    bot_rows = {uid: kv for uid, kv, _, _ in rows if uid <= 100}
    assert set(bot_rows.values()) == {2}, "rows the bots rewrote after the rotation carry key v2"


# --- reset --------------------------------------------------------------------------------------


def test_reset_needs_yes_then_deletes_tokens_and_makes_a_new_key(tmp_path, db_file, key_file, runner):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 3)
    key_file.unlink()  # the key is lost
    args = ["--db", str(db_file), "--key-file", str(key_file)]
    before = snapshot(tmp_path)
    refused = runner.invoke(cli, ["key", "reset", *args])
    assert refused.exit_code == 1
    assert refused.output == f"Error: this deletes 3 token rows of 3 users and replaces key file {key_file}: run again with --yes\n"
    assert snapshot(tmp_path) == before
    done = runner.invoke(cli, ["key", "reset", "--yes", *args])
    assert done.exit_code == 0, done.output
    ring = read_key_ring(key_file)
    assert ring.versions == (2,)
    assert done.stdout == f"Deleted 3 token rows of 3 users; new key version 2 ({fingerprint(ring.key(2))}) in {key_file}\n"
    assert done.stderr == (
        f"Warning: key reset: back up {key_file} now: fingerprint {fingerprint(ring.key(2))[:8]}… (key version 2); "
        "without it the tokens cannot be decrypted\n"
    )
    assert key_file.stat().st_mode & 0o777 == 0o600
    with DatabaseManager(db_file, key_file) as mgr:
        assert mgr.get_stats()["tokens_count"] == 0
        assert mgr.get_config("encryption_key_version") == 2
        event = mgr.get_audit_log(1)[0]
        assert (event["event_type"], event["severity"]) == ("key_reset", "warning")
        assert event["details"] == {"tokens_deleted": 3, "users": 3, "version": 2, "fingerprint": fingerprint(ring.key(2))}
        uid = mgr.get_user_by_login("user0")["id"]
        mgr.store_tokens(uid, "fresh", "fresh-refresh", 60)
        assert mgr.get_tokens(uid)["access_token"] == "fresh"


# --- key file format and the cipher ---------------------------------------------------------------


def test_key_file_format_round_trips_and_rejects_mixtures(tmp_path):
    ring = KeyRing.of([Fernet.generate_key(), Fernet.generate_key()])
    path = tmp_path / "k"
    path.write_bytes(ring.dumps())
    path.chmod(0o600)
    assert read_key_ring(path) == ring
    assert KeyRing.of(ring.key(1)).dumps() == ring.key(1), "a lone version 1 stays the specification's bare key"
    path.write_bytes(b"v2:" + ring.key(2) + b"\n" + ring.key(1) + b"\n")
    with pytest.raises(KeyFileError, match=r"entry 2 is not \"v<version>:<key>\""):
        read_key_ring(path)
    path.write_bytes(b"v2:" + ring.key(2) + b"\nv2:" + ring.key(1) + b"\n")
    with pytest.raises(KeyFileError, match="holds a key version twice"):
        read_key_ring(path)
    assert repr(ring) == f"<KeyRing v2={fingerprint(ring.key(2))}, v1={fingerprint(ring.key(1))}>"


def test_key_file_cipher_ignores_a_file_that_changes_a_version_in_place(tmp_path, caplog):
    path = tmp_path / "k"
    path.write_bytes(Fernet.generate_key())
    path.chmod(0o600)
    cipher = KeyFileCipher(path)
    token = cipher.encrypt("x")
    path.unlink()
    path.write_bytes(Fernet.generate_key())
    path.chmod(0o600)
    assert cipher.decrypt(token) == "x"
    assert cipher.current_version == 1
    assert "changed key version(s) 1 in place, keeping the loaded keys" in caplog.text


# --- golden data ----------------------------------------------------------------------------------


def test_golden_ciphertexts_decrypt_forever():
    golden = json.loads((DATA / "golden_tokens.json").read_text())
    k1, k2 = golden["key_v1"].encode(), golden["key_v2"].encode()
    assert fingerprint(k1) == golden["fingerprint_v1"]
    assert fingerprint(k2) == golden["fingerprint_v2"]
    ring = KeyRing.parse((DATA / "golden_keyfile.txt").read_text().splitlines(), "golden", "-")
    assert ring.versions == (2, 1) and ring.key(1) == k1 and ring.key(2) == k2
    cipher = TokenCipher(ring)
    for name in ("token_v1", "token_v2", "legacy_wrapped_v1"):
        assert cipher.decrypt(golden[name]) == golden["plaintext"], name
    assert decrypts_with(k1, golden["token_v1"]) and decrypts_with(k2, golden["token_v2"])
    assert decrypts_with(k1, golden["legacy_wrapped_v1"])


def test_batch_store_encrypts_with_the_key_file_primary_and_records_it(db_file, key_file):
    # A store left open while the key file gains a version: a batch (an import)
    # looks at the file once, encrypts every token with its newest key and labels
    # the rows with that version.
    from kissbot.engine import write_transaction
    from kissbot.repo import TokenRepository, UserRepository

    with DatabaseManager(db_file, key_file) as mgr:
        with write_transaction(mgr.engine) as conn:
            ids = UserRepository(conn).create_users([{"twitch_user_id": str(i), "twitch_login": f"u{i}"} for i in range(3)])
        old_key, new_key = read_key_ring(key_file).key(1), Fernet.generate_key()
        key_file.write_bytes(read_key_ring(key_file).adding(2, new_key).dumps())
        with write_transaction(mgr.engine) as conn:
            TokenRepository(conn).store_many_tokens([(uid, f"a-{uid}", f"r-{uid}", None) for uid in ids.values()], 60)
        assert mgr.get_tokens(ids["1"])["access_token"] == f"a-{ids['1']}"
    rows = raw_rows(db_file)
    assert len(rows) == 3
    for _, version, access, refresh in rows:
        assert version == 2
        assert decrypts_with(new_key, access) and decrypts_with(new_key, refresh)
        assert not decrypts_with(old_key, access)


def test_opening_a_store_reads_the_token_key_versions_through_their_index(store_url, key_file):
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        for i in range(3):
            mgr.store_tokens(mgr.create_user(str(i), f"user{i}"), "access", "refresh", 3600)
    seen: list[tuple[str, object]] = []

    def capture(_conn, _cursor, statement, parameters, _context, _many) -> None:
        seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", capture)
    try:
        DatabaseManager(url=store_url, key_file=key_file).close()
    finally:
        event.remove(Engine, "before_cursor_execute", capture)
    on_tokens = [(s, p) for s, p in seen if "oauth_tokens" in s]
    assert on_tokens and not [s for s, _ in on_tokens if "GROUP BY" in s or "count(" in s.lower()]
    engine = sqlalchemy.create_engine(store_url)
    try:
        with engine.connect() as conn:
            sqlite = engine.dialect.name == "sqlite"
            if not sqlite:
                conn.exec_driver_sql("SET enable_seqscan = off")  # a plan that can use an index then does
            for statement, parameters in on_tokens:
                plan = conn.exec_driver_sql(("EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN ") + statement, parameters)
                lines = [str(row[-1] if sqlite else row[0]) for row in plan]
                assert not [line for line in lines if line.startswith("SCAN") or "Seq Scan" in line], lines
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 10**20}, {"batch_size": 0}, {"batch_size": "10"}, {"batch_size": 2.5}, {"batch_size": True},
     {"progress": "not callable"}],
    ids=["huge", "zero", "str", "float", "bool", "progress"],
)
def test_rotate_keys_checks_every_argument_before_writing(tmp_path, db_file, key_file, kwargs):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 2)
    before = snapshot(tmp_path)
    engine = create_engine(db_file)
    with pytest.raises(ValidationError):
        rotate_keys(engine, resolve_key_source(key_file=key_file), **kwargs)
    engine.dispose()
    assert snapshot(tmp_path) == before, "no key version was added, no row or audit event written"


@pytest.mark.parametrize("version", ["1", 1.0, 0, 2**63, None])
def test_retire_key_checks_its_version_before_anything(tmp_path, db_file, key_file, version):
    with DatabaseManager(db_file, key_file) as mgr:
        fill(mgr, 1)
    before = snapshot(tmp_path)
    engine = create_engine(db_file)
    with pytest.raises(ValidationError, match="version must be"):
        retire_key(engine, resolve_key_source(key_file=key_file), version)
    engine.dispose()
    assert snapshot(tmp_path) == before
