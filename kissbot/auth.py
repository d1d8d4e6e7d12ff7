"""Get a Twitch user token into the store: the Device Code flow, or the authorization code flow.

The Device Code flow suits headless servers: :meth:`TwitchAuth.start_device_flow`
asks Twitch for a user code, a human enters it at the verification URI on any
device, and :meth:`TwitchAuth.poll_device` polls the token endpoint at the
interval Twitch gives (``authorization_pending``: keep waiting; ``slow_down``:
wait 5 s longer from then on; ``expired_token`` and ``access_denied``: give up).
Tokens of this flow belong to a public client: their refresh token works once.

The authorization code flow (:meth:`TwitchAuth.code_flow`) is for a confidential
client: the human opens :meth:`TwitchAuth.authorization_url` in a browser and
Twitch redirects to ``http://localhost:PORT``, where a one-shot server on
127.0.0.1 receives the code, checks ``state`` and exchanges the code.

:func:`obtain_tokens` runs a flow, validates the new token and refuses one
that belongs to another login; :func:`store_authorization` then creates the
user from the validate answer if needed, stores the tokens (clearing
``needs_reauth``) and audits ``tokens_authorized``, in one transaction.
:func:`authorize` does both. Nothing here logs, raises or prints a token, a device code,
an authorization code or the client secret; only the user code is shown.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from kissbot import __version__
from kissbot.errors import (
    AuthorizationDenied,
    AuthorizationError,
    AuthorizationExpired,
    MissingClientCredentials,
    WrongTwitchAccount,
)
from kissbot.repo import AuditRepository, TokenRepository, UserRepository
from kissbot.twitch import (
    AUTHORIZE_URL_ENV,
    CLIENT_ID_ENV,
    CLIENT_SECRET_ENV,
    DEFAULT_AUTHORIZE_URL,
    DEFAULT_DEVICE_URL,
    DEFAULT_TOKEN_URL,
    DEFAULT_VALIDATE_URL,
    DEVICE_URL_ENV,
    TOKEN_URL_ENV,
    VALIDATE_URL_ENV,
    twitch_message,
)

if TYPE_CHECKING:
    from kissbot.manager import DatabaseManager

DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
SLOW_DOWN_STEP = 5
"""Seconds added to the polling interval at each ``slow_down`` (RFC 8628 §3.5)."""


@dataclass(frozen=True)
class DeviceCode:
    """Twitch's answer to ``POST /oauth2/device``: what the human needs, and the secret device code."""

    user_code: str
    verification_uri: str
    expires_in: int
    interval: int
    scopes: tuple[str, ...]
    device_code: str = field(repr=False)


