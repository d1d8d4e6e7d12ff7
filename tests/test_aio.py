"""The asyncio store (kissbot.aio) and the manager's pieces of a single-flight refresh, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from kissbot import DatabaseManager
from kissbot.aio import AsyncTokenStore
from kissbot.errors import KeyFileError, StaleTokens, TokenRejected, UserNotFound, ValidationError

TWITCH_ID = "1209350837"


@pytest.fixture
def stored(mgr: DatabaseManager, bot: int) -> int:
    mgr.store_tokens(bot, "access-0", "refresh-0", 3600, ["chat:read", "chat:edit"])
    return bot


def counts(mgr: DatabaseManager) -> dict[str, int]:
    """The store's row counts (not its size: PostgreSQL's database size moves with other tests' schemas)."""
    return {k: v for k, v in mgr.get_stats().items() if k != "db_size_bytes"}

# --- DatabaseManager ------------------------------------------------------------------------------


def test_scopes_none_keeps_the_stored_scopes_and_an_empty_list_clears_them(mgr, stored):
    mgr.store_tokens(stored, "access-1", "refresh-1", 3600)
    assert mgr.get_tokens(stored)["scopes"] == ["chat:read", "chat:edit"]
    mgr.store_tokens(stored, "access-2", "refresh-2", 3600, [])
    assert mgr.get_tokens(stored)["scopes"] == []


def test_store_tokens_with_expected_version_is_a_compare_and_set(mgr, stored):
    seen = mgr.get_tokens(stored)["version"]
    assert mgr.store_tokens(stored, "access-1", "refresh-1", 3600, expected_version=seen) is False
    with pytest.raises(StaleTokens, match=r"at version 2, not 1: another process stored newer tokens"):
        mgr.store_tokens(stored, "stale", "stale", 3600, expected_version=seen)
    tokens = mgr.get_tokens(stored)
    assert (tokens["access_token"], tokens["refresh_token"], tokens["version"]) == ("access-1", "refresh-1", 2)


def test_get_tokens_by_twitch_id(mgr, bot):
    assert mgr.get_tokens_by_twitch_id(TWITCH_ID) is None
    mgr.store_tokens(bot, "access-0", "refresh-0", 3600)
    assert mgr.get_tokens_by_twitch_id(int(TWITCH_ID))["access_token"] == "access-0"
    with pytest.raises(UserNotFound, match=r"^no user with Twitch user id '42'$"):
        mgr.get_tokens_by_twitch_id("42")


def test_one_owner_holds_the_refresh_lease_until_it_releases_it(mgr, stored):
    assert mgr.claim_refresh(stored, "a", ttl=60)
    assert not mgr.claim_refresh(stored, "b", ttl=60)
    assert not mgr.release_refresh(stored, "b")
    assert mgr.release_refresh(stored, "a")
    assert mgr.claim_refresh(stored, "b", ttl=60)


# --- AsyncTokenStore ------------------------------------------------------------------------------


def test_the_async_store_reads_and_writes_through_the_repositories(store_url, key_file, stored):
    async def main() -> None:
        async with AsyncTokenStore(url=store_url, key_file=key_file) as store:
            tokens = await store.get_tokens_by_twitch_id(TWITCH_ID)
            assert tokens["access_token"] == "access-0"
            assert await store.store_tokens(stored, "access-1", "refresh-1", 7200) is False
            tokens = await store.get_tokens(stored)
            assert (tokens["refresh_token"], tokens["scopes"]) == ("refresh-1", ["chat:read", "chat:edit"])
            await store.record_validation(stored)
            assert (await store.get_tokens(stored))["last_validated"] is not None
            await store.log_event("bot_connected", user_id=stored, details={"channel": "x"})
            await store.mark_reauth(stored)
            (row,) = await store.list_tokens()
            assert (row["twitch_login"], row["needs_reauth"]) == ("serda_bot", True)
            assert "access" not in repr(store)

    asyncio.run(main())
    with DatabaseManager(url=store_url, key_file=key_file) as check:
        assert [e["event_type"] for e in check.get_audit_log(3)] == ["tokens_expired", "bot_connected", "tokens_refreshed"]


def test_an_async_store_wraps_an_existing_manager_and_leaves_it_open(mgr, stored):
    async def main() -> None:
        async with AsyncTokenStore(manager=mgr) as store:
            assert (await store.get_tokens(stored))["access_token"] == "access-0"

    asyncio.run(main())
    assert mgr.get_tokens(stored)["access_token"] == "access-0"


class CountingTwitch:
    """A ``do_refresh`` that rotates tokens like Twitch and counts its calls."""

    def __init__(self, reject: int | None = None) -> None:
        self.calls: list[str] = []
        self.reject = reject

    async def __call__(self, refresh_token: str) -> dict[str, Any]:
        self.calls.append(refresh_token)
        await asyncio.sleep(0.2)  # long enough for the other caller to be waiting on the lease
        if self.reject:
            raise TokenRejected("Invalid refresh token", status=self.reject)
        n = len(self.calls)
        return {"access_token": f"access-{n}", "refresh_token": f"refresh-{n}", "expires_in": 14400, "scopes": None}


