"""TwitchIO 3 keeps its tokens in kissbot: ``class Bot(KissbotTokens, commands.Bot)``.

Install with ``pip install 'kissbot[twitchio]'`` (TwitchIO 3.3.x)::

    from twitchio.ext import commands
    from kissbot.aio import AsyncTokenStore
    from kissbot.ext.twitchio import KissbotTokens

    class Bot(KissbotTokens, commands.Bot):
        ...

    bot = Bot(token_store=AsyncTokenStore("kissbot.db"), client_id=…, client_secret=…, bot_id=…, prefix="!")

At login every stored token that does not need reauthorisation is added to
the client (``.tio.tokens.json`` is never read nor written); tokens a user
authorises through TwitchIO's OAuth flow are stored; every refresh TwitchIO
makes (on add, on a Helix 401, in its validation loop) goes through
:meth:`~kissbot.aio.AsyncTokenStore.refresh_with_lease`, so with several bot
processes (or ``kissbot refresh-worker``) a refresh token is spent once and
every process ends up with the stored tokens. Successful validations are
recorded; on close nothing is written back.

TwitchIO sends all three refreshes through the ``refresh_token`` coroutine of
one private object, ``ManagedHTTPClient.__isolated``; that is the one point
wrapped here, checked when the client is created.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kissbot.aio import AsyncTokenStore
from kissbot.errors import KissbotError, TokenRejected
from kissbot.ext._common import StoredRow, store_authorization, usable_tokens
from kissbot.types import utcnow

try:
    import twitchio
    from twitchio.authentication import RefreshTokenPayload
    from twitchio.exceptions import HTTPException, InvalidTokenException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("kissbot.ext.twitchio needs TwitchIO 3.3.x: pip install 'kissbot[twitchio]'") from exc

if TYPE_CHECKING:
    from twitchio.authentication import ValidateTokenPayload

    from kissbot.manager import DatabaseManager

log = logging.getLogger(__name__)

SUPPORTED = "twitchio 3.3.x"
_ISOLATED = "_ManagedHTTPClient__isolated"


class UnsupportedTwitchIO(KissbotError):
    """The installed TwitchIO lacks the point kissbot hooks its refreshes into."""


class KissbotTokens:
    """Mixin for ``twitchio.Client`` / ``commands.Bot``: tokens live in a kissbot store.

    ``token_store`` is an :class:`~kissbot.aio.AsyncTokenStore` (left open on
    close: it is the caller's) or a :class:`~kissbot.DatabaseManager` (wrapped
    in one, closed with the client). A token authorised by the bot's own
    account (``bot_id``) is stored as a ``bot`` token, others as
    ``broadcaster`` tokens.
    """

    _http: Any
    bot_id: str | None

    def __init__(self, *args: Any, token_store: AsyncTokenStore | DatabaseManager, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_store = AsyncTokenStore.of(token_store)
        self._kissbot_owns_store = self.token_store is not token_store
        self._kissbot_rows: dict[str, StoredRow] = {}
        """Each token we hold, access and refresh alike, to the row it came from."""
        _hook(self)

    def _kissbot_remember(self, row: StoredRow, access_token: str, refresh_token: str) -> None:
        for token in [t for t, r in self._kissbot_rows.items() if r == row]:
            del self._kissbot_rows[token]
        self._kissbot_rows[access_token] = self._kissbot_rows[refresh_token] = row

    async def load_tokens(self, path: str | None = None, /) -> None:
        """Add every usable stored token to the client (``path`` is ignored: no file is read)."""
        for row, tokens in await self.token_store.run(usable_tokens):
            if row.twitch_user_id in self.tokens:
                continue  # a bot token and a broadcaster token of one account: TwitchIO holds one
            self._kissbot_remember(row, tokens["access_token"], tokens["refresh_token"])
            try:
                await self.add_token(tokens["access_token"], tokens["refresh_token"])
            except InvalidTokenException:
                log.warning("the %s token of %s could not be loaded: it needs reauthorisation", row.token_type, row.login)

    async def save_tokens(self, path: str | None = None, /) -> None:
        """Write nothing: every token was stored when it arrived, and the store may hold newer ones."""

    async def add_token(self, token: str, refresh: str) -> ValidateTokenPayload:
        """Add a token to the client; one kissbot does not know yet (a new authorisation) is stored."""
        known = refresh in self._kissbot_rows  # before a refresh on add replaces it
        answer: ValidateTokenPayload = await super().add_token(token, refresh)  # type: ignore[misc]
        if not known and answer.user_id and answer.login:
            held = self.tokens.get(answer.user_id)
            if held is not None:
                token_type = "bot" if answer.user_id == self.bot_id else "broadcaster"
                row = await self.token_store.run(
                    store_authorization,
                    answer.user_id,
                    answer.login,
                    held["token"],
                    held["refresh"],
                    answer.expires_in,
                    list(answer.scopes),
                    token_type=token_type,
                )
                self._kissbot_remember(row, held["token"], held["refresh"])
        return answer

    async def close(self, **options: Any) -> None:
        """Close the client (writing no token back), then the store if it was made from a manager."""
        try:
            await super().close(**options)  # type: ignore[misc]
        finally:
            if self._kissbot_owns_store:
                await self.token_store.close()


def _hook(client: KissbotTokens) -> None:
    """Route the refreshes and validations of ``client`` through the store (the one private point)."""
    isolated = getattr(getattr(client, "_http", None), _ISOLATED, None)
    if isolated is None or not callable(getattr(isolated, "refresh_token", None)) or not callable(
        getattr(isolated, "validate_token", None)
    ):
        raise UnsupportedTwitchIO(
            f"kissbot.ext.twitchio supports {SUPPORTED}; the installed twitchio {twitchio.__version__} "
            "has no ManagedHTTPClient.__isolated.refresh_token to route its refreshes through"
        )
    refresh_token, validate_token = isolated.refresh_token, isolated.validate_token
    store = client.token_store

    async def do_refresh(presented: str) -> dict[str, Any]:
        try:
            answer = await refresh_token(presented)
        except HTTPException as exc:
            if exc.status in (400, 401):
                raise TokenRejected("Twitch refused the refresh token", status=exc.status) from None
            raise
        scope = answer.scope
        return {
            "access_token": answer.access_token,
            "refresh_token": answer.refresh_token,
            "expires_in": answer.expires_in,
            "scopes": scope.split() if isinstance(scope, str) else list(scope) if scope else None,
        }

    async def refresh_through_store(presented: str, /) -> RefreshTokenPayload:
        row = client._kissbot_rows.get(presented)
        if row is None:
            return await refresh_token(presented)
        try:
            tokens = await store.refresh_with_lease(row.twitch_user_id, presented, do_refresh, token_type=row.token_type)
        except TokenRejected as exc:
            raise HTTPException(str(exc), status=exc.status or 400, extra="Invalid refresh token") from None
        client._kissbot_remember(row, tokens["access_token"], tokens["refresh_token"])
        return RefreshTokenPayload(
            {
                "access_token": tokens["access_token"],
                "refresh_token": tokens["refresh_token"],
                "expires_in": max(0, int((tokens["expires_at"] - utcnow()).total_seconds())),
                "scope": tokens["scopes"],
                "token_type": "bearer",
            }
        )

    async def validate_and_record(token: str, /) -> ValidateTokenPayload:
        answer = await validate_token(token)
        row = client._kissbot_rows.get(token.removeprefix("Bearer ").removeprefix("OAuth "))
        if row is not None:
            try:
                await store.record_validation(row.user_id, token_type=row.token_type)
            except KissbotError as exc:
                log.warning("could not record the validation of %s's %s token: %s", row.login, row.token_type, exc)
        return answer

    isolated.refresh_token = refresh_through_store
    isolated.validate_token = validate_and_record