@dataclass(frozen=True)
class TwitchTokens:
    """A user token pair as Twitch handed it out."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Authorized:
    """What :func:`store_authorization` stored (no secret)."""

    user_id: int
    login: str
    twitch_user_id: str
    token_type: str
    scopes: tuple[str, ...]
    expires_in: int
    user_created: bool


class TwitchAuth:
    """Twitch's OAuth endpoints for one application (client id, optional secret).

    ``sleep`` is what waits between two polls (injectable so tests need not
    wait); ``http`` replaces the :class:`httpx.Client` (then not closed here).
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        client_id: str | None,
        client_secret: str | None = None,
        *,
        token_url: str = DEFAULT_TOKEN_URL,
        validate_url: str = DEFAULT_VALIDATE_URL,
        device_url: str = DEFAULT_DEVICE_URL,
        authorize_url: str = DEFAULT_AUTHORIZE_URL,
        timeout: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        http: httpx.Client | None = None,
    ) -> None:
        if not client_id:
            raise MissingClientCredentials(f"no Twitch client id: set {CLIENT_ID_ENV} or pass --client-id")
        self.client_id = client_id
        self._client_secret = client_secret or None
        self.token_url = token_url
        self.validate_url = validate_url
        self.device_url = device_url
        self.authorize_url = authorize_url
        self.sleep = sleep
        self._owns_http = http is None
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(timeout), headers={"User-Agent": f"kissbot/{__version__}"}
        )

    @classmethod
    def from_env(cls, **kwargs: Any) -> TwitchAuth:
        """An instance with the client id, secret and endpoints from the environment.

        Reads ``TWITCH_CLIENT_ID``, ``TWITCH_CLIENT_SECRET`` and
        ``KISSBOT_TWITCH_{TOKEN,VALIDATE,DEVICE,AUTHORIZE}_URL``; keyword
        arguments that are not None win.
        """
        env = {
            "client_id": os.environ.get(CLIENT_ID_ENV),
            "client_secret": os.environ.get(CLIENT_SECRET_ENV),
            "token_url": os.environ.get(TOKEN_URL_ENV) or DEFAULT_TOKEN_URL,
            "validate_url": os.environ.get(VALIDATE_URL_ENV) or DEFAULT_VALIDATE_URL,
            "device_url": os.environ.get(DEVICE_URL_ENV) or DEFAULT_DEVICE_URL,
            "authorize_url": os.environ.get(AUTHORIZE_URL_ENV) or DEFAULT_AUTHORIZE_URL,
        }
        return cls(**{**env, **{k: v for k, v in kwargs.items() if v is not None}})

    def __repr__(self) -> str:
        return f"<TwitchAuth client_id={self.client_id} token_url={self.token_url}>"

    def close(self) -> None:
        """Close the HTTP client (if this object made it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> TwitchAuth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- Device Code flow ---------------------------------------------------------------------------

    def start_device_flow(self, scopes: Iterable[str]) -> DeviceCode:
        """Ask Twitch for a device code and the user code the human enters at the verification URI."""
        scopes = tuple(scopes)
        answer = self._json(self._post(self.device_url, {"client_id": self.client_id, "scopes": " ".join(scopes)}))
        try:
            return DeviceCode(
                user_code=_text(answer, "user_code"),
                verification_uri=_text(answer, "verification_uri"),
                expires_in=_positive(answer, "expires_in"),
                interval=max(0, int(answer.get("interval", 5))),
                scopes=scopes,
                device_code=_text(answer, "device_code"),
            )
        except (TypeError, ValueError) as exc:
            raise AuthorizationError(f"Twitch's device code answer is malformed: {exc}") from None

    def poll_device(self, device: DeviceCode) -> TwitchTokens:
        """Poll the token endpoint until the human decided, at Twitch's interval; return the tokens.

        Raises :class:`AuthorizationDenied` (``access_denied``) and
        :class:`AuthorizationExpired` (``expired_token``, or the device code's
        lifetime elapsed); a :exc:`KeyboardInterrupt` in ``sleep`` propagates.
        """
        form = {
            "client_id": self.client_id,
            "scopes": " ".join(device.scopes),
            "device_code": device.device_code,
            "grant_type": DEVICE_GRANT_TYPE,
        }
        if self._client_secret:
            form["client_secret"] = self._client_secret
        interval = device.interval
        deadline = time.monotonic() + device.expires_in
        while True:
            self.sleep(interval)
            if time.monotonic() > deadline:
                raise AuthorizationExpired(_EXPIRED)
            response = self._post(self.token_url, form)
            if response.status_code == 200:
                return _tokens(self._json(response))
            message = twitch_message(response, (device.device_code, self._client_secret))
            if message == "authorization_pending":
                continue
            if message == "slow_down":
                interval += SLOW_DOWN_STEP
                continue
            if message == "access_denied":
                raise AuthorizationDenied("the authorization was denied on Twitch: nothing stored")
            if message in ("expired_token", "invalid device code"):
                raise AuthorizationExpired(_EXPIRED)
            raise AuthorizationError(f"Twitch answered {response.status_code} {message}".strip() + " while polling")

    # --- authorization code flow --------------------------------------------------------------------

    def authorization_url(self, scopes: Iterable[str], redirect_uri: str, state: str) -> str:
        """The URL the human opens to authorize the application (``response_type=code``)."""
        query = {
            "client_id": self.client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "scope": " ".join(scopes),
            "state": state,
        }
        return f"{self.authorize_url}?{urlencode(query)}"

    def exchange_code(self, code: str, redirect_uri: str) -> TwitchTokens:
        """Exchange an authorization code for tokens (needs the client secret)."""
        form = {
            "client_id": self.client_id,
            "client_secret": self._require_secret(),
            "code": code,
            "grant_type": "authorization_code",
            "redirect_uri": redirect_uri,
        }
        response = self._post(self.token_url, form)
        if response.status_code != 200:
            message = twitch_message(response, (code, self._client_secret))
            raise AuthorizationError(f"Twitch refused the authorization code ({response.status_code} {message})")
        return _tokens(self._json(response))

    def code_flow(
        self, scopes: Iterable[str], port: int, show_url: Callable[[str], None], timeout: float = 300.0
    ) -> TwitchTokens:
        """Run the authorization code flow with a redirect to ``http://localhost:PORT``.

        ``show_url`` is called with the URL for the human; a server on
        127.0.0.1:PORT waits (at most ``timeout`` seconds) for Twitch's
        redirect, checks its ``state`` and exchanges the code.
        """
        self._require_secret()
        redirect_uri = f"http://localhost:{port}"
        state = secrets.token_urlsafe(16)
        try:
            server = _RedirectServer(("127.0.0.1", port))
        except OSError as exc:
            raise AuthorizationError(f"cannot listen on 127.0.0.1:{port} for Twitch's redirect: {exc.strerror}") from exc
        with server:
            show_url(self.authorization_url(scopes, redirect_uri, state))
            query = server.wait(timeout)
        if query is None:
            raise AuthorizationExpired(f"no redirect from Twitch within {timeout:g} s: nothing stored")
        if query.get("state") != state:
            raise AuthorizationError("the redirect's state does not match this request: nothing stored")
        if "error" in query:
            if query["error"] == "access_denied":
                raise AuthorizationDenied("the authorization was denied on Twitch: nothing stored")
            raise AuthorizationError(f"Twitch redirected with error {query['error'][:40]!r}: nothing stored")
        if not query.get("code"):
            raise AuthorizationError("Twitch's redirect carries no code: nothing stored")
        return self.exchange_code(query["code"], redirect_uri)

    # --- validation ---------------------------------------------------------------------------------

    def validate(self, access_token: str) -> dict[str, Any]:
        """Twitch's ``/oauth2/validate`` answer for a token (``login``, ``user_id``, ``scopes``, ...)."""
        try:
            response = self._http.get(self.validate_url, headers={"Authorization": f"OAuth {access_token}"})
        except httpx.HTTPError as exc:
            raise AuthorizationError(f"cannot reach Twitch ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise AuthorizationError(f"Twitch did not validate the new token ({response.status_code}): nothing stored")
        answer = self._json(response)
        try:
            _text(answer, "login"), _text(answer, "user_id")
        except (TypeError, ValueError) as exc:
            raise AuthorizationError(f"Twitch's validate answer is malformed: {exc}") from None
        return answer

    # --- plumbing -----------------------------------------------------------------------------------

    def _require_secret(self) -> str:
        if not self._client_secret:
            raise MissingClientCredentials(
                f"the authorization code flow needs the client secret: set {CLIENT_SECRET_ENV}"
            )
        return self._client_secret

    def _post(self, url: str, form: dict[str, str]) -> httpx.Response:
        try:
            return self._http.post(url, data=form)
        except httpx.HTTPError as exc:
            raise AuthorizationError(f"cannot reach Twitch ({type(exc).__name__})") from None

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise AuthorizationError(f"Twitch answered {response.status_code} {twitch_message(response, ())}".strip())
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise AuthorizationError("Twitch's answer is not a JSON object")
        return answer


_EXPIRED = "the device code expired before the authorization was granted: nothing stored"


def _text(answer: dict[str, Any], key: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"no {key}")
    return value


def _positive(answer: dict[str, Any], key: str) -> int:
    value = answer.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"no positive integer {key}")
    return value


