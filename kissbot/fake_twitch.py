"""A fake Twitch on 127.0.0.1 for tests: the OAuth endpoints of ``id.twitch.tv`` and Helix ``GET /users``.

It keeps real state: tokens minted for a (login, user id, scopes), their expiry,
refresh tokens that rotate (single-use for public clients, or for every client
with ``single_use_refresh=True``), device grants and authorization codes. The
answers and error bodies follow Twitch's authentication documentation::

    POST /oauth2/token      grant_type refresh_token | authorization_code |
                            urn:ietf:params:oauth:grant-type:device_code
    GET  /oauth2/validate   Authorization: OAuth <access token>
    POST /oauth2/device     client_id, scopes
    GET  /oauth2/authorize  response_type=code: redirects to redirect_uri with a code
    GET  /helix/users       Authorization: Bearer <access token>, Client-Id

The pytest plugin (:mod:`kissbot.testing`) serves one per test as the
``fake_twitch`` fixture; point a client at :attr:`FakeTwitch.token_url` and
friends, or put :meth:`FakeTwitch.env` into a subprocess's environment.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit

from kissbot.twitch import (
    AUTHORIZE_URL_ENV,
    CLIENT_ID_ENV,
    DEVICE_URL_ENV,
    HELIX_URL_ENV,
    TOKEN_URL_ENV,
    VALIDATE_URL_ENV,
)

DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
Answer = tuple[int, dict[str, Any]]


@dataclass
class FakeToken:
    """A user access token and its refresh token as the fake knows them."""

    access_token: str
    refresh_token: str
    login: str
    user_id: str
    scopes: list[str]
    client_id: str
    expires_at: float
    single_use: bool = False

    @property
    def expires_in(self) -> int:
        """Whole seconds left (0 once expired)."""
        return max(0, round(self.expires_at - time.time()))

    def __repr__(self) -> str:
        return f"<FakeToken {self.login} ({self.user_id}) scopes={self.scopes}>"


@dataclass
class _DeviceGrant:
    device_code: str
    user_code: str
    client_id: str
    scopes: list[str]
    expires_at: float
    answers: list[str] = field(default_factory=list)
    approved_by: tuple[str, str] | None = None
    denied: bool = False


def _error(status: int, message: str) -> Answer:
    return status, {"status": status, "message": message}


class FakeTwitch:
    """Twitch's OAuth and Helix ``/users`` endpoints on a free port of 127.0.0.1, in a thread.

    ``client_id`` is the only application the fake knows; ``client_secret``,
    when set, is required from confidential clients (refresh of a non-public
    token, authorization code). Tokens live ``expires_in`` seconds.

    Test knobs (all thread-safe to set between requests):

    * :meth:`mint` a token for a (login, user id, scopes); :meth:`expire` or
      :meth:`revoke` it; :meth:`is_live` tells whether an access token works;
    * ``single_use_refresh``: every refresh token works once (public clients'
      always do); a spent one gets ``400 Invalid refresh token``;
    * ``latency``: seconds slept before answering each request;
    * :meth:`rate_limit`: the next requests get ``429`` with ``Retry-After``
      and ``Ratelimit-Reset``;
    * ``token_answer``: a forced ``(status, body)`` for every token request;
      ``answer_scope``: a forced ``scope`` field in token answers;
    * the human at the browser: :meth:`login_as` approves device grants and
      authorization requests as a user, :meth:`deny` refuses them, and
      ``device_answers`` are the error messages each new device grant gives
      its first polls (``authorization_pending``, ``slow_down``,
      ``access_denied``, ``expired_token``) before the human's decision;
    * ``on_token_request``: called on each token request; :meth:`hold_first`
      makes the first N token requests wait for each other.

    Recorded: ``requests`` (a Counter per endpoint path), ``exchanges`` (each
    request's :class:`Exchange`: path, status, when it arrived and was answered), :meth:`refreshes_per_token`,
    ``token_forms`` (every form posted to the token endpoint), ``validate_headers``,
    ``issued`` (every token handed out, access then refresh), ``device_codes``
    (the ``(device_code, user_code)`` of each device grant) and ``connections``
    (how many TCP connections clients opened).
    """

    def __init__(
        self,
        client_id: str = "kissbot-test-client",
        client_secret: str | None = None,
        *,
        expires_in: int = 14400,
        single_use_refresh: bool = False,
        latency: float = 0.0,
        device_interval: int = 5,
        device_expires_in: int = 1800,
        accept_unknown: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.expires_in = expires_in
        self.single_use_refresh = single_use_refresh
        self.latency = latency
        self.device_interval = device_interval
        self.device_expires_in = device_expires_in
        self.accept_unknown = accept_unknown
        """Treat unknown tokens as live tokens of ``unknown_user`` (for tests that store made-up tokens)."""
        self.unknown_user = ("kissbot_test_bot", "1")
        self.token_answer: Answer | None = None
        self.answer_scope: Any = None
        self.device_answers: list[str] = []
        self.on_token_request: Callable[[], None] | None = None
        self.gate: threading.Barrier | None = None
        self.requests: Counter[str] = Counter()
        self.exchanges: list[Exchange] = []
        self.token_forms: list[dict[str, str]] = []
        self.validate_headers: list[str] = []
        self.issued: list[str] = []
        self.device_codes: list[tuple[str, str]] = []
        self.connections = 0
        self.lock = threading.RLock()
        self._gated = 0
        self._human: tuple[str, str] | None = None
        self._denies = False
        self._by_access: dict[str, FakeToken] = {}
        self._by_refresh: dict[str, FakeToken] = {}
        self._spent: set[str] = set()
        self._dead_access: set[str] = set()
        self._devices: dict[str, _DeviceGrant] = {}
        self._codes: dict[str, tuple[str, str, list[str], str]] = {}
        self._users: dict[str, str] = {}
        self._rate_limited = 0
        self._reset_in = 1
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        host, port = self.server.server_address[:2]
        self.base_url = f"http://{host}:{port}"
        self.token_url = f"{self.base_url}/oauth2/token"
        self.validate_url = f"{self.base_url}/oauth2/validate"
        self.device_url = f"{self.base_url}/oauth2/device"
        self.authorize_url = f"{self.base_url}/oauth2/authorize"
        self.helix_url = f"{self.base_url}/helix"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-twitch", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<FakeTwitch {self.base_url} client_id={self.client_id}>"

    def env(self) -> dict[str, str]:
        """The environment variables that point kissbot (CLI, worker) at this fake."""
        return {
            CLIENT_ID_ENV: self.client_id,
            TOKEN_URL_ENV: self.token_url,
            VALIDATE_URL_ENV: self.validate_url,
            DEVICE_URL_ENV: self.device_url,
            AUTHORIZE_URL_ENV: self.authorize_url,
            HELIX_URL_ENV: self.helix_url,
        }

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeTwitch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- test knobs -------------------------------------------------------------------------------

    def mint(
        self,
        login: str,
        user_id: str,
        scopes: Iterable[str] = (),
        *,
        expires_in: int | None = None,
        access_token: str | None = None,
        refresh_token: str | None = None,
        single_use: bool | None = None,
    ) -> FakeToken:
        """A new live token for the user (made-up strings unless given), as if the user had authorized."""
        return self._issue(
            login, user_id, list(scopes), self.client_id, single_use=bool(single_use), expires_in=expires_in,
            access_token=access_token, refresh_token=refresh_token, record=False,
        )

    def expire(self, access_token: str) -> None:
        """Make an access token expired: ``/validate`` and Helix answer 401 for it; its refresh token still works."""
        with self.lock:
            token = self._by_access.get(access_token)
            if token is not None:
                token.expires_at = time.time() - 1
            self._dead_access.add(access_token)

    def revoke(self, token: str) -> None:
        """Revoke a token (access or refresh): both halves of its pair stop working."""
        with self.lock:
            pair = self._by_access.get(token) or self._by_refresh.get(token)
            if pair is not None:
                self._forget(pair)
            self._dead_access.add(token)
            self._spent.add(token)

    def is_live(self, access_token: str) -> bool:
        """True if the access token would pass ``/validate`` now."""
        with self.lock:
            return self._live(access_token) is not None

    def login_as(self, login: str, user_id: str) -> None:
        """The human at the browser approves device grants and authorization requests as this user."""
        with self.lock:
            self._human, self._denies = (login, user_id), False
            self._users[login] = user_id
            for grant in self._devices.values():
                if not grant.denied:
                    grant.approved_by = self._human

    def deny(self) -> None:
        """The human at the browser refuses: device polls get ``access_denied``, redirects carry ``error=access_denied``."""
        with self.lock:
            self._human, self._denies = None, True
            for grant in self._devices.values():
                grant.denied = True

    def rate_limit(self, requests: int = 1, reset_in: int = 1) -> None:
        """Answer the next ``requests`` requests (any endpoint) with 429; the limit resets in ``reset_in`` seconds."""
        with self.lock:
            self._rate_limited, self._reset_in = requests, reset_in

    def hold_first(self, count: int, timeout: float = 30) -> None:
        """Make the first ``count`` token requests wait for each other (proves they were concurrent)."""
        self.gate = threading.Barrier(count, timeout=timeout)

    def refreshes_per_token(self) -> Counter[str]:
        """How many refresh requests each refresh token received."""
        with self.lock:
            return Counter(f["refresh_token"] for f in self.token_forms if f.get("grant_type") == "refresh_token")

    def device_user_codes(self) -> list[str]:
        """The user codes of the device grants still waiting."""
        with self.lock:
            return [grant.user_code for grant in self._devices.values()]

    # --- state ------------------------------------------------------------------------------------

    def _issue(
        self,
        login: str,
        user_id: str,
        scopes: list[str],
        client_id: str,
        *,
        single_use: bool,
        expires_in: int | None = None,
        access_token: str | None = None,
        refresh_token: str | None = None,
        record: bool = True,
    ) -> FakeToken:
        token = FakeToken(
            access_token=access_token or secrets.token_hex(15),
            refresh_token=refresh_token or secrets.token_hex(25),
            login=login,
            user_id=user_id,
            scopes=scopes,
            client_id=client_id,
            expires_at=time.time() + (self.expires_in if expires_in is None else expires_in),
            single_use=single_use,
        )
        with self.lock:
            self._by_access[token.access_token] = token
            self._by_refresh[token.refresh_token] = token
            self._users[login] = user_id
            if record:
                self.issued += [token.access_token, token.refresh_token]
        return token

    def _forget(self, token: FakeToken) -> None:
        self._by_access.pop(token.access_token, None)
        self._by_refresh.pop(token.refresh_token, None)

    def _live(self, access_token: str) -> FakeToken | None:
        token = self._by_access.get(access_token)
        if token is not None:
            return token if token.expires_at > time.time() else None
        if self.accept_unknown and access_token and access_token not in self._dead_access:
            login, user_id = self.unknown_user
            return FakeToken(access_token, "", login, user_id, [], self.client_id, time.time() + self.expires_in)
        return None

    def _token_answer(self, token: FakeToken) -> Answer:
        scope = self.answer_scope if self.answer_scope is not None else token.scopes
        return 200, {
            "access_token": token.access_token,
            "expires_in": token.expires_in,
            "refresh_token": token.refresh_token,
            "scope": scope,
            "token_type": "bearer",
        }

    def _check_client(self, form: dict[str, str], confidential: bool) -> Answer | None:
        if form.get("client_id") != self.client_id:
            return _error(400, "invalid client")
        if confidential and self.client_secret is not None:
            if "client_secret" not in form:
                return _error(400, "missing client secret")
            if form["client_secret"] != self.client_secret:
                return _error(403, "invalid client secret")
        return None

    # --- endpoints --------------------------------------------------------------------------------

    def _token(self, form: dict[str, str]) -> Answer:
        with self.lock:
            self.token_forms.append(form)
            wait = self.gate is not None and self._gated < self.gate.parties
            self._gated += wait
        if wait and self.gate is not None:
            self.gate.wait()
        if self.on_token_request is not None:
            self.on_token_request()
        if self.token_answer is not None:
            return self.token_answer
        grant = form.get("grant_type")
        with self.lock:
            if grant == "refresh_token":
                return self._refresh(form)
            if grant == "authorization_code":
                return self._authorization_code(form)
            if grant == DEVICE_GRANT_TYPE:
                return self._device_token(form)
            if grant == "client_credentials":
                return _error(400, "client_credentials tokens are not supported by the fake")
        return _error(400, "unsupported grant type")

    def _refresh(self, form: dict[str, str]) -> Answer:
        presented = form.get("refresh_token", "")
        token = self._by_refresh.get(presented)
        if token is None and self.accept_unknown and presented and presented not in self._spent:
            login, user_id = self.unknown_user
            token = FakeToken("", presented, login, user_id, ["chat:read", "chat:edit"], self.client_id, 0)
        if token is None:
            return _error(400, "Invalid refresh token")
        refused = self._check_client(form, confidential=not token.single_use)
        if refused is not None:
            return refused
        single_use = token.single_use or self.single_use_refresh
        if token.single_use or self.single_use_refresh:
            self._by_refresh.pop(presented, None)
            self._spent.add(presented)
        fresh = self._issue(token.login, token.user_id, token.scopes, token.client_id, single_use=token.single_use)
        return self._token_answer(fresh)

    def _authorization_code(self, form: dict[str, str]) -> Answer:
        refused = self._check_client(form, confidential=True)
        if refused is not None:
            return refused
        grant = self._codes.pop(form.get("code", ""), None)
        if grant is None:
            return _error(400, "Invalid authorization code")
        login, user_id, scopes, redirect_uri = grant
        if form.get("redirect_uri") != redirect_uri:
            return _error(400, "Parameter redirect_uri does not match registered URI")
        return self._token_answer(self._issue(login, user_id, scopes, self.client_id, single_use=False))

    def _device_token(self, form: dict[str, str]) -> Answer:
        refused = self._check_client(form, confidential=False)
        if refused is not None:
            return refused
        grant = self._devices.get(form.get("device_code", ""))
        if grant is None:
            return _error(400, "invalid device code")
        if grant.expires_at <= time.time():
            del self._devices[grant.device_code]
            return _error(400, "expired_token")
        if grant.answers:
            answer = grant.answers.pop(0)
            if answer in ("access_denied", "expired_token"):
                del self._devices[grant.device_code]
            return _error(400, answer)
        if grant.denied:
            del self._devices[grant.device_code]
            return _error(400, "access_denied")
        if grant.approved_by is None:
            return _error(400, "authorization_pending")
        del self._devices[grant.device_code]
        login, user_id = grant.approved_by
        public = "client_secret" not in form
        return self._token_answer(self._issue(login, user_id, grant.scopes, grant.client_id, single_use=public))

    def _device(self, form: dict[str, str]) -> Answer:
        with self.lock:
            refused = self._check_client(form, confidential=False)
            if refused is not None:
                return refused
            user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))
            grant = _DeviceGrant(
                device_code=secrets.token_urlsafe(30),
                user_code=user_code,
                client_id=form["client_id"],
                scopes=form.get("scopes", "").split(),
                expires_at=time.time() + self.device_expires_in,
                answers=list(self.device_answers),
                approved_by=self._human,
                denied=self._denies,
            )
            self._devices[grant.device_code] = grant
            self.device_codes.append((grant.device_code, user_code))
        return 200, {
            "device_code": grant.device_code,
            "expires_in": self.device_expires_in,
            "interval": self.device_interval,
            "user_code": user_code,
            "verification_uri": f"{self.base_url}/activate?public=true&device-code={user_code}",
        }

    def _validate(self, authorization: str) -> Answer:
        with self.lock:
            self.validate_headers.append(authorization)
            token = self._live(authorization.removeprefix("OAuth ")) if authorization.startswith("OAuth ") else None
        if token is None:
            return _error(401, "invalid access token")
        return 200, {
            "client_id": token.client_id,
            "login": token.login,
            "scopes": token.scopes,
            "user_id": token.user_id,
            "expires_in": token.expires_in,
        }

    def _authorize(self, query: dict[str, str]) -> tuple[int, str]:
        """``(status, Location)``: the redirect the browser follows after the human decided."""
        redirect_uri, state = query.get("redirect_uri", ""), query.get("state")
        if query.get("client_id") != self.client_id or not redirect_uri or query.get("response_type") != "code":
            return 400, ""
        with self.lock:
            if self._human is None:
                params = {"error": "access_denied", "error_description": "The user denied you access"}
            else:
                code = secrets.token_hex(15)
                scopes = query.get("scope", "").split()
                self._codes[code] = (*self._human, scopes, redirect_uri)
                params = {"code": code, "scope": " ".join(scopes)}
        if state is not None:
            params["state"] = state
        return 302, f"{redirect_uri}?{urlencode(params)}"

    def _helix_users(self, headers: Any, query: dict[str, list[str]]) -> Answer:
        authorization = headers.get("Authorization", "")
        with self.lock:
            token = self._live(authorization.removeprefix("Bearer ")) if authorization.startswith("Bearer ") else None
            if token is None:
                return 401, {"error": "Unauthorized", "status": 401, "message": "Invalid OAuth token"}
            if headers.get("Client-Id") != token.client_id:
                return 401, {"error": "Unauthorized", "status": 401, "message": "Client ID and OAuth token do not match"}
            users = dict(self._users)
        wanted = [(login, users.get(login)) for login in query.get("login", [])]
        wanted += [(login, uid) for uid in query.get("id", []) for login, known in users.items() if known == uid]
        if not query:
            wanted = [(token.login, token.user_id)]
        return 200, {"data": [_helix_user(login, uid) for login, uid in wanted if uid is not None]}

    def _rate_limited_now(self) -> bool:
        with self.lock:
            if self._rate_limited <= 0:
                return False
            self._rate_limited -= 1
            return True


def _helix_user(login: str, user_id: str) -> dict[str, Any]:
    return {
        "id": user_id, "login": login, "display_name": login, "type": "", "broadcaster_type": "",
        "description": "", "profile_image_url": "", "offline_image_url": "", "view_count": 0,
        "created_at": "2020-01-01T00:00:00Z",
    }


class Exchange(NamedTuple):
    """One request the fake answered: ``arrived`` and ``answered`` are :func:`time.monotonic` times."""

    path: str
    status: int
    arrived: float
    answered: float


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # a worker opens many connections at once; the default backlog (5) resets them


def _handler(twitch: FakeTwitch) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # the body, written after the headers, is not held back ~40 ms

        def setup(self) -> None:
            super().setup()
            with twitch.lock:
                twitch.connections += 1

        def do_POST(self) -> None:
            parts = urlsplit(self.path)
            path = parts.path
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            if not self._admit(path):
                return
            # Twitch takes the parameters from the query string as well as from the form body.
            fields = {**parse_qs(parts.query, keep_blank_values=True), **parse_qs(body, keep_blank_values=True)}
            form = {k: v[0] for k, v in fields.items()}
            if path == "/oauth2/token":
                self._json(*twitch._token(form))
            elif path == "/oauth2/device":
                self._json(*twitch._device(form))
            else:
                self._json(*_error(404, "Not Found"))

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if not self._admit(parts.path):
                return
            query = parse_qs(parts.query)
            if parts.path == "/oauth2/validate":
                self._json(*twitch._validate(self.headers.get("Authorization", "")))
            elif parts.path == "/helix/users":
                self._json(*twitch._helix_users(self.headers, query))
            elif parts.path == "/oauth2/authorize":
                status, location = twitch._authorize({k: v[0] for k, v in query.items()})
                if status != 302:
                    self._json(*_error(status, "invalid authorization request"))
                    return
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._json(*_error(404, "Not Found"))

        def _admit(self, path: str) -> bool:
            self.arrived = time.monotonic()
            with twitch.lock:
                twitch.requests[path] += 1
            if twitch.latency:
                time.sleep(twitch.latency)
            if not twitch._rate_limited_now():
                return True
            reset = twitch._reset_in
            self._json(
                429, {"error": "Too Many Requests", "status": 429, "message": "Too Many Requests"},
                {"Retry-After": str(reset), "Ratelimit-Limit": "800", "Ratelimit-Remaining": "0",
                 "Ratelimit-Reset": str(int(time.time()) + reset)},
            )
            return False

        def _json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            with twitch.lock:
                twitch.exchanges.append(Exchange(urlsplit(self.path).path, status, self.arrived, time.monotonic()))

        def log_message(self, *args: Any) -> None:
            pass

    return Handler
