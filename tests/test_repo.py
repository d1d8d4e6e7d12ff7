"""Repositories work inside the caller's session and never commit, on both backends."""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from kissbot.crypto import TokenCipher, generate_key
from kissbot.engine import create_engine, writer
from kissbot.migrations import upgrade
from kissbot.errors import DecryptionError, DuplicateUser, KissbotError
import kissbot.repo as repo_module
from kissbot.repo import AuditRepository, ConfigRepository, InstanceRepository, TokenRepository, UserRepository


@pytest.fixture
def kissbot_engine(store_url):
    """Like the plugin's fixture of that name, on each backend."""
    engine = create_engine(store_url, cipher=TokenCipher(generate_key()))
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def kissbot_session(kissbot_engine):
    with Session(writer(kissbot_engine)) as session:
        yield session
        session.rollback()


def test_repositories_cover_the_manager_api(kissbot_session):
    users, tokens = UserRepository(kissbot_session), TokenRepository(kissbot_session)
    bot = users.create_user("1", "Serda_Bot", is_bot=True)
    channel = users.create_user("2", "el_serda")
    tokens.store_tokens(bot, "access", "refresh", 600, scopes=["chat:read"])
    assert tokens.get_tokens(bot)["access_token"] == "access"
    assert [t["user_id"] for t in tokens.get_tokens_needing_refresh(buffer_minutes=15)] == [bot]
    instances = InstanceRepository(kissbot_session)
    iid = instances.register_instance("el_serda", "serda_bot", 42)
    instances.update_instance_heartbeat(iid)
    assert [i["channel_id"] for i in instances.get_active_instances()] == [channel]
    audit = AuditRepository(kissbot_session)
    assert audit.get_audit_log(limit=1)[0]["event_type"] == "instance_started"
    config = ConfigRepository(kissbot_session)
    config.set_config("feature", {"on": True})
    assert config.get_config("feature") == {"on": True}
    assert {c["key"] for c in config.list_config()} >= {"feature", "max_crash_count"}


def test_repositories_never_commit(kissbot_engine):
    with Session(writer(kissbot_engine)) as session:
        uid = UserRepository(session).create_user("1", "bot")
        TokenRepository(session).store_tokens(uid, "a", "r", 60)
        AuditRepository(session).log_event("x")
        ConfigRepository(session).set_config("k", "v")
        session.rollback()
    with Session(kissbot_engine) as session:
        assert UserRepository(session).count() == 0
        assert TokenRepository(session).count() == 0
        assert AuditRepository(session).count() == 0
        assert ConfigRepository(session).get_config("k") is None


def test_token_repository_on_a_core_connection(kissbot_engine):
    with writer(kissbot_engine).begin() as conn:
        uid = UserRepository(conn).create_user("1", "bot")
        assert TokenRepository(conn).store_tokens(uid, "a", "r", 60) is True
        assert TokenRepository(conn).store_tokens(uid, "b", "s", 60) is False
    with kissbot_engine.connect() as conn:
        assert TokenRepository(conn).get_tokens(uid)["refresh_token"] == "s"


def test_orm_model_reads_decrypted_values(kissbot_session):
    from kissbot.models import OAuthToken

    uid = UserRepository(kissbot_session).create_user("1", "bot")
    TokenRepository(kissbot_session).store_tokens(uid, "plain-access", "plain-refresh", 60)
    token = kissbot_session.query(OAuthToken).filter_by(user_id=uid).one()
    assert token.access_token_encrypted == "plain-access"
    assert "plain" not in repr(token)