def _scopes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(str(s) for s in value)
    return ()


def _tokens(answer: dict[str, Any]) -> TwitchTokens:
    try:
        return TwitchTokens(
            access_token=_text(answer, "access_token"),
            refresh_token=_text(answer, "refresh_token"),
            expires_in=_positive(answer, "expires_in"),
            scopes=_scopes(answer.get("scope")),
        )
    except ValueError as exc:
        raise AuthorizationError(f"Twitch's token answer is malformed: {exc}") from None


class _RedirectServer(HTTPServer):
    """Answers one redirect from Twitch on 127.0.0.1 and keeps its query."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.query: dict[str, str] | None = None
        self.received = threading.Event()
        super().__init__(address, _RedirectHandler)

    def wait(self, timeout: float) -> dict[str, str] | None:
        deadline = time.monotonic() + timeout
        self.timeout = 0.2
        while not self.received.is_set() and time.monotonic() < deadline:
            self.handle_request()
        return self.query


class _RedirectHandler(BaseHTTPRequestHandler):
    server: _RedirectServer

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        if parts.path != "/" or not ({"code", "error"} & set(query)):
            self.send_error(404)
            return
        self.server.query = query
        self.server.received.set()
        body = b"kissbot: authorization received, you can close this window.\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass  # the request line holds the authorization code


# --- storing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Authorization:
    """Tokens Twitch issued, validated: the account they belong to and the flow that got them."""

    tokens: TwitchTokens
    login: str
    twitch_user_id: str
    display_name: str
    flow: str

    @property
    def scopes(self) -> tuple[str, ...]:
        """The token's scopes."""
        return self.tokens.scopes


