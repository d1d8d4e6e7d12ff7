"""`kissbot copy`: a whole store into an empty database, in one transaction, checked before commit."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy
from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.copy import COPY_ORDER, copy_store
from kissbot.crypto import TokenCipher, read_key_ring
from kissbot.engine import create_engine
from kissbot.errors import TargetNotEmpty
from kissbot.migrations import HEAD, downgrade
from kissbot.models import AuditLog
from kissbot.repo import ConfigRepository
from kissbot.types import utcnow

BACKENDS = ("sqlite", "postgresql")


def fill(url: str, key_file) -> dict[str, int]:
    """A store filled through the specification's API; returns the user ids by login."""
    with DatabaseManager(url=url, key_file=key_file) as mgr:
        ids = {
            "serda_bot": mgr.create_user("1209350837", "Serda_Bot", display_name="Serda_Bot", is_bot=True),
            "el_serda": mgr.create_user("44322889", "el_serda", display_name="El_Serda"),
            "other_bot": mgr.create_user("555", "other_bot", is_bot=True),
            "quiet": mgr.create_user("777", "quiet", display_name=None),
        }
        mgr.store_tokens(ids["serda_bot"], "bot-access-é", "bot-refresh", 14400, scopes=["chat:read", "chat:edit"])
        mgr.store_tokens(ids["serda_bot"], "bot-access-2", "bot-refresh-2", 14400, scopes=["chat:read"])
        mgr.store_tokens(
            ids["el_serda"], "bc-access", "bc-refresh", 3600, scopes=["channel:read:subscriptions"],
            token_type="broadcaster",
        )
        mgr.store_tokens(ids["el_serda"], "chan-bot-access", "chan-bot-refresh", 60)
        mgr.store_tokens(ids["other_bot"], "other-access", "other-refresh", 120)
        mgr.increment_refresh_failures(ids["other_bot"])
        mgr.mark_tokens_expired(ids["other_bot"])
        running = mgr.register_instance("el_serda", "serda_bot", 4242)
        mgr.update_instance_heartbeat(running)
        crashed = mgr.register_instance("quiet", "other_bot", 99)
        mgr.stop_instance(crashed, crash=True)
        mgr.log_event("bot_connected", user_id=ids["serda_bot"], channel_id=ids["el_serda"], details={"ms": 12})
        mgr.log_event("warning_seen", severity="warning", details={"text": "Ça va ?"})
        mgr.set_config("custom_setting", {"nested": [1, 2]}, description="Mon setting")
        mgr.set_config("token_refresh_interval", 120)
        with mgr.session() as s:  # the newest audit ids are then deleted: ids are not to be reused
            s.add_all(AuditLog(event_type="old", timestamp=utcnow() - timedelta(days=90)) for _ in range(3))
        assert mgr.cleanup_old_logs(days=30) == 3
    return ids


def snapshot(url: str, key_file, ids: dict[str, int]) -> dict:
    """Everything the API reads back from a store."""
    with DatabaseManager(url=url, key_file=key_file) as mgr:
        stats = mgr.get_stats()
        del stats["db_size_bytes"]
        with mgr.session() as s:
            config = ConfigRepository(s).list_config()
        return {
            "tokens": {
                (login, kind): mgr.get_tokens(uid, token_type=kind) for login, uid in ids.items() for kind in ("bot", "broadcaster")
            },
            "users": {login: mgr.get_user(mgr.get_user_by_login(login)["twitch_user_id"]) for login in ids},
            "list_users": mgr.list_users(),
            "audit": mgr.get_audit_log(limit=1000),
            "config": config,
            "refresh": mgr.get_tokens_needing_refresh(buffer_minutes=60 * 24),
            "active": mgr.get_active_instances(),
            "stats": stats,
        }


def table_rows(url: str) -> dict[str, list]:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        names = set(sqlalchemy.inspect(conn).get_table_names())
        rows = {t: conn.exec_driver_sql(f"SELECT * FROM {t} ORDER BY 1").all() for t in COPY_ORDER if t in names}
    engine.dispose()
    return rows


def only_default_config(url: str) -> None:
    rows = table_rows(url)
    assert {t: len(r) for t, r in rows.items()} == {
        "users": 0, "oauth_tokens": 0, "instances": 0, "audit_log": 0, "config": 5,
    }


def shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


@pytest.mark.parametrize(("source_backend", "target_backend"), [("sqlite", "postgresql"), ("postgresql", "sqlite")])
def test_copy_gives_an_identical_store(request, source_backend, target_backend, key_file):
    source = request.getfixturevalue(f"{source_backend}_url")
    target = request.getfixturevalue(f"{target_backend}_url")
    ids = fill(source, key_file)
    before = snapshot(source, key_file, ids)
    result = CliRunner().invoke(cli, ["copy", "--from", source, "--to", target, "--key-file", str(key_file)])
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"Copied {shown(source)} → {shown(target)}\n"
        "  users: 4\n  oauth_tokens: 4\n  instances: 2\n  audit_log: 15\n  config: 7\n"
        f"✅ Row counts match; 4 token rows decrypt with {key_file}\n"
    )
    after = snapshot(target, key_file, ids)
    assert after == before
    assert after["tokens"][("serda_bot", "bot")]["access_token"] == "bot-access-2"
    assert after["tokens"][("el_serda", "broadcaster")]["access_token"] == "bc-access"
    with DatabaseManager(url=target, key_file=key_file) as mgr:  # sequences continue past the copied ids
        assert mgr.create_user("999", "newcomer") == max(ids.values()) + 1
        mgr.log_event("after_copy")
        newest = mgr.get_audit_log(limit=1)[0]
        assert newest["id"] == max(e["id"] for e in before["audit"]) + 3 + 2, "the 3 deleted audit ids are not reused"


