"""get_tokens reads what is committed now: every commit, by any manager, process or path, is seen at once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import update

from kissbot import DatabaseManager
from kissbot.crypto import TokenCipher, generate_key
from kissbot.errors import DecryptionError
from kissbot.models import oauth_tokens

ACCESS, REFRESH = "access-token-one-abcdefghijklm", "refresh-token-one-abcdefghijklmnopqrstuvwxyz0123"


def test_commits_of_another_manager_are_seen(mgr, bot, store_url, key_file):
    mgr.store_tokens(bot, ACCESS, REFRESH, 3600, scopes=["chat:read"])
    assert mgr.get_tokens(bot)["access_token"] == ACCESS
    assert mgr.get_tokens(bot)["access_token"] == ACCESS
    with DatabaseManager(url=store_url, key_file=key_file) as other:
        other.store_tokens(bot, "access-two", "refresh-two", 3600)
        assert mgr.get_tokens(bot)["access_token"] == "access-two"
        other.mark_tokens_expired(bot)
        assert mgr.get_tokens(bot)["needs_reauth"] is True
        other.increment_refresh_failures(bot)
        assert mgr.get_tokens(bot)["refresh_failures"] == 1


def test_own_writes_are_seen_whatever_the_path(mgr, bot):
    mgr.store_tokens(bot, ACCESS, REFRESH, 3600)
    first = mgr.get_tokens(bot)
    mgr.store_tokens(bot, "access-two", "refresh-two", 3600)
    assert mgr.get_tokens(bot)["access_token"] == "access-two"
    with mgr.session() as session:
        session.execute(update(oauth_tokens).where(oauth_tokens.c.user_id == bot).values(scopes='["x"]'))
    assert mgr.get_tokens(bot)["scopes"] == ["x"]
    with mgr.engine.begin() as conn:
        conn.execute(update(oauth_tokens).where(oauth_tokens.c.user_id == bot).values(refresh_failures=7))
    assert mgr.get_tokens(bot)["refresh_failures"] == 7
    assert mgr.get_tokens(bot)["version"] > first["version"]


def test_own_write_through_the_sqlite_driver_is_seen(sqlite_url, key_file):
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(bot, ACCESS, REFRESH, 3600)
        assert mgr.get_tokens(bot)["refresh_failures"] == 0
        with mgr.engine.connect() as conn:  # the same pooled connection, in autocommit mode
            conn.connection.driver_connection.execute("UPDATE oauth_tokens SET refresh_failures = 3")
        assert mgr.get_tokens(bot)["refresh_failures"] == 3


def test_returned_tokens_are_copies(mgr, bot):
    mgr.store_tokens(bot, ACCESS, REFRESH, 3600, scopes=["chat:read"])
    tokens = mgr.get_tokens(bot)
    tokens["access_token"] = "changed"
    tokens["scopes"].append("changed")
    again = mgr.get_tokens(bot)
    assert (again["access_token"], again["scopes"]) == (ACCESS, ["chat:read"])


def test_commit_by_another_process_is_seen(tmp_path):
    db, key = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with DatabaseManager(db, key) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(bot, ACCESS, REFRESH, 3600)
        assert mgr.get_tokens(bot)["access_token"] == ACCESS
        script = textwrap.dedent(
            f"""
            from kissbot import DatabaseManager
            with DatabaseManager({str(db)!r}, {str(key)!r}) as mgr:
                mgr.store_tokens({bot}, "access-from-child", "refresh-from-child", 3600)
            """
        )
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
        assert mgr.get_tokens(bot)["access_token"] == "access-from-child"


def test_ciphertext_corrupted_by_another_connection_is_reported_at_once(tmp_path):
    db, key = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with DatabaseManager(db, key) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(bot, ACCESS, REFRESH, 3600)
        assert mgr.get_tokens(bot)["access_token"] == ACCESS
        raw = sqlite3.connect(db)
        with raw:
            raw.execute("UPDATE oauth_tokens SET access_token_encrypted = 'gAAAAABgarbage' WHERE user_id = ?", (bot,))
        raw.close()
        with pytest.raises(DecryptionError, match=f"user {bot}"):
            mgr.get_tokens(bot)


def test_tampered_or_foreign_ciphertext_never_decrypts():
    cipher = TokenCipher(generate_key())
    stored = cipher.encrypt(ACCESS)
    assert cipher.decrypt(stored) == cipher.decrypt(stored) == ACCESS
    tampered = stored[:-6] + ("A" if stored[-6] != "A" else "B") + stored[-5:]
    for _ in range(2):
        with pytest.raises(DecryptionError):
            cipher.decrypt(tampered)
    with pytest.raises(DecryptionError):
        TokenCipher(generate_key()).decrypt(stored)
