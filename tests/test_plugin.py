"""The pytest plugin, used from a bot project's own test file."""

from __future__ import annotations

BOT_PROJECT_TEST = '''
from kissbot.repo import TokenRepository, UserRepository


def test_bot_reads_its_tokens(kissbot_manager):
    uid = kissbot_manager.create_user("1", "my_bot", is_bot=True)
    kissbot_manager.store_tokens(uid, "access", "refresh", expires_in=3600)
    assert kissbot_manager.get_tokens(uid)["access_token"] == "access"


def test_each_test_gets_a_fresh_store(kissbot_manager):
    assert kissbot_manager.get_user_by_login("my_bot") is None
    assert kissbot_manager.get_config("max_crash_count") == 3


def test_session_fixture(kissbot_session):
    uid = UserRepository(kissbot_session).create_user("2", "other_bot")
    TokenRepository(kissbot_session).store_tokens(uid, "a", "r", 60)
    assert TokenRepository(kissbot_session).get_tokens(uid)["refresh_token"] == "r"


def test_session_is_rolled_back(kissbot_session):
    assert UserRepository(kissbot_session).count() == 0


SEEN_KEYS = []


def test_key_first(kissbot_key):
    SEEN_KEYS.append(kissbot_key)


def test_key_second(kissbot_key):
    SEEN_KEYS.append(kissbot_key)
    assert SEEN_KEYS[0] != SEEN_KEYS[1]
'''


def test_fixtures_work_in_a_bot_project(pytester):
    pytester.makepyfile(test_bot=BOT_PROJECT_TEST)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=6)
