"""Schema v2: token types, status, row versions (compare-and-set) and refresh leases."""

from __future__ import annotations

import pytest

from kissbot.errors import KissbotError, StaleTokens
from kissbot.repo import TokenRepository


def test_a_user_holds_bot_and_broadcaster_tokens(mgr, bot):
    mgr.store_tokens(bot, "bot-access", "bot-refresh", 3600)
    mgr.store_tokens(bot, "bc-access", "bc-refresh", 3600, scopes=["channel:read:subscriptions"], token_type="broadcaster")
    assert mgr.get_tokens(bot)["access_token"] == "bot-access"
    broadcaster = mgr.get_tokens(bot, token_type="broadcaster")
    assert (broadcaster["access_token"], broadcaster["token_type"]) == ("bc-access", "broadcaster")
    assert mgr.get_stats()["tokens_count"] == 2
    due = mgr.get_tokens_needing_refresh(buffer_minutes=999999)
    assert sorted(t["token_type"] for t in due) == ["bot", "broadcaster"]


def test_unknown_token_type_is_refused(mgr, bot):
    with pytest.raises(KissbotError, match="token_type must be one of bot, broadcaster"):
        mgr.store_tokens(bot, "a", "r", 60, token_type="app")


def test_status_follows_needs_reauth(mgr, bot):
    mgr.store_tokens(bot, "a", "r", 60)
    assert mgr.get_tokens(bot)["status"] == "valid"
    mgr.mark_tokens_expired(bot)
    tokens = mgr.get_tokens(bot)
    assert (tokens["status"], tokens["needs_reauth"]) == ("expired", True)
    with mgr.session() as s:
        TokenRepository(s).mark_tokens_expired(bot, revoked=True)
    assert mgr.get_tokens(bot)["status"] == "revoked"
    mgr.store_tokens(bot, "b", "s", 60)
    tokens = mgr.get_tokens(bot)
    assert (tokens["status"], tokens["needs_reauth"]) == ("valid", False)


def test_version_grows_and_last_refresh_is_set_on_refresh(mgr, bot):
    mgr.store_tokens(bot, "a", "r", 60)
    first = mgr.get_tokens(bot)
    assert (first["version"], first["last_refresh"]) == (1, None)
    mgr.store_tokens(bot, "b", "s", 60)
    second = mgr.get_tokens(bot)
    assert second["version"] == 2
    assert second["last_refresh"] is not None and second["last_refresh"] >= first["created_at"]


def test_compare_and_set_refuses_a_stale_writer(mgr, bot):
    with mgr.session() as s:
        TokenRepository(s).store_tokens(bot, "a1", "r1", 60, expected_version=0)
    seen = mgr.get_tokens(bot)["version"]
    with mgr.session() as s:
        TokenRepository(s).store_tokens(bot, "a2", "r2-newest", 60, expected_version=seen)
    with pytest.raises(StaleTokens, match=f"user {bot} \\(bot\\) are at version 2, not 1"):
        with mgr.session() as s:
            TokenRepository(s).store_tokens(bot, "a3", "r3-stale", 60, expected_version=seen)
    assert mgr.get_tokens(bot)["refresh_token"] == "r2-newest"
    with pytest.raises(StaleTokens):
        with mgr.session() as s:
            TokenRepository(s).store_tokens(bot, "a4", "r4", 60, expected_version=0)


def test_compare_and_set_on_a_missing_row_needs_version_zero(mgr, bot):
    with pytest.raises(StaleTokens, match="version 0, not 3"):
        with mgr.session() as s:
            TokenRepository(s).store_tokens(bot, "a", "r", 60, expected_version=3)
    assert mgr.get_tokens(bot) is None


def test_refresh_lease_has_one_holder_and_expires(mgr, bot):
    mgr.store_tokens(bot, "a", "r", 60)
    with mgr.session() as s:
        tokens = TokenRepository(s)
        assert tokens.claim_refresh(bot, "worker-1", ttl=60) is True
        assert tokens.claim_refresh(bot, "worker-2", ttl=60) is False
        assert tokens.claim_refresh(bot, "worker-1", ttl=60) is True, "the holder may extend"
        assert tokens.release_refresh(bot, "worker-2") is False
        assert tokens.release_refresh(bot, "worker-1") is True
        assert tokens.claim_refresh(bot, "worker-2", ttl=-1) is True
        assert tokens.claim_refresh(bot, "worker-3", ttl=60) is True, "an expired lease can be taken over"
        assert tokens.claim_refresh(bot, "worker-2", ttl=60) is False


def test_claim_on_missing_tokens_is_false(mgr, bot):
    with mgr.session() as s:
        assert TokenRepository(s).claim_refresh(bot, "w", ttl=60) is False


def test_upgrade_downgrade_upgrade_round_trips_on_data(store_url, key_file):
    """Both token types live together at head; once the baseline can hold the rows, 0002 round-trips them."""
    from alembic.util import CommandError

    from kissbot import DatabaseManager
    from kissbot.engine import create_engine
    from kissbot.migrations import HEAD, current_revision, downgrade, upgrade

    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        ids = [mgr.create_user(str(n), f"user_{n}") for n in range(3)]
        mgr.create_user("99", "serda_bot", is_bot=True)
        for uid in ids:
            mgr.store_tokens(uid, f"access-{uid}", f"refresh-{uid}", 3600 * uid, scopes=[f"scope:{uid}"])
        mgr.mark_tokens_expired(ids[1])
        mgr.increment_refresh_failures(ids[1])
        mgr.store_tokens(ids[2], "bc-access", "bc-refresh", 60, token_type="broadcaster")
        mgr.register_instance("user_0", "serda_bot", 4242)
        before = {uid: mgr.get_tokens(uid) for uid in ids}
        audit = [(e["id"], e["event_type"]) for e in mgr.get_audit_log()]
    engine = create_engine(store_url)
    with pytest.raises(CommandError, match=f"users {ids[2]} hold both bot and broadcaster tokens"):
        downgrade(engine, "0001")
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_tokens(ids[2], token_type="broadcaster")["access_token"] == "bc-access"
    with engine.begin() as conn:
        assert current_revision(conn) == HEAD
        conn.exec_driver_sql("DELETE FROM oauth_tokens WHERE token_type = 'broadcaster'")
    downgrade(engine, "0001")
    upgrade(engine)
    engine.dispose()
    kept = ("access_token", "refresh_token", "scopes", "expires_at", "needs_reauth", "refresh_failures", "status", "token_type")
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        for uid in ids:
            after = mgr.get_tokens(uid)
            assert {k: after[k] for k in kept} == {k: before[uid][k] for k in kept}
        assert [(e["id"], e["event_type"]) for e in mgr.get_audit_log()] == audit
        assert [i["pid"] for i in mgr.get_active_instances()] == [4242]
        mgr.store_tokens(ids[2], "bc-again", "r", 60, token_type="broadcaster")
        assert mgr.get_tokens(ids[2], token_type="broadcaster")["access_token"] == "bc-again"
        assert mgr.get_tokens(ids[2])["access_token"] == f"access-{ids[2]}"
