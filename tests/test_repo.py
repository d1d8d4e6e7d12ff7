"""Repositories work inside the caller's session and never commit, on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from kissbot.crypto import TokenCipher, generate_key
from kissbot.engine import create_engine, writer
from kissbot.migrations import upgrade
from kissbot.errors import DecryptionError
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
