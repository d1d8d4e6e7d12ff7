"""pyTwitchAPI keeps its user token in kissbot: ``KissbotUserAuth`` replaces ``UserAuthenticationStorageHelper``.

Install with ``pip install 'kissbot[twitchapi]'`` (twitchAPI 4.5.x)::

    from twitchAPI.twitch import Twitch
    from twitchAPI.type import AuthScope
    from kissbot.aio import AsyncTokenStore
    from kissbot.ext.twitchapi import KissbotUserAuth

    twitch = await Twitch(APP_ID, APP_SECRET)
    await KissbotUserAuth(twitch, AsyncTokenStore("kissbot.db"), twitch_user_id="1209350837",
                          scopes=[AuthScope.CHAT_READ]).bind()

:meth:`KissbotUserAuth.bind` loads the stored tokens into the ``Twitch``
object and runs pyTwitchAPI's own authenticator only when the store has none
or they need reauthorisation (the new tokens are stored; ``user_token.json``
is never read nor written). Every refresh of the user token (an expired token
given to ``set_user_authentication``, a 401 from Helix) goes through
:meth:`~kissbot.aio.AsyncTokenStore.refresh_with_lease`: with several bot
processes (or ``kissbot refresh-worker``) a refresh token is spent once and
every process ends up with the stored tokens.

pyTwitchAPI calls its module function ``refresh_access_token`` directly from
``Twitch.set_user_authentication`` and ``Twitch.refresh_used_token``; this
wraps those two public methods on the one ``Twitch`` object (nothing global),
checked at :meth:`~KissbotUserAuth.bind`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kissbot.aio import AsyncTokenStore
from kissbot.errors import AuthorizationError, KissbotError, TokenRejected, WrongTwitchAccount
from kissbot.ext._common import StoredRow, store_authorization, usable_tokens
from kissbot.manager import DatabaseManager

try:
    import twitchAPI
    from twitchAPI.oauth import UserAuthenticator, refresh_access_token, validate_token
    from twitchAPI.twitch import Twitch
    from twitchAPI.type import AuthScope, InvalidRefreshTokenException, UnauthorizedException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("kissbot.ext.twitchapi needs twitchAPI 4.5.x: pip install 'kissbot[twitchapi]'") from exc

log = logging.getLogger(__name__)

SUPPORTED = "twitchAPI 4.5.x"
AuthGenerator = Callable[[Twitch, list[AuthScope]], Awaitable[tuple[str, str]]]


class UnsupportedTwitchAPI(KissbotError):
    """The installed pyTwitchAPI lacks the methods kissbot routes its refreshes through."""


class KissbotUserAuth:
    """The user token of ``twitch`` kept in a kissbot store; a drop-in for ``UserAuthenticationStorageHelper``.

    ``token_store`` is an :class:`~kissbot.aio.AsyncTokenStore` or a
    :class:`~kissbot.DatabaseManager`; ``twitch_user_id`` names the stored
    user (a new authorisation for it creates the user), ``token_type`` its
    row. ``auth_generator_func`` replaces pyTwitchAPI's browser flow, as in
    the helper it replaces.
    """

    def __init__(
        self,
        twitch: Twitch,
        token_store: AsyncTokenStore | DatabaseManager,
        *,
        twitch_user_id: str | int,
        scopes: list[AuthScope],
        token_type: str = "bot",
        auth_generator_func: AuthGenerator | None = None,
    ) -> None:
        self.twitch = twitch
        self.store = AsyncTokenStore.of(token_store)
        self.twitch_user_id = str(twitch_user_id)
        self.scopes = list(scopes)
        self.token_type = token_type
        self.auth_generator = auth_generator_func or _browser_flow
        self._refresh_token: str | None = None

    def __repr__(self) -> str:
        return f"<KissbotUserAuth Twitch user {self.twitch_user_id} ({self.token_type}) in {self.store!r}>"

    async def bind(self) -> None:
        """Route the user token's refreshes through the store and set the stored (or a new) user token."""
        self._hook()
        rows = await self.store.run(usable_tokens, self.twitch_user_id)
        row = next((tokens for stored, tokens in rows if stored.token_type == self.token_type), None)
        if row is not None:
            self._refresh_token = row["refresh_token"]
            try:
                await self.twitch.set_user_authentication(row["access_token"], self.scopes, row["refresh_token"])
                return
            except TokenRejected as exc:
                log.warning("%s; authorising again", exc)
        token, refresh = await self.auth_generator(self.twitch, self.scopes)
        await self._store_new(token, refresh)
        await self.twitch.set_user_authentication(token, self.scopes, refresh)

    def _hook(self) -> None:
        twitch = self.twitch
        for name in ("set_user_authentication", "refresh_used_token"):
            if not inspect.iscoroutinefunction(getattr(type(twitch), name, None)):
                raise UnsupportedTwitchAPI(
                    f"kissbot.ext.twitchapi supports {SUPPORTED}; the installed twitchAPI {twitchAPI.__version__} "
                    f"has no coroutine Twitch.{name} to route its refreshes through"
                )
        set_user_authentication = type(twitch).set_user_authentication.__get__(twitch)
        refresh_used_token = type(twitch).refresh_used_token.__get__(twitch)

        async def set_through_store(
            token: str, scope: list[AuthScope], refresh_token: str | None = None, validate: bool = True
        ) -> None:
            if validate and refresh_token is not None and refresh_token == self._refresh_token:
                answer = await validate_token(token, auth_base_url=twitch.auth_base_url)
                if answer.get("status", 200) == 401:
                    token, refresh_token = await self._refresh(refresh_token)
            await set_user_authentication(token, scope, refresh_token, validate)

        async def refresh_through_store() -> None:
            if twitch.get_user_auth_token() is None or self._refresh_token is None:
                await refresh_used_token()  # the app token: nothing of ours
                return
            token, refresh = await self._refresh(self._refresh_token)
            await set_user_authentication(token, self.scopes, refresh, validate=False)

        twitch.set_user_authentication = set_through_store  # type: ignore[method-assign]
        twitch.refresh_used_token = refresh_through_store  # type: ignore[method-assign]
        twitch.user_auth_refresh_callback = self._store_refreshed

    async def _refresh(self, seen: str) -> tuple[str, str]:
        twitch = self.twitch

        async def do_refresh(presented: str) -> dict[str, Any]:
            try:
                token, refresh = await refresh_access_token(
                    presented, twitch.app_id, twitch.app_secret, auth_base_url=twitch.auth_base_url  # type: ignore[arg-type]
                )
            except InvalidRefreshTokenException:
                raise TokenRejected("Twitch refused the refresh token", status=400) from None
            except UnauthorizedException:
                raise TokenRejected("Twitch refused the refresh token", status=401) from None
            # pyTwitchAPI's refresh returns no expiry: /validate tells it, and the scopes.
            answer = await validate_token(token, auth_base_url=twitch.auth_base_url)
            scopes = answer.get("scopes")
            return {
                "access_token": token,
                "refresh_token": refresh,
                "expires_in": answer.get("expires_in") or 0,
                "scopes": [s.value if isinstance(s, AuthScope) else str(s) for s in scopes] if scopes else None,
            }

        tokens = await self.store.refresh_with_lease(self.twitch_user_id, seen, do_refresh, token_type=self.token_type)
        self._refresh_token = tokens["refresh_token"]
        return tokens["access_token"], tokens["refresh_token"]

    async def _store_new(self, token: str, refresh: str) -> StoredRow:
        answer = await validate_token(token, auth_base_url=self.twitch.auth_base_url)
        if answer.get("status", 200) != 200:
            raise AuthorizationError(f"Twitch refused the new authorisation of Twitch user {self.twitch_user_id!r}")
        if answer.get("user_id") != self.twitch_user_id:
            raise WrongTwitchAccount(
                f"the new authorisation is for Twitch user {answer.get('user_id')!r}, not {self.twitch_user_id!r}"
            )
        scopes = [s.value if isinstance(s, AuthScope) else str(s) for s in answer.get("scopes") or []]
        row = await self.store.run(
            store_authorization,
            self.twitch_user_id,
            answer["login"],
            token,
            refresh,
            answer.get("expires_in") or 0,
            scopes,
            token_type=self.token_type,
        )
        self._refresh_token = refresh
        return row

    async def _store_refreshed(self, token: str, refresh: str) -> None:
        # A refresh pyTwitchAPI made on a path not routed through the lease: the tokens are new from Twitch.
        if refresh != self._refresh_token:
            await self._store_new(token, refresh)


async def _browser_flow(twitch: Twitch, scopes: list[AuthScope]) -> tuple[str, str]:
    authenticator = UserAuthenticator(twitch, scopes, force_verify=True, auth_base_url=twitch.auth_base_url)
    return await authenticator.authenticate()  # type: ignore[return-value]
