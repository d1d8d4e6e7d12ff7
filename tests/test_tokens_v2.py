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