def obtain_tokens(
    twitch: TwitchAuth,
    login: str,
    scopes: Iterable[str],
    *,
    show_code: Callable[[DeviceCode], None] | None = None,
    code_flow_port: int | None = None,
    show_url: Callable[[str], None] | None = None,
) -> Authorization:
    """Have the human authorize ``login`` on Twitch; return the validated tokens (nothing stored).

    Runs the Device Code flow (``show_code`` receives the user code and URI
    for the human), or with ``code_flow_port`` the authorization code flow
    (``show_url`` receives the URL to open). Raises :class:`WrongTwitchAccount`
    if Twitch's validate answer names another login.
    """
    scopes = tuple(scopes)
    if code_flow_port is not None:
        tokens = twitch.code_flow(scopes, code_flow_port, show_url or (lambda _url: None))
        flow = "authorization_code"
    else:
        device = twitch.start_device_flow(scopes)
        if show_code is not None:
            show_code(device)
        tokens = twitch.poll_device(device)
        flow = "device_code"
    identity = twitch.validate(tokens.access_token)
    twitch_login = str(identity["login"]).lower()
    if twitch_login != login.lower():
        raise WrongTwitchAccount(
            f"the token Twitch issued belongs to {twitch_login[:25]!r}, not {login.lower()!r}: "
            "log in to Twitch as that account and try again; nothing stored"
        )
    if not tokens.scopes:
        tokens = TwitchTokens(tokens.access_token, tokens.refresh_token, tokens.expires_in, _scopes(identity.get("scopes")))
    return Authorization(tokens, twitch_login, str(identity["user_id"]), str(identity["login"]), flow)


def store_authorization(store: DatabaseManager, authorization: Authorization, *, token_type: str = "bot") -> Authorized:
    """Store authorized tokens in one transaction; return what was stored.

    Raises :class:`WrongTwitchAccount` (nothing stored) if the store holds the
    login with another Twitch id. Creates the user if needed (a bot account
    unless ``token_type`` is ``broadcaster``), stores the tokens with their
    expiry and scopes (clearing ``needs_reauth``) and audits
    ``tokens_authorized`` (login, token type, scopes, expiry, flow; no secret).
    """
    auth, tokens = authorization, authorization.tokens
    with store.session() as session:
        users = UserRepository(session)
        user = users.get_user(auth.twitch_user_id)
        by_login = users.get_user_by_login(auth.login)
        if by_login is not None and (user is None or by_login["id"] != user["id"]):
            raise WrongTwitchAccount(
                f"user {auth.login!r} is stored with Twitch id {by_login['twitch_user_id']}, "
                f"but Twitch says {auth.login!r} is {auth.twitch_user_id}: nothing stored"
            )
        created = user is None
        if user is None:
            user_id = users.create_user(auth.twitch_user_id, auth.login, auth.display_name, is_bot=token_type == "bot")
        else:
            user_id = user["id"]
        TokenRepository(session).store_tokens(
            user_id, tokens.access_token, tokens.refresh_token, tokens.expires_in, list(tokens.scopes),
            token_type=token_type,
        )
        AuditRepository(session).log_event(
            "tokens_authorized",
            user_id=user_id,
            details={
                "login": auth.login, "token_type": token_type, "scopes": list(tokens.scopes),
                "expires_in": tokens.expires_in, "flow": auth.flow,
            },
        )
    return Authorized(user_id, auth.login, auth.twitch_user_id, token_type, tokens.scopes, tokens.expires_in, created)


def authorize(
    store: DatabaseManager,
    twitch: TwitchAuth,
    login: str,
    scopes: Iterable[str],
    *,
    token_type: str = "bot",
    **flow: Any,
) -> Authorized:
    """:func:`obtain_tokens` then :func:`store_authorization`: authorize ``login`` and store its tokens.

    ``flow`` takes :func:`obtain_tokens`' keyword arguments (``show_code``,
    ``code_flow_port``, ``show_url``).
    """
    return store_authorization(store, obtain_tokens(twitch, login, scopes, **flow), token_type=token_type)