def test_copy_in_small_batches_copies_every_row(sqlite_url, postgresql_url, key_file):
    ids = fill(sqlite_url, key_file)
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        for n in range(25):
            mgr.log_event("bulk", details={"n": n})
    report = copy_store(sqlite_url, postgresql_url, TokenCipher(read_key_ring(key_file)), batch_size=2)
    assert report.counts["audit_log"] == 15 + 25
    assert snapshot(postgresql_url, key_file, ids) == snapshot(sqlite_url, key_file, ids)


@pytest.mark.parametrize("target_backend", BACKENDS)
def test_non_empty_target_is_refused_and_left_unchanged(request, target_backend, sqlite_url, tmp_path, key_file):
    fill(sqlite_url, key_file)
    if target_backend == "sqlite":
        target = f"sqlite:///{tmp_path / 'target.db'}"
    else:
        target = request.getfixturevalue("postgresql_url")
    with DatabaseManager(url=target, key_file=tmp_path / "target.key") as mgr:
        mgr.create_user("1", "already_here")
    before = table_rows(target)
    target_file = tmp_path / "target.db"
    file_before = target_file.read_bytes() if target_backend == "sqlite" else None
    files_before = sorted(p.name for p in tmp_path.glob("target*"))
    result = CliRunner().invoke(cli, ["copy", "--from", sqlite_url, "--to", target, "--key-file", str(key_file)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: target {shown(target)} is not empty (users: 1, audit_log: 1): kissbot copy only fills an empty store\n"
    )
    assert sorted(p.name for p in tmp_path.glob("target*")) == files_before
    if target_backend == "sqlite":
        assert target_file.read_bytes() == file_before
    assert table_rows(target) == before


def test_custom_config_counts_as_not_empty(sqlite_url, postgresql_url, key_file):
    fill(sqlite_url, key_file)
    with DatabaseManager(url=postgresql_url, key_file=key_file) as mgr:
        mgr.set_config("mine", 1)
    with pytest.raises(TargetNotEmpty, match=r"is not empty \(config: 1\)"):
        copy_store(sqlite_url, postgresql_url, TokenCipher(read_key_ring(key_file)))


def test_the_settings_kissbot_reads_do_not_count_as_content(sqlite_url, postgresql_url, key_file):
    fill(sqlite_url, key_file)
    with DatabaseManager(url=postgresql_url, key_file=key_file) as mgr:
        mgr.set_config("token_validate_interval", 60)
        mgr.set_config("max_refresh_failures", 5)
    copy_store(sqlite_url, postgresql_url, TokenCipher(read_key_ring(key_file)))
    with DatabaseManager(url=sqlite_url, key_file=key_file) as source, DatabaseManager(url=postgresql_url, key_file=key_file) as copy:
        assert copy.list_config() == source.list_config()


def test_a_failure_mid_copy_leaves_the_target_empty(sqlite_url, postgresql_url, key_file):
    """An audit row naming a user that does not exist passes SQLite (foreign keys off) but not PostgreSQL."""
    fill(sqlite_url, key_file)
    import sqlite3

    with sqlite3.connect(make_url(sqlite_url).database) as raw:  # the last table copied before config
        raw.execute("INSERT INTO audit_log (event_type, user_id, timestamp) VALUES ('orphan', 4242, '2025-11-05 00:00:00')")
    result = CliRunner().invoke(
        cli, ["copy", "--from", sqlite_url, "--to", postgresql_url, "--key-file", str(key_file)]
    )
    assert result.exit_code == 1
    assert result.output == (
        'Error: copying audit_log failed: insert or update on table "audit_log" violates foreign key constraint '
        '"fk_audit_log_user_id_users"; nothing was copied\n'
    )
    only_default_config(postgresql_url)


def test_a_wrong_key_copies_nothing(sqlite_url, postgresql_url, key_file, tmp_path):
    fill(sqlite_url, key_file)
    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(Fernet.generate_key())
    wrong.chmod(0o600)
    result = CliRunner().invoke(cli, ["copy", "--from", sqlite_url, "--to", postgresql_url, "--key-file", str(wrong)])
    assert result.exit_code == 1
    assert result.output == (
        "Error: tokens of user 1 (bot) do not decrypt with this key (wrong key or corrupted data): nothing was copied\n"
    )
    only_default_config(postgresql_url)


def test_source_must_be_at_head(sqlite_url, postgresql_url, key_file, tmp_path):
    fill(sqlite_url, key_file)
    engine = create_engine(sqlite_url)
    with engine.begin() as conn:  # 0002 refuses to drop broadcaster tokens
        conn.exec_driver_sql("DELETE FROM oauth_tokens WHERE token_type = 'broadcaster'")
    downgrade(engine, "0001")
    engine.dispose()
    path = make_url(sqlite_url).database
    before = open(path, "rb").read()
    result = CliRunner().invoke(cli, ["copy", "--from", sqlite_url, "--to", postgresql_url, "--key-file", str(key_file)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: source {shown(sqlite_url)} is at migration 0001, not {HEAD}: run `kissbot init-db --db {path}` first\n"
    )
    assert open(path, "rb").read() == before
    assert table_rows(postgresql_url) == {}


def test_missing_source_is_not_created(tmp_path, key_file):
    missing = tmp_path / "missing.db"
    key_file.write_bytes(Fernet.generate_key())
    key_file.chmod(0o600)
    args = ["copy", "--from", str(missing), "--to", str(tmp_path / "t.db"), "--key-file", str(key_file)]
    result = CliRunner().invoke(cli, args)
    assert (result.exit_code, result.output) == (1, f"Error: source database {missing} does not exist\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [key_file.name]