def test_decryption_error_names_the_user_in_a_session(kissbot_engine, kissbot_session):
    from kissbot.crypto import TokenCipher, generate_key
    from kissbot.types import attach_cipher

    uid = UserRepository(kissbot_session).create_user("1", "bot")
    TokenRepository(kissbot_session).store_tokens(uid, "a", "r", 60)
    kissbot_session.flush()
    attach_cipher(kissbot_engine, TokenCipher(generate_key()))
    with pytest.raises(DecryptionError, match=f"Failed to decrypt tokens for user {uid} \\(key version 1\\): wrong key or corrupted data"):
        TokenRepository(kissbot_session).get_tokens(uid)


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "reselect"])
def test_batch_methods_write_no_event_of_their_own(kissbot_engine, monkeypatch, returning):
    # create_users reads the new ids back with RETURNING, or (drivers without
    # RETURNING on executemany, such as SQLite before 3.35) with a second query.
    monkeypatch.setattr(kissbot_engine.dialect, "insert_executemany_returning", returning)
    with Session(kissbot_engine) as s, s.begin():
        users = UserRepository(s)
        kept = users.create_user("1", "kept")
        ids = users.create_users([{"twitch_user_id": 100 + i, "twitch_login": f"Bulk_{i}", "is_bot": i == 0} for i in range(450)])
        assert sorted(ids) == sorted(str(100 + i) for i in range(450))
        assert {u["id"]: u["twitch_login"] for u in users.find_users(["100", "549"], ["KEPT"])} == {
            kept: "kept", ids["100"]: "bulk_0", ids["549"]: "bulk_449"
        }
        assert users.get_user("100")["is_bot"] and not users.get_user("101")["is_bot"]
        tokens = TokenRepository(s)
        tokens.store_tokens(ids["100"], "a0", "r0", 60)
        assert tokens.store_many_tokens([(ids["100"], "a1", "r1", None), (ids["101"], "a2", "r2", ["chat:read"])], 3600) == 1
        assert (tokens.get_tokens(ids["100"])["access_token"], tokens.get_tokens(ids["100"])["version"]) == ("a1", 2)
        assert tokens.get_tokens(ids["101"])["scopes"] == ["chat:read"]
        users.set_display_names({ids["101"]: "Bulk_One"})
        assert users.get_user("101")["display_name"] == "Bulk_One"
        AuditRepository(s).log_events("imported", [(ids["100"], {"login": "bulk_0"}), (ids["101"], None)])
        events = AuditRepository(s).get_audit_log(limit=100)
        # Only the single-row methods wrote events: user_created and tokens_created.
        assert sorted(e["event_type"] for e in events) == ["imported", "imported", "tokens_created", "user_created"]
        with pytest.raises(KissbotError, match="drop access_token"):
            AuditRepository(s).log_events("imported", [(None, {"access_token": "secret"})])
        with pytest.raises(DuplicateUser):
            users.create_users([{"twitch_user_id": 999, "twitch_login": "new"}, {"twitch_user_id": 998, "twitch_login": "KEPT"}])
        assert users.get_user("999") is None


@contextmanager
def executor(engine, kind):
    """A Session or a Core Connection in a transaction (the batch methods hand rows to the driver on the latter)."""
    if kind == "session":
        with Session(engine) as s, s.begin():
            yield s
    else:
        with engine.begin() as conn:
            yield conn


def core(db):
    return db.connection() if isinstance(db, Session) else db


@pytest.mark.parametrize("clock", ["now", "whole-second"])
@pytest.mark.parametrize("kind", ["session", "connection"])
def test_batch_methods_store_rows_exactly_as_the_single_row_methods(kissbot_engine, kind, clock, monkeypatch):
    # The batch methods write the values all their rows share (times, flags)
    # into the statement as SQL literals instead of binding them per row: what is
    # stored, and what reads return, must not differ from the single-row methods'.
    # A time with no microseconds is where a literal's text could differ from a bound value's.
    if clock == "whole-second":
        fixed = repo_module.utcnow().replace(microsecond=0)
        monkeypatch.setattr(repo_module, "utcnow", lambda: fixed)
    def stored(s, table, row_id):
        row = core(s).exec_driver_sql(f"SELECT * FROM {table} WHERE id = {row_id}").mappings().one()
        skip = {"id", "user_id", "twitch_user_id", "twitch_login", "access_token_encrypted", "refresh_token_encrypted"}
        return {k: re.sub(r"\d", "0", v) if isinstance(v, str) else (type(v), v if k not in TIMES else None)
                for k, v in row.items() if k not in skip}

    with executor(kissbot_engine, kind) as s:
        users, tokens, audit = UserRepository(s), TokenRepository(s), AuditRepository(s)
        single = users.create_user("1", "single", display_name="Same")
        batch = users.create_users([{"twitch_user_id": "2", "twitch_login": "batch", "display_name": "Same"}])["2"]
        assert stored(s, "users", single) == stored(s, "users", batch)
        for _ in range(2):  # an INSERT, then an UPDATE of the row
            tokens.store_tokens(single, "access", "refresh", 3600, scopes=["chat:read"])
            tokens.store_many_tokens([(batch, "access", "refresh", ["chat:read"])], 3600)
            ids = dict(core(s).exec_driver_sql("SELECT user_id, id FROM oauth_tokens").all())
            assert stored(s, "oauth_tokens", ids[single]) == stored(s, "oauth_tokens", ids[batch])
            read = [tokens.get_tokens(uid) for uid in (single, batch)]
            assert read[0].keys() == read[1].keys()
            for key in read[0]:
                if key in TIMES and read[0][key] is not None:
                    assert abs(read[0][key] - read[1][key]) < timedelta(seconds=5) and read[1][key].utcoffset() == timedelta(0)
                elif key != "user_id":
                    assert read[0][key] == read[1][key], key
        audit.log_event("imported", user_id=single, details={"login": "single"})
        audit.log_events("imported", [(batch, {"login": "batch"})])
        events = {e["user_id"]: e for e in audit.get_audit_log(event_type="imported")}
        assert events[batch]["severity"] == events[single]["severity"] == "info"
        assert abs(events[batch]["timestamp"] - events[single]["timestamp"]) < timedelta(seconds=5)
        ids = dict(core(s).exec_driver_sql("SELECT user_id, id FROM audit_log WHERE event_type = 'imported'").all())
        assert stored(s, "audit_log", ids[single]) == stored(s, "audit_log", ids[batch]) | {"details": '{"login": "single"}'}
        users.update_user(single, display_name="Renamed")
        users.set_display_names({batch: "Renamed"})
        assert stored(s, "users", single) == stored(s, "users", batch)
        assert users.get_user("2")["display_name"] == "Renamed"


