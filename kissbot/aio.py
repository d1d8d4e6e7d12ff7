"""The token store for asyncio bots: :class:`AsyncTokenStore`.

Every coroutine runs the synchronous store (:class:`~kissbot.manager.DatabaseManager`
and its repositories: one implementation of the logic) on a worker thread of
its own, so a database call never blocks the event loop, not even while
another process holds SQLite's write lock for the whole busy timeout::

    async with AsyncTokenStore("kissbot.db", key_file=".kissbot.key") as store:
        tokens = await store.get_tokens_by_twitch_id("1209350837")

:meth:`AsyncTokenStore.refresh_with_lease` makes a refresh single-flight across
processes: Twitch rotates refresh tokens, and only the first process to spend
one gets new tokens; the others must take the tokens it stored.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy.engine import URL

from kissbot.crypto import KeyRing
from kissbot.engine import DEFAULT_BUSY_TIMEOUT_MS, DEFAULT_DB_PATH
from kissbot.errors import StaleTokens, TokenRejected, UserNotFound, ValidationError
from kissbot.manager import DatabaseManager
from kissbot.repo import AuditRepository, TokenRepository

T = TypeVar("T")

DEFAULT_LEASE_TTL = 60.0
"""Seconds a refresh lease is held at most: it must outlast a refresh request (a crashed holder's lease expires)."""
LEASE_POLL = 0.05
"""Seconds between two attempts to take a refresh lease another process holds."""

RefreshFunction = Callable[[str], Awaitable[Mapping[str, Any]]]
"""``do_refresh(refresh_token)``: asks Twitch and returns ``access_token``, ``refresh_token``,
``expires_in`` and optionally ``scopes`` (None keeps the stored scopes); raises
:class:`~kissbot.errors.TokenRejected` when Twitch refuses the refresh token."""


class AsyncTokenStore:
    """A kissbot store whose coroutines never block the event loop.

    Opened like :class:`~kissbot.manager.DatabaseManager` (``db_path``,
    ``key_file``, ``url=``, ``key=``, ``synchronous=``, ``busy_timeout_ms=``,
    ``create=``), or around an existing one with ``manager=`` (which the
    store then does not close). The store is opened on its worker thread by
    the first coroutine, so errors of opening it (a missing key:
    :class:`~kissbot.errors.KeyFileError`) are raised there.

    Calls run one at a time, in order, on that thread; use it as
    ``async with``, or ``await store.close()``.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str] = DEFAULT_DB_PATH,
        key_file: str | os.PathLike[str] | None = None,
        *,
        url: str | URL | None = None,
        key: KeyRing | bytes | str | list[bytes] | None = None,
        synchronous: str | None = None,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        create: bool = True,
        manager: DatabaseManager | None = None,
        lease_ttl: float = DEFAULT_LEASE_TTL,
    ) -> None:
        self._open_manager = functools.partial(
            DatabaseManager,
            db_path,
            key_file,
            url=url,
            key=key,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            create=create,
        )
        self._manager = manager
        self._owns_manager = manager is None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kissbot-store")
        self.lease_ttl = lease_ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:aio:{uuid.uuid4().hex[:8]}"
        """The name this store's refresh leases are held under."""

    @classmethod
    def of(cls, store: AsyncTokenStore | DatabaseManager) -> AsyncTokenStore:
        """``store`` itself, or an :class:`AsyncTokenStore` around a :class:`DatabaseManager`."""
        if isinstance(store, AsyncTokenStore):
            return store
        if isinstance(store, DatabaseManager):
            return cls(manager=store)
        raise ValidationError(f"token_store must be an AsyncTokenStore or a DatabaseManager, not {type(store).__name__}")

    def __repr__(self) -> str:
        where = repr(self._manager) if self._manager is not None else "not opened yet"
        return f"<AsyncTokenStore {where}>"

    @property
    def manager(self) -> DatabaseManager:
        """The synchronous store underneath (opened now if needed: blocking, for code outside the event loop)."""
        if self._manager is None:
            self._manager = self._open_manager()
        return self._manager

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(manager, *args, **kwargs)`` on the store's worker thread, for what has no coroutine here."""

        def call() -> T:
            return fn(self.manager, *args, **kwargs)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> AsyncTokenStore:
        """Open (create or migrate) the store now rather than on the first call; return it."""
        await self.run(lambda manager: None)
        return self

    async def close(self) -> None:
        """Release the database connections (of a manager this store opened) and the worker thread."""
        if self._owns_manager and self._manager is not None:
            await self.run(DatabaseManager.close)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncTokenStore:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the manager's calls -------------------------------------------------------------------

    async def get_tokens(self, user_id: int, *, token_type: str = "bot") -> dict[str, Any] | None:
        """As :meth:`DatabaseManager.get_tokens`."""
        return await self.run(DatabaseManager.get_tokens, user_id, token_type=token_type)

    async def get_tokens_by_twitch_id(self, twitch_user_id: str | int, *, token_type: str = "bot") -> dict[str, Any] | None:
        """As :meth:`DatabaseManager.get_tokens_by_twitch_id` (:class:`~kissbot.errors.UserNotFound` for an unknown id)."""
        return await self.run(DatabaseManager.get_tokens_by_twitch_id, twitch_user_id, token_type=token_type)

    async def store_tokens(
        self,
        user_id: int,
        access_token: str,
        refresh_token: str,
        expires_in: int | float,
        scopes: list[str] | None = None,
        *,
        token_type: str = "bot",
        expected_version: int | None = None,
    ) -> bool:
        """As :meth:`DatabaseManager.store_tokens` (``scopes=None`` keeps the stored scopes)."""
        return await self.run(
            DatabaseManager.store_tokens,
            user_id,
            access_token,
            refresh_token,
            expires_in,
            scopes,
            token_type=token_type,
            expected_version=expected_version,
        )

    async def list_tokens(self, decrypt: bool = False) -> list[dict[str, Any]]:
        """As :meth:`DatabaseManager.list_tokens`."""
        return await self.run(DatabaseManager.list_tokens, decrypt)

    async def record_validation(self, user_id: int, *, token_type: str = "bot") -> None:
        """Store that Twitch accepted the access token of ``user_id`` just now."""
        await self.run(_record_validation, user_id, token_type)

    async def mark_reauth(self, user_id: int, *, token_type: str = "bot") -> None:
        """Flag the tokens of ``user_id`` as needing reauthorisation."""
        await self.run(DatabaseManager.mark_tokens_expired, user_id, token_type=token_type)

    async def log_event(
        self,
        event_type: str,
        user_id: int | None = None,
        channel_id: int | None = None,
        details: dict[str, Any] | None = None,
        severity: str = "info",
    ) -> None:
        """As :meth:`DatabaseManager.log_event` (``details`` must hold no secret)."""
        await self.run(DatabaseManager.log_event, event_type, user_id, channel_id, details, severity)

    # --- single-flight refresh -----------------------------------------------------------------

    async def refresh_with_lease(
        self,
        twitch_user_id: str | int,
        seen_refresh_token: str,
        do_refresh: RefreshFunction,
        *,
        token_type: str = "bot",
    ) -> dict[str, Any]:
        """Refresh the tokens of a Twitch user once across every process; return the tokens to use.

        Takes the row's refresh lease (waiting while another process holds
        it), then re-reads the row. If its refresh token is no longer
        ``seen_refresh_token``, another process refreshed already: the stored
        tokens are returned and Twitch is not asked. Otherwise ``await
        do_refresh(refresh_token)`` and its answer is stored with
        compare-and-set before the lease is given back.

        Raises :class:`~kissbot.errors.UserNotFound` for an unknown user or
        one without tokens, and :class:`~kissbot.errors.TokenRejected` when
        Twitch refuses the refresh token (the row is then marked for
        reauthorisation) or the row already needs reauthorisation.
        """
        user = await self.run(DatabaseManager.get_user, twitch_user_id)
        if user is None:
            raise UserNotFound(f"no user with Twitch user id {str(twitch_user_id)!r}")
        user_id = user["id"]
        while not await self.run(DatabaseManager.claim_refresh, user_id, self.owner, self.lease_ttl, token_type=token_type):
            await asyncio.sleep(LEASE_POLL)
        try:
            tokens = await self.run(DatabaseManager.get_tokens, user_id, token_type=token_type)
            if tokens is None:
                raise UserNotFound(f"user {user['twitch_login']} has no {token_type} tokens")
            if tokens["needs_reauth"]:
                raise TokenRejected(
                    f"the {token_type} tokens of {user['twitch_login']} need reauthorisation", status=None
                )
            if tokens["refresh_token"] != seen_refresh_token:
                return tokens
            try:
                answer = await do_refresh(tokens["refresh_token"])
            except TokenRejected as exc:
                await self.run(_mark_rejected, user_id, token_type, exc.status)
                raise TokenRejected(
                    f"Twitch refused the refresh token of {user['twitch_login']} ({token_type})"
                    + (f": {exc.status}" if exc.status else "")
                    + "; marked for reauthorisation",
                    status=exc.status,
                ) from exc
            return await self.run(_store_refreshed, user_id, token_type, tokens["version"], answer)
        finally:
            # Shielded: a cancelled caller still gives the lease back.
            await asyncio.shield(
                self.run(DatabaseManager.release_refresh, user_id, self.owner, token_type=token_type)
            )


def _record_validation(manager: DatabaseManager, user_id: int, token_type: str) -> None:
    with manager.session() as session:
        TokenRepository(session).record_validation(user_id, token_type=token_type)


def _mark_rejected(manager: DatabaseManager, user_id: int, token_type: str, status: int | None) -> None:
    with manager.session() as session:
        TokenRepository(session).mark_tokens_expired(user_id, token_type=token_type, revoked=True)
        # Twitch's own message is not recorded: it may echo the token.
        AuditRepository(session).log_event(
            "token_refresh_rejected",
            user_id=user_id,
            details={"token_type": token_type, "status": status},
            severity="error",
        )


def _store_refreshed(
    manager: DatabaseManager, user_id: int, token_type: str, version: int, answer: Mapping[str, Any]
) -> dict[str, Any]:
    try:
        manager.store_tokens(
            user_id,
            answer["access_token"],
            answer["refresh_token"],
            answer["expires_in"],
            answer.get("scopes"),
            token_type=token_type,
            expected_version=version,
        )
    except StaleTokens:
        pass  # our lease had expired and another process stored newer tokens: theirs win
    except KeyError as exc:
        raise ValidationError(f"do_refresh must return access_token, refresh_token and expires_in: no {exc.args[0]}") from None
    tokens = manager.get_tokens(user_id, token_type=token_type)
    assert tokens is not None
    return tokens
