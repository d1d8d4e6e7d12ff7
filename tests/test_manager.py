"""The specification's DatabaseManager API, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from kissbot.errors import (
    DuplicateUser,
    InstanceDisabled,
    InstanceNotFound,
    KissbotError,
    UserNotFound,
)

ACCESS = "yrxyuiyffxiqsbc6cpr5y7utl7xmtd"
REFRESH = "kwgxkn1ylz67vho6yoh6q88pj26xve9m4hwwa8ztcx82bd3n1z"


def test_create_and_get_user(mgr):
    user_id = mgr.create_user(twitch_user_id="1209350837", twitch_login="Serda_Bot", display_name="Serda_Bot", is_bot=True)
    user = mgr.get_user_by_login("SERDA_BOT")
    assert user["id"] == user_id
    assert user["twitch_login"] == "serda_bot"
    assert user["display_name"] == "Serda_Bot"
    assert user["is_bot"] is True
    assert user["created_at"].tzinfo == timezone.utc
    assert mgr.get_user("1209350837") == user
    assert mgr.get_user(1209350837) == user
    assert mgr.get_user("404") is None
    assert mgr.get_user_by_login("nobody") is None


def test_duplicate_user_is_refused(mgr, bot):
    with pytest.raises(DuplicateUser, match="1209350837"):
        mgr.create_user("1209350837", "other")
    with pytest.raises(DuplicateUser, match="serda_bot"):
        mgr.create_user("2", "SERDA_bot")
    assert mgr.get_stats()["users_count"] == 1


def test_update_user(mgr, bot):
    mgr.update_user(bot, display_name="SerdaBot", twitch_login="New_Login")
    user = mgr.get_user_by_login("new_login")
    assert (user["id"], user["display_name"]) == (bot, "SerdaBot")
    with pytest.raises(KissbotError, match="password"):
        mgr.update_user(bot, password="x")
    with pytest.raises(UserNotFound):
        mgr.update_user(999, display_name="x")


def test_store_and_get_tokens(mgr, bot):
    before = datetime.now(timezone.utc)
    mgr.store_tokens(user_id=bot, access_token=ACCESS, refresh_token=REFRESH, expires_in=3600, scopes=["chat:read", "chat:edit"])
    tokens = mgr.get_tokens(bot)
    assert tokens["user_id"] == bot
    assert tokens["access_token"] == ACCESS
    assert tokens["refresh_token"] == REFRESH
    assert tokens["scopes"] == ["chat:read", "chat:edit"]
    assert tokens["needs_reauth"] is False
    assert tokens["refresh_failures"] == 0
    assert tokens["expires_at"].tzinfo == timezone.utc
    assert before + timedelta(seconds=3599) <= tokens["expires_at"] <= datetime.now(timezone.utc) + timedelta(seconds=3601)
    assert {"created_at", "updated_at"} <= tokens.keys()


def test_get_tokens_of_user_without_tokens_is_none(mgr, bot):
    assert mgr.get_tokens(bot) is None


def test_store_tokens_replaces_and_resets_flags(mgr, bot):
    mgr.store_tokens(bot, "a1", "r1", 3600)
    mgr.mark_tokens_expired(bot)
    assert mgr.increment_refresh_failures(bot) == 1
    assert mgr.increment_refresh_failures(bot) == 2
    flagged = mgr.get_tokens(bot)
    assert (flagged["needs_reauth"], flagged["refresh_failures"]) == (True, 2)
    mgr.store_tokens(bot, "a2", "r2", 7200, scopes=["chat:read"])
    tokens = mgr.get_tokens(bot)
    assert (tokens["access_token"], tokens["refresh_token"]) == ("a2", "r2")
    assert (tokens["needs_reauth"], tokens["refresh_failures"], tokens["scopes"]) == (False, 0, ["chat:read"])
    assert mgr.get_stats()["tokens_count"] == 1
    events = [e["event_type"] for e in mgr.get_audit_log(event_type=None, user_id=bot)]
    assert events[:3] == ["tokens_refreshed", "tokens_expired", "tokens_created"]


def test_store_tokens_for_unknown_user(mgr):
    with pytest.raises(UserNotFound, match="42"):
        mgr.store_tokens(42, "a", "r", 60)


@pytest.mark.parametrize("bad", ["", None, 12])
def test_store_tokens_rejects_empty_tokens(mgr, bot, bad):
    with pytest.raises(KissbotError, match="access_token"):
        mgr.store_tokens(bot, bad, "r", 60)
    assert mgr.get_tokens(bot) is None


def test_token_flags_on_missing_tokens(mgr, bot):
    with pytest.raises(UserNotFound):
        mgr.mark_tokens_expired(bot)
    with pytest.raises(UserNotFound):
        mgr.increment_refresh_failures(bot)


def test_tokens_needing_refresh(mgr, bot):
    soon = mgr.create_user("2", "soon")
    later = mgr.create_user("3", "later")
    expired = mgr.create_user("4", "expired")
    mgr.store_tokens(bot, "a", "r", 5 * 60)
    mgr.store_tokens(soon, "a", "r", 60)
    mgr.store_tokens(later, "a", "r", 3 * 3600)
    mgr.store_tokens(expired, "a", "r", -60)
    mgr.mark_tokens_expired(expired)
    due = mgr.get_tokens_needing_refresh(buffer_minutes=10)
    assert [t["user_id"] for t in due] == [expired, soon, bot]
    assert due[0] == {
        "user_id": expired,
        "token_type": "bot",
        "twitch_login": "expired",
        "expires_at": due[0]["expires_at"],
        "needs_reauth": True,
        "refresh_failures": 0,
    }
    assert "access_token" not in due[1]
    assert [t["user_id"] for t in mgr.get_tokens_needing_refresh(buffer_minutes=999999)] == [expired, soon, bot, later]


def test_tokens_cascade_with_user(mgr, bot):
    from sqlalchemy import delete

    from kissbot.models import User, audit_log

    mgr.store_tokens(bot, "a", "r", 60)
    with mgr.session() as s:
        s.execute(delete(audit_log))
        s.delete(s.get(User, bot))
    assert mgr.get_stats()["tokens_count"] == 0


def test_instances_lifecycle(mgr, bot):
    channel = mgr.create_user("1", "el_serda")
    instance_id = mgr.register_instance(channel_login="El_Serda", bot_login="serda_bot", pid=12345)
    mgr.update_instance_heartbeat(instance_id, status="running")
    (active,) = mgr.get_active_instances()
    assert (active["id"], active["channel_id"], active["bot_user_id"], active["pid"]) == (instance_id, channel, bot, 12345)
    assert (active["channel_login"], active["bot_login"], active["status"]) == ("el_serda", "serda_bot", "running")
    assert active["last_heartbeat"] >= active["start_time"]
    assert mgr.stop_instance(instance_id, crash=False) == "stopped"
    assert mgr.get_active_instances() == []
    assert mgr.get_stats()["active_instances"] == 0
    assert mgr.register_instance("el_serda", "serda_bot", 777) == instance_id


def test_crashes_disable_instance_until_reset(mgr, bot):
    mgr.create_user("1", "el_serda")
    mgr.set_config("max_crash_count", 2)
    instance_id = mgr.register_instance("el_serda", "serda_bot", 1)
    assert mgr.stop_instance(instance_id, crash=True) == "crashed"
    assert mgr.register_instance("el_serda", "serda_bot", 2) == instance_id
    assert mgr.stop_instance(instance_id, crash=True) == "disabled"
    with pytest.raises(InstanceDisabled, match=f"instance {instance_id} .*disabled after 2 crashes"):
        mgr.register_instance("el_serda", "serda_bot", 3)
    mgr.reset_instance(instance_id)
    assert mgr.register_instance("el_serda", "serda_bot", 4) == instance_id
    events = [e["event_type"] for e in mgr.get_audit_log(limit=3)]
    assert events == ["instance_started", "instance_reset", "instance_disabled"]


def test_instance_errors(mgr, bot):
    with pytest.raises(UserNotFound, match="ghost"):
        mgr.register_instance("ghost", "serda_bot", 1)
    for call in (mgr.update_instance_heartbeat, mgr.stop_instance, mgr.reset_instance):
        with pytest.raises(InstanceNotFound, match="99"):
            call(99)


def test_audit_log(mgr, bot):
    mgr.log_event("custom", user_id=bot, details={"note": "héllo"}, severity="warning")
    mgr.log_event("other")
    logs = mgr.get_audit_log(limit=10, event_type="custom")
    assert len(logs) == 1
    assert logs[0]["details"] == {"note": "héllo"}
    assert (logs[0]["severity"], logs[0]["user_id"]) == ("warning", bot)
    assert logs[0]["timestamp"].tzinfo == timezone.utc
    newest = mgr.get_audit_log(limit=2)
    assert [e["event_type"] for e in newest] == ["other", "custom"]
    assert [e["event_type"] for e in mgr.get_audit_log(user_id=bot)] == ["custom", "user_created"]


def test_audit_refuses_secrets_and_bad_severity(mgr):
    with pytest.raises(KissbotError, match="access_token"):
        mgr.log_event("x", details={"access_token": "secret"})
    with pytest.raises(KissbotError, match="severity"):
        mgr.log_event("x", severity="fatal")
    assert mgr.get_audit_log() == []


def test_cleanup_old_logs(mgr, bot):
    from kissbot.models import AuditLog

    old = datetime.now(timezone.utc) - timedelta(days=40)
    with mgr.session() as s:
        s.add_all(AuditLog(event_type="old", timestamp=old) for _ in range(7))
    mgr.log_event("new")
    assert mgr.cleanup_old_logs(days=30) == 7
    assert {e["event_type"] for e in mgr.get_audit_log()} == {"new", "user_created"}
    mgr.set_config("log_retention_days", 0)
    assert mgr.cleanup_old_logs() == 2


def test_cleanup_old_logs_in_batches(mgr, monkeypatch):
    from kissbot import manager
    from kissbot.models import AuditLog

    monkeypatch.setattr(manager, "CLEANUP_BATCH_SIZE", 3)
    old = datetime.now(timezone.utc) - timedelta(days=40)
    with mgr.session() as s:
        s.add_all(AuditLog(event_type="old", timestamp=old) for _ in range(10))
    assert mgr.cleanup_old_logs(days=1) == 10
    assert mgr.get_audit_log() == []


def test_config_defaults_and_types(mgr):
    assert mgr.get_config("token_refresh_interval", default=60) == 60
    assert mgr.get_config("encryption_key_version") == 1
    assert mgr.get_config("health_check_interval") == 30
    assert mgr.get_config("max_crash_count") == 3
    assert mgr.get_config("log_retention_days") == 30
    assert mgr.get_config("missing", default="fallback") == "fallback"
    mgr.set_config("custom_setting", "value", description="Mon setting")
    mgr.set_config("ratio", 0.5)
    mgr.set_config("token_refresh_interval", 120)
    assert mgr.get_config("custom_setting") == "value"
    assert mgr.get_config("ratio") == 0.5
    assert mgr.get_config("token_refresh_interval") == 120


def test_stats(mgr, bot):
    mgr.store_tokens(bot, "a", "r", 60)
    other = mgr.create_user("2", "other")
    mgr.store_tokens(other, "a", "r", 60)
    mgr.mark_tokens_expired(other)
    stats = mgr.get_stats()
    assert {k: stats[k] for k in ("users_count", "tokens_count", "active_instances", "tokens_needing_reauth")} == {
        "users_count": 2,
        "tokens_count": 2,
        "active_instances": 0,
        "tokens_needing_reauth": 1,
    }
    assert stats["audit_log_count"] == len(mgr.get_audit_log(limit=1000))
    assert stats["db_size_bytes"] > 0


def test_session_commits_on_success_and_rolls_back_on_error(mgr):
    from kissbot.repo import TokenRepository, UserRepository

    with mgr.session() as s:
        uid = UserRepository(s).create_user("7", "grouped")
        TokenRepository(s).store_tokens(uid, "a", "r", 60)
    assert mgr.get_tokens(uid)["access_token"] == "a"
    with pytest.raises(RuntimeError):
        with mgr.session() as s:
            UserRepository(s).create_user("8", "doomed")
            raise RuntimeError("boom")
    assert mgr.get_user_by_login("doomed") is None


def test_naive_datetime_is_refused(mgr, bot):
    from kissbot.errors import NaiveDatetimeError
    from kissbot.models import AuditLog

    with pytest.raises(NaiveDatetimeError, match="naive datetime"):
        with mgr.session() as s:
            s.add(AuditLog(event_type="naive", timestamp=datetime(2025, 11, 5, 0, 33)))
            s.flush()
    assert mgr.get_audit_log(event_type="naive") == []


def test_aware_non_utc_datetime_is_stored_as_the_same_instant(mgr):
    from kissbot.models import AuditLog

    paris = timezone(timedelta(hours=1))
    with mgr.session() as s:
        s.add(AuditLog(event_type="tz", timestamp=datetime(2025, 11, 5, 1, 33, tzinfo=paris)))
    (entry,) = mgr.get_audit_log(event_type="tz")
    assert entry["timestamp"] == datetime(2025, 11, 5, 0, 33, tzinfo=timezone.utc)
    assert entry["timestamp"].utcoffset() == timedelta(0)