TIMES = {"created_at", "updated_at", "expires_at", "last_refresh", "timestamp"}


@pytest.mark.parametrize("kind", ["session", "connection"])
def test_batch_methods_store_text_with_quotes_percent_signs_and_backslashes_as_given(kissbot_engine, kind):
    # psycopg reads %(name)s and %% in the SQL it is handed: text written into a
    # statement instead of bound would come back altered on PostgreSQL.
    odd = "50%_it's \\ done %(x)s %%"
    with executor(kissbot_engine, kind) as s:
        users, audit = UserRepository(s), AuditRepository(s)
        uid = users.create_users([{"twitch_user_id": "7", "twitch_login": "odd", "display_name": odd}])["7"]
        users.set_display_names({uid: odd + "!"})
        TokenRepository(s).store_many_tokens([(uid, odd, odd, [odd])], 60)
        audit.log_events(odd, [(uid, {"note": odd})])
        assert users.get_user("7")["display_name"] == odd + "!"
        tokens = TokenRepository(s).get_tokens(uid)
        assert (tokens["access_token"], tokens["refresh_token"], tokens["scopes"]) == (odd, odd, [odd])
        [event] = audit.get_audit_log(event_type=odd)
        assert (event["user_id"], event["details"]) == (uid, {"note": odd})


@pytest.mark.parametrize("kind", ["session", "connection"])
@pytest.mark.parametrize("stored", [3, 450], ids=["small-store", "large-store"])
def test_batch_lookups_read_the_whole_table_or_by_chunks_alike(kissbot_engine, stored, kind):
    # With no more rows than names the batch methods read the whole table, otherwise
    # they look the names up 400 at a time: the answers must not depend on it.
    with executor(kissbot_engine, kind) as s:
        users, tokens = UserRepository(s), TokenRepository(s)
        ids = users.create_users([{"twitch_user_id": 100 + i, "twitch_login": f"User_{i}"} for i in range(stored)])
        tokens.store_many_tokens([(ids[str(100 + i)], "a", "r", None) for i in range(0, stored, 2)], 60)
        tokens.store_tokens(ids["101"], "b", "b", 60, token_type="broadcaster")
        found = users.find_users(["100", "101", "9999"], ["USER_2", "nobody", "user_0"])
        assert sorted(u["twitch_login"] for u in found) == ["user_0", "user_1", "user_2"]
        # user_0 and user_2 hold bot tokens; user_1 only broadcaster ones: one new bot row.
        batch = [(ids[str(100 + i)], f"a{i}", f"r{i}", None) for i in range(3)]
        assert tokens.store_many_tokens(batch, 60) == 1
        assert [tokens.get_tokens(ids[str(100 + i)])["version"] for i in range(3)] == [2, 1, 2]
        assert tokens.get_tokens(ids["101"], token_type="broadcaster")["access_token"] == "b"