def test_two_stores_racing_to_refresh_spend_the_refresh_token_once(store_url, key_file, stored):
    twitch = CountingTwitch()

    async def main() -> list[dict[str, Any]]:
        async with AsyncTokenStore(url=store_url, key_file=key_file) as a, AsyncTokenStore(
            url=store_url, key_file=key_file
        ) as b:
            return await asyncio.gather(
                a.refresh_with_lease(TWITCH_ID, "refresh-0", twitch),
                b.refresh_with_lease(TWITCH_ID, "refresh-0", twitch),
            )

    first, second = asyncio.run(main())
    assert twitch.calls == ["refresh-0"]
    assert first["refresh_token"] == second["refresh_token"] == "refresh-1"
    assert first["scopes"] == ["chat:read", "chat:edit"]
    with DatabaseManager(url=store_url, key_file=key_file) as check:
        tokens = check.get_tokens(stored)
        assert (tokens["access_token"], tokens["refresh_token"], tokens["version"]) == ("access-1", "refresh-1", 2)
        assert check.claim_refresh(stored, "anyone", ttl=1), "the lease was released"


def test_a_rotated_token_is_returned_without_asking_twitch(store_url, key_file, stored, mgr):
    mgr.store_tokens(stored, "access-new", "refresh-new", 14400)
    twitch = CountingTwitch()

    async def main() -> dict[str, Any]:
        async with AsyncTokenStore(manager=mgr) as store:
            return await store.refresh_with_lease(TWITCH_ID, "refresh-0", twitch)

    assert asyncio.run(main())["access_token"] == "access-new"
    assert twitch.calls == []


@pytest.mark.parametrize("status", [400, 401])
def test_a_rejected_refresh_token_marks_reauth_and_raises_a_typed_error(mgr, stored, status):
    twitch = CountingTwitch(reject=status)

    async def main() -> None:
        async with AsyncTokenStore(manager=mgr) as store:
            with pytest.raises(
                TokenRejected,
                match=rf"^Twitch refused the refresh token of serda_bot \(bot\): {status}; marked for reauthorisation$",
            ):
                await store.refresh_with_lease(TWITCH_ID, "refresh-0", twitch)
            with pytest.raises(TokenRejected, match=r"^the bot tokens of serda_bot need reauthorisation$"):
                await store.refresh_with_lease(TWITCH_ID, "refresh-0", twitch)

    asyncio.run(main())
    assert twitch.calls == ["refresh-0"]
    tokens = mgr.get_tokens(stored)
    assert (tokens["access_token"], tokens["refresh_token"], tokens["version"]) == ("access-0", "refresh-0", 1)
    assert tokens["needs_reauth"]
    (event, *_) = mgr.get_audit_log(1)
    assert (event["event_type"], event["details"]) == ("token_refresh_rejected", {"token_type": "bot", "status": status})
    assert mgr.claim_refresh(stored, "anyone", ttl=1)


def test_an_unknown_twitch_user_is_a_typed_error_and_writes_nothing(mgr, stored):
    twitch = CountingTwitch()
    before = counts(mgr)

    async def main() -> None:
        async with AsyncTokenStore(manager=mgr) as store:
            with pytest.raises(UserNotFound, match=r"^no user with Twitch user id '42'$"):
                await store.refresh_with_lease("42", "refresh-0", twitch)
            with pytest.raises(UserNotFound, match=r"^no user with Twitch user id '42'$"):
                await store.get_tokens_by_twitch_id("42")

    asyncio.run(main())
    assert twitch.calls == [] and counts(mgr) == before


def test_misuse_is_a_validation_error_and_writes_nothing(mgr, stored):
    async def incomplete(_refresh_token: str) -> dict[str, Any]:
        return {"access_token": "access-1", "expires_in": 3600}

    async def main() -> None:
        with pytest.raises(ValidationError, match=r"^token_store must be an AsyncTokenStore or a DatabaseManager, not str$"):
            AsyncTokenStore.of("kissbot.db")
        async with AsyncTokenStore(manager=mgr) as store:
            with pytest.raises(ValidationError, match=r"^do_refresh must return .* no refresh_token$"):
                await store.refresh_with_lease(TWITCH_ID, "refresh-0", incomplete)

    before = counts(mgr)
    asyncio.run(main())
    assert counts(mgr) == before
    assert mgr.get_tokens(stored)["refresh_token"] == "refresh-0"
    assert mgr.claim_refresh(stored, "anyone", ttl=1)


def test_a_store_without_its_key_is_a_typed_error(tmp_path: Path, sqlite_url, key_file):
    with DatabaseManager(url=sqlite_url, key_file=key_file) as setup:
        setup.store_tokens(setup.create_user(TWITCH_ID, "serda_bot"), "access-0", "refresh-0", 3600)

    async def main() -> None:
        store = AsyncTokenStore(url=sqlite_url, key_file=tmp_path / "missing.key")
        with pytest.raises(KeyFileError, match="missing.key"):
            await store.get_tokens_by_twitch_id(TWITCH_ID)
        await store.close()

    asyncio.run(main())
    assert not (tmp_path / "missing.key").exists()


@pytest.mark.slow
def test_the_event_loop_stall_benchmark_reports_its_row():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.event_loop_stall", "--hold", "0.2", "--rounds", "1"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| longest event-loop stall")]
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert all(cell.endswith(("ms", "x")) and cell[0].isdigit() for cell in cells[1:]), row
