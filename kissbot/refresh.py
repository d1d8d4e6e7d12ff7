"""Proactive refresh and hourly validation of the stored Twitch user tokens.

A :class:`TokenRefresher` keeps every stored token usable:

* :meth:`~TokenRefresher.refresh_due` refreshes the tokens that expire within
  config ``token_refresh_interval`` seconds with Twitch's ``refresh_token``
  grant, and stores the answer (rotated refresh token included) with
  compare-and-set, so a concurrent writer's newer tokens are never overwritten;
* :meth:`~TokenRefresher.validate_due` validates each token not validated for
  ``validate_interval`` seconds (Twitch asks apps to validate at start and then
  hourly); a 401 triggers a refresh, and if that refresh fails the token is
  marked for reauthorisation;
* :meth:`~TokenRefresher.run` repeats both until a :class:`threading.Event` is set.

One refresher works on ``concurrency`` tokens at once (a thread pool around a
synchronous :class:`httpx.Client`: measured against asyncio with httpx's async
client, it used 2-4x less CPU for the same requests and is as fast, and the
database calls stay synchronous). Due tokens are claimed in batches with the
repository's ``claim_due``, which takes each row's refresh lease (``FOR UPDATE
SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite) and returns the
stored tokens with it, so many processes split the due tokens instead of racing
for them; a token is refreshed only under its lease, and its new tokens are
stored only if the row is still at the version claimed (compare-and-set), so
each due token is refreshed once per cycle. The new tokens, the audit event,
``last_validated`` and the lease's release are one transaction; a refresher
keeps no more write transactions open at once than its engine's pool keeps
connections (one on SQLite, which has one writer). Twitch rejecting a refresh token (400/401)
marks the token for reauth at once; a 429 saying when the rate limit resets
pauses every request of the refresher until then; 5xx, timeouts, connection
errors (and a 429 without a reset time) count a ``refresh_failures`` and back
off exponentially (with jitter) until config ``max_refresh_failures`` is
reached, then mark it for reauth.

Nothing here logs or raises a token or the client secret.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from enum import Enum
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from kissbot import __version__, settings
from kissbot.engine import read_connection, write_transaction
from kissbot.errors import (
    ClientCredentialsRejected,
    DatabaseError,
    DecryptionError,
    MissingClientCredentials,
    StaleTokens,
)
from kissbot.repo import AuditRepository, TokenRepository
from kissbot.twitch import (
    CLIENT_ID_ENV,
    CLIENT_SECRET_ENV,
    DEFAULT_TOKEN_URL,
    DEFAULT_VALIDATE_URL,
    TOKEN_URL_ENV,
    VALIDATE_URL_ENV,
    twitch_message,
)
from kissbot.types import Secret, cipher_of, utcnow
from kissbot.validation import check_count, clamp_expires_in, mask_secrets

if TYPE_CHECKING:
    from kissbot.manager import DatabaseManager

log = logging.getLogger(__name__)


DEFAULT_REFRESH_WINDOW = settings.SETTINGS["token_refresh_interval"].default
"""Default of config ``token_refresh_interval``: refresh tokens expiring within this many seconds."""
DEFAULT_MAX_FAILURES = settings.SETTINGS["max_refresh_failures"].default
"""Default of config ``max_refresh_failures``: transient failures before a token is marked for reauth."""
DEFAULT_VALIDATE_INTERVAL = settings.SETTINGS["token_validate_interval"].default
"""Default of config ``token_validate_interval``: seconds between two validations of a token."""
UNKNOWN_EXPIRES_IN = 3600
"""Lifetime recorded for refreshed tokens whose ``expires_in`` Twitch did not give as a positive number."""
DEFAULT_CONCURRENCY = 32
"""Tokens refreshed or validated at once by one refresher (benchmarks/refresh_worker.py: at Twitch's ~100 ms
per request, 32 threads refresh ~250 tokens/s, 10,000 tokens well within a minute)."""
MAX_CONCURRENCY = 256
"""Most tokens one refresher handles at once: more threads only add contention in one process; run more workers."""
RATE_LIMIT_RETRIES = 3
"""How many times a request answered 429 (with the time the limit resets) is sent again after the pause."""
MAX_RATE_LIMIT_PAUSE = 60.0
"""Longest pause a 429 imposes on every request, in seconds, whatever its headers say."""

class Outcome(str, Enum):
    """What the refresher did with one token."""

    REFRESHED = "refreshed"
    """New tokens were stored."""
    REAUTH = "reauth"
    """The token was marked ``needs_reauth``: a human must authorise again."""
    FAILED = "failed"
    """A transient failure (429, 5xx, timeout, connection): counted, retried after a backoff."""
    BACKING_OFF = "backing_off"
    """The token failed before and its backoff has not elapsed: nothing sent."""
    SKIPPED_LOCKED = "skipped_locked"
    """Another process holds the token's refresh lease."""
    SKIPPED_FRESH = "skipped_fresh"
    """Once the lease was held the token no longer needed it (another process refreshed it)."""
    STALE = "stale"
    """Another writer stored newer tokens while we refreshed: theirs were kept."""
    VALIDATED = "validated"
    """Twitch accepted the access token; ``last_validated`` was stored."""
    VALIDATION_FAILED = "validation_failed"
    """Twitch could not be asked (or answered neither 200 nor 401): tried again next cycle."""


@dataclass(frozen=True)
class TokenResult:
    """The outcome for one token row, with a short reason free of secrets."""

    user_id: int
    login: str
    token_type: str
    outcome: Outcome
    detail: str = ""


@dataclass
class RefreshCounters:
    """Running totals, for metrics: ``failed`` counts transient refresh and validation failures."""

    refreshed: int = 0
    failed: int = 0
    reauth_needed: int = 0
    validated: int = 0

    def add(self, outcome: Outcome) -> None:
        """Count one outcome."""
        if outcome is Outcome.REFRESHED:
            self.refreshed += 1
        elif outcome in (Outcome.FAILED, Outcome.VALIDATION_FAILED):
            self.failed += 1
        elif outcome is Outcome.REAUTH:
            self.reauth_needed += 1
        elif outcome is Outcome.VALIDATED:
            self.validated += 1

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return asdict(self)

    def __str__(self) -> str:
        return " ".join(f"{name}={value}" for name, value in self.as_dict().items())


class RefreshObserver(Protocol):
    """What ``TokenRefresher(observer=…)`` reports to, e.g. :class:`kissbot.metrics.RefreshMetrics`."""

    def instrument(self, http: httpx.Client) -> None:
        """Called once with the refresher's HTTP client (to time its requests)."""

    def outcome(self, outcome: Outcome) -> None:
        """Called with every token's outcome."""


@dataclass(frozen=True)
class _Row:
    user_id: int
    login: str
    token_type: str


@dataclass(frozen=True)
class _Pass:
    """One pass's view of the config, and the event that ends it early (``stop``, or an error in another token)."""

    window: float
    max_failures: int
    validate_interval: float
    stop: threading.Event | None
    halt: threading.Event

    def halted(self) -> bool:
        return self.halt.is_set() or (self.stop is not None and self.stop.is_set())


@dataclass
class _Lease:
    """The refresh lease this worker holds on a token row, from ``taken`` (monotonic) until ``released``."""

    row: _Row
    taken: float
    released: bool = False
    claimed: dict[str, Any] | None = None
    """The row as the claim read it (ciphertext included), if it was claimed with the due tokens."""


class _Halted(Exception):
    """The pass ended while this token waited for the rate limit: nothing was sent."""


class _LeaseLost(Exception):
    """The token's lease expired while it waited and another worker took it."""


class _RateLimit:
    """Twitch's rate limit as every request of one refresher sees it: a 429 pauses them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` from now (a later pause already set wins)."""
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)

    def wait(self, ctx: _Pass) -> None:
        """Return once requests may be sent; raise :class:`_Halted` if the pass ends first."""
        while True:
            with self._lock:
                delay = self._until - time.monotonic()
            if ctx.halted():
                raise _Halted
            if delay <= 0:
                return
            ctx.halt.wait(min(delay, 0.25))  # also notices ``stop`` while paused


class _Connections(httpx.BaseTransport):
    """Keep-alive connections for as many requests at once as are sent, each request on a connection of its own.

    httpx's pool (httpcore 1.0) walks every connection, and for each idle one
    every connection again, each time a request starts or ends: at 32
    connections that was the refresh worker's largest CPU cost. Here a request
    takes an idle one-connection transport (or makes one) and gives it back
    when its response is closed, at the same cost at any concurrency.
    """

    def __init__(self, tls: ssl.SSLContext) -> None:
        self._tls = tls
        self._idle: SimpleQueue[httpx.HTTPTransport] = SimpleQueue()
        self._made: list[httpx.HTTPTransport] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            transport = self._idle.get_nowait()
        except Empty:
            transport = httpx.HTTPTransport(verify=self._tls, limits=httpx.Limits(max_connections=1))
            self._made.append(transport)
        try:
            response = transport.handle_request(request)
        except BaseException:
            self._idle.put(transport)
            raise
        response.stream = _GiveBack(response.stream, lambda: self._idle.put(transport))
        return response

    def close(self) -> None:
        for transport in self._made:
            transport.close()


class _GiveBack(httpx.SyncByteStream):
    """A response body that calls ``done`` once it is closed."""

    def __init__(self, stream: Any, done: Callable[[], None]) -> None:
        self._stream, self._done = stream, done

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._done()


class TokenRefresher:
    """Refreshes and validates the tokens of a store against Twitch, ``concurrency`` tokens at a time.

    ``store`` is a :class:`~kissbot.manager.DatabaseManager` (or its engine).
    ``client_secret`` is None for a public client: Twitch refreshes the tokens
    of its Device Code flow without one (each refresh token works once).
    ``timeout`` bounds each phase of an HTTP request (connect, write, read) in
    seconds; ``lease_ttl`` is how long a token's refresh lease is held at most
    (it must outlast a request; a token waiting longer has it extended). The
    first retry after a transient failure waits about ``backoff_base`` seconds,
    doubling per failure up to ``backoff_max``. ``validate_interval`` overrides
    config ``token_validate_interval``. ``http`` replaces the :class:`httpx.Client`
    (the refresher then does not close it; it must allow ``concurrency``
    connections). ``observer`` (a :class:`RefreshObserver`) is told every
    outcome and may time the requests.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        store: DatabaseManager | Engine,
        client_id: str | None,
        client_secret: str | None,
        *,
        token_url: str = DEFAULT_TOKEN_URL,
        validate_url: str = DEFAULT_VALIDATE_URL,
        timeout: float = 10.0,
        lease_ttl: float = 60.0,
        backoff_base: float = 30.0,
        backoff_max: float = 3600.0,
        validate_interval: float | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        http: httpx.Client | None = None,
        owner: str | None = None,
        observer: RefreshObserver | None = None,
    ) -> None:
        if not client_id:
            raise MissingClientCredentials(f"no Twitch client id: set {CLIENT_ID_ENV}")
        self.engine: Engine = store if isinstance(store, Engine) else store.engine
        self.client_id = client_id
        self._client_secret = client_secret or None
        self.token_url = token_url
        self.validate_url = validate_url
        self.lease_ttl = lease_ttl
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.validate_interval = validate_interval
        self.concurrency = check_count(concurrency, "concurrency", minimum=1, maximum=MAX_CONCURRENCY)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Write transactions open at once. SQLite has one writer: this process's threads queue here for it, woken
        # as soon as it is free, instead of polling in SQLite's busy handler (1, 2, 5, 10… ms). Elsewhere, as many
        # as the engine's pool keeps connections: more would open connections that the pool closes again.
        pool_size = getattr(self.engine.pool, "size", None)
        if self.engine.dialect.name == "sqlite":
            writers = 1
        else:
            writers = pool_size() if callable(pool_size) else self.concurrency
        self._writers = threading.BoundedSemaphore(max(1, writers))
        self._owns_http = http is None
        if http is None:
            tls = httpx.create_ssl_context()
            http = httpx.Client(
                timeout=httpx.Timeout(timeout),
                verify=tls,
                limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                headers={"User-Agent": f"kissbot/{__version__}"},
                mounts={"all://": _Connections(tls)},  # a proxy from the environment still takes its URLs
            )
        self._http = http
        self._rate_limit = _RateLimit()
        self._counting = threading.Lock()
        self.counters = RefreshCounters()
        self.observer = observer
        if observer is not None:
            observer.instrument(self._http)

    @classmethod
    def from_env(cls, store: DatabaseManager | Engine, **kwargs: Any) -> TokenRefresher:
        """A refresher with the client id, secret and endpoints taken from the environment.

        Reads ``TWITCH_CLIENT_ID``, ``TWITCH_CLIENT_SECRET``,
        ``KISSBOT_TWITCH_TOKEN_URL`` and ``KISSBOT_TWITCH_VALIDATE_URL``;
        keyword arguments win over the environment.
        """
        kwargs.setdefault("client_id", os.environ.get(CLIENT_ID_ENV))
        kwargs.setdefault("client_secret", os.environ.get(CLIENT_SECRET_ENV))
        kwargs.setdefault("token_url", os.environ.get(TOKEN_URL_ENV) or DEFAULT_TOKEN_URL)
        kwargs.setdefault("validate_url", os.environ.get(VALIDATE_URL_ENV) or DEFAULT_VALIDATE_URL)
        return cls(store, **kwargs)

    def __repr__(self) -> str:
        return f"<TokenRefresher client_id={self.client_id} token_url={self.token_url} owner={self.owner}>"

    def close(self) -> None:
        """Close the HTTP client (if the refresher made it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> TokenRefresher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the public cycle ----------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 60.0) -> RefreshCounters:
        """Refresh and validate every ``interval`` seconds until ``stop`` is set; return the counters.

        ``stop`` is checked before each token, so setting it (from a signal
        handler or another thread) ends the loop once the requests in flight
        are answered. A database error (e.g. :class:`~kissbot.errors.DatabaseBusy`)
        ends only the current pass (it is logged, and the leases it held
        expire), as does any other unexpected error;
        :class:`~kissbot.errors.ClientCredentialsRejected` ends the loop.
        """
        log.info("refresh worker %s started, one cycle every %gs", self.owner, interval)
        while not stop.is_set():
            try:
                self.cycle(stop)
            except ClientCredentialsRejected:
                raise
            except Exception as exc:
                reason = mask_secrets(str(getattr(exc, "orig", None) or exc).strip().split("\n")[0], ())
                log.error("pass failed (%s: %s); next pass in %gs", type(exc).__name__, reason, interval)
            if stop.wait(interval):
                break
        log.info("refresh worker %s stopped: %s", self.owner, self.counters)
        return self.counters

    def cycle(self, stop: threading.Event | None = None) -> list[TokenResult]:
        """One pass: :meth:`refresh_due`, then :meth:`validate_due`."""
        results = self.refresh_due(stop)
        return results + self.validate_due(stop)

    def refresh_due(self, stop: threading.Event | None = None) -> list[TokenResult]:
        """Refresh every token expiring within config ``token_refresh_interval`` seconds.

        Due tokens are claimed in batches with
        :meth:`~kissbot.repo.TokenRepository.claim_due` (so several workers
        split them) and refreshed ``concurrency`` at a time; a refreshed token
        is also recorded as validated. Tokens flagged ``needs_reauth`` are left
        alone. Returns one :class:`TokenResult` per token looked at, soonest
        expiry first (a due token another worker holds is ``SKIPPED_LOCKED``);
        stops early once ``stop`` is set. Raises
        :class:`~kissbot.errors.ClientCredentialsRejected` if Twitch refuses
        the application's credentials (no token is touched then).
        """
        ctx = self._pass(stop)
        with self.engine.connect() as conn:
            due = TokenRepository(conn).get_tokens_needing_refresh(buffer_minutes=ctx.window / 60)
        due_tokens = [_Row(r["user_id"], r["twitch_login"], r["token_type"]) for r in due if not r["needs_reauth"]]
        if not due_tokens:
            return []
        claimed: dict[_Row, Future[TokenResult | None]] = {}
        finished: SimpleQueue[Future[TokenResult | None]] = SimpleQueue()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="kissbot-refresh") as pool:
            running = 0
            more = True
            try:
                while True:
                    # Keep between one and two rounds of work queued: claims come in batches.
                    if more and not ctx.halted() and running <= self.concurrency:
                        limit = 2 * self.concurrency - running
                        with self._transaction() as conn:
                            rows = TokenRepository(conn).claim_due(
                                self.owner, self.lease_ttl, ctx.window / 60, limit, with_ciphertext=True
                            )
                        taken = time.monotonic()
                        more = len(rows) == limit
                        for row in rows:
                            lease = _Lease(_Row(row["user_id"], row["twitch_login"], row["token_type"]), taken, claimed=row)
                            future = claimed[lease.row] = pool.submit(self._task, self._refresh_due_token, lease.row, ctx, lease)
                            future.add_done_callback(finished.put)
                        running += len(rows)
                    if not running:
                        break
                    finished.get().result()  # an error ends the pass
                    running -= 1
            except BaseException:
                ctx.halt.set()
                raise
        results: list[TokenResult | None] = []
        for token in due_tokens:
            if token in claimed:
                results.append(claimed.pop(token).result())
            elif not ctx.halted():
                results.append(self._done(token, Outcome.SKIPPED_LOCKED, "another worker holds its refresh lease"))
        results += [future.result() for future in claimed.values()]  # came due after the scan
        return [result for result in results if result is not None]

    def validate_due(self, stop: threading.Event | None = None) -> list[TokenResult]:
        """Validate every usable token not validated for ``validate_interval`` seconds, ``concurrency`` at a time.

        Tokens due for a refresh are left to :meth:`refresh_due`. A 200 stores
        ``last_validated``; a 401 refreshes the token at once (ignoring any
        backoff), and if that refresh fails the token is marked for reauth.
        Returns one :class:`TokenResult` per token; stops early once ``stop`` is set.
        """
        ctx = self._pass(stop)
        with self.engine.connect() as conn:
            rows = TokenRepository(conn).get_tokens_needing_validation(ctx.validate_interval)
        not_due = utcnow() + timedelta(seconds=ctx.window)
        tokens = [_Row(r["user_id"], r["twitch_login"], r["token_type"]) for r in rows if r["expires_at"] > not_due]
        if not tokens:
            return []
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="kissbot-validate") as pool:
            futures = [pool.submit(self._task, self._validate_token, token, ctx, None) for token in tokens]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                ctx.halt.set()
                raise
        return [result for future in futures if (result := future.result()) is not None]

    def backoff_delay(self, user_id: int, token_type: str, failures: int) -> float:
        """Seconds to wait after the ``failures``-th consecutive transient failure of a token.

        ``backoff_base * 2**(failures-1)``, capped at ``backoff_max``, times a
        jitter between 0.5 and 1 drawn from the token and the failure count, so
        every process computes the same delay for a token while different
        tokens' retries are spread apart.
        """
        step = min(self.backoff_max, self.backoff_base * 2 ** max(failures - 1, 0))
        return step * random.Random(f"{user_id}:{token_type}:{failures}").uniform(0.5, 1.0)

    # --- one token -----------------------------------------------------------------------------

    def _pass(self, stop: threading.Event | None) -> _Pass:
        with self.engine.connect() as conn:
            current = _Pass(
                window=settings.value(conn, "token_refresh_interval"),
                max_failures=settings.value(conn, "max_refresh_failures"),
                validate_interval=(
                    self.validate_interval
                    if self.validate_interval is not None
                    else settings.value(conn, "token_validate_interval")
                ),
                stop=stop,
                halt=threading.Event(),
            )
        return current

    def _task(
        self, work: Callable[[_Lease, _Pass], TokenResult], row: _Row, ctx: _Pass, lease: _Lease | None
    ) -> TokenResult | None:
        """``work`` on one token under its refresh lease (taken here unless the claim took it), given back after.

        An unexpected error fails that token only (counted, logged without
        secrets); database errors still end the pass (the next token would
        meet them too), and rejected client credentials end the worker.
        Returns None for a token the pass ended before.
        """
        if lease is None and not ctx.halted():
            with self._transaction() as conn:
                taken = TokenRepository(conn).claim_refresh(row.user_id, self.owner, self.lease_ttl, token_type=row.token_type)
            if not taken:
                return self._done(row, Outcome.SKIPPED_LOCKED, "another worker holds its refresh lease")
            lease = _Lease(row, time.monotonic())
        if lease is None:
            return None
        try:
            if ctx.halted():
                return None
            return work(lease, ctx)
        except _Halted:
            return None
        except _LeaseLost:
            lease.released = True
            return self._done(row, Outcome.SKIPPED_LOCKED, "its refresh lease expired and another worker took it")
        except (ClientCredentialsRejected, SQLAlchemyError, DatabaseError):
            ctx.halt.set()
            raise
        except Exception as exc:
            log.debug("unexpected error on %s", row, exc_info=True)
            return self._done(row, Outcome.FAILED, f"unexpected {type(exc).__name__}")
        finally:
            if not lease.released:
                with self._transaction() as conn:
                    TokenRepository(conn).release_refresh(row.user_id, self.owner, token_type=row.token_type)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` at its first statement on SQLite), committed when the block succeeds."""
        with self._writers, write_transaction(self.engine) as conn:
            yield conn

    @contextmanager
    def _writing(self, lease: _Lease, *, validated: bool = False) -> Iterator[Connection]:
        """A write transaction that, when the block succeeds, also gives the lease back (and records a validation)."""
        row = lease.row
        with self._transaction() as conn:
            yield conn
            TokenRepository(conn).release_refresh(row.user_id, self.owner, token_type=row.token_type, validated=validated)
        lease.released = True

    def _send(self, lease: _Lease, ctx: _Pass, request: Callable[[], httpx.Response]) -> httpx.Response:
        """``request()`` once the rate limit allows, with the lease still held.

        A 429 saying when Twitch's bucket refills (``Retry-After``,
        ``Ratelimit-Reset``) pauses every request of this refresher until then,
        and the request is sent again (up to :data:`RATE_LIMIT_RETRIES` times);
        a 429 without them is answered like a 5xx.
        """
        for _attempt in range(RATE_LIMIT_RETRIES + 1):
            self._rate_limit.wait(ctx)
            if time.monotonic() - lease.taken > self.lease_ttl / 2:
                with self._transaction() as conn:
                    row = lease.row
                    if not TokenRepository(conn).claim_refresh(row.user_id, self.owner, self.lease_ttl, token_type=row.token_type):
                        raise _LeaseLost
                lease.taken = time.monotonic()
            response = request()
            pause = _rate_limit_reset(response)
            if pause is None:
                return response
            log.warning("Twitch rate limit reached: every request waits %.1fs", pause)
            self._rate_limit.pause(pause)
        return response

    def _read(self, row: _Row) -> dict[str, Any] | TokenResult:
        """The row's tokens as they are now, or the result that ends the work on them."""
        try:
            with read_connection(self.engine) as conn:
                tokens = TokenRepository(conn).get_tokens(row.user_id, token_type=row.token_type)
        except DecryptionError as exc:
            return self._done(row, Outcome.FAILED, str(exc))
        if tokens is None or tokens["needs_reauth"]:
            return self._done(row, Outcome.SKIPPED_FRESH, "removed or marked for reauth by another writer")
        return tokens

    def _claimed_tokens(self, lease: _Lease) -> dict[str, Any] | TokenResult:
        """The tokens as the claim read them (decrypted here, in the token's thread), else :meth:`_read`'s."""
        if lease.claimed is None:
            return self._read(lease.row)
        tokens = dict(lease.claimed)
        cipher = cipher_of(self.engine.dialect)
        try:
            for name in ("access_token", "refresh_token"):
                tokens[name] = Secret(cipher.decrypt(tokens.pop(f"{name}_encrypted")))
        except DecryptionError:
            return self._read(lease.row)  # its error names the row's key version
        return tokens

    def _refresh_due_token(self, lease: _Lease, ctx: _Pass) -> TokenResult:
        row = lease.row
        tokens = self._claimed_tokens(lease)
        if isinstance(tokens, TokenResult):
            return tokens
        if tokens["expires_at"] > utcnow() + timedelta(seconds=ctx.window):
            return self._done(row, Outcome.SKIPPED_FRESH, "already refreshed by another writer")
        failures = tokens["refresh_failures"]
        if failures:
            retry_at = tokens["updated_at"] + timedelta(seconds=self.backoff_delay(row.user_id, row.token_type, failures))
            wait_for = (retry_at - utcnow()).total_seconds()
            if wait_for > 0:
                return self._done(row, Outcome.BACKING_OFF, f"{failures} failure(s), next try in {wait_for:.0f}s")
        return self._exchange(lease, tokens, ctx, after_401=False)

    def _validate_token(self, lease: _Lease, ctx: _Pass) -> TokenResult:
        row = lease.row
        tokens = self._read(row)
        if isinstance(tokens, TokenResult):
            return tokens
        validated = tokens["last_validated"]
        if validated is not None and validated > utcnow() - timedelta(seconds=ctx.validate_interval):
            return self._done(row, Outcome.SKIPPED_FRESH, "already validated by another worker")
        headers = {"Authorization": f"OAuth {tokens['access_token']}"}
        try:
            response = self._send(lease, ctx, lambda: self._http.get(self.validate_url, headers=headers))
        except httpx.HTTPError as exc:
            return self._done(row, Outcome.VALIDATION_FAILED, f"validation: {type(exc).__name__}")
        if response.status_code == 200:
            with self._writing(lease, validated=True):
                pass
            return self._done(row, Outcome.VALIDATED, "Twitch accepted the access token")
        if response.status_code == 401:
            log.info("%s (user %d, %s token): validation answered 401, refreshing", row.login, row.user_id, row.token_type)
            return self._exchange(lease, tokens, ctx, after_401=True)
        return self._done(row, Outcome.VALIDATION_FAILED, f"validation: Twitch answered {response.status_code}")

    def _exchange(self, lease: _Lease, tokens: dict[str, Any], ctx: _Pass, after_401: bool) -> TokenResult:
        row = lease.row
        form = {"client_id": self.client_id, "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        if self._client_secret:
            form["client_secret"] = self._client_secret
        try:
            response = self._send(lease, ctx, lambda: self._http.post(self.token_url, data=form))
        except httpx.TimeoutException as exc:
            return self._failure(lease, tokens, ctx, f"timeout ({type(exc).__name__})", after_401)
        except httpx.HTTPError as exc:
            return self._failure(lease, tokens, ctx, f"connection error ({type(exc).__name__})", after_401)
        status = response.status_code
        if status == 200:
            try:
                access, refresh, expires_in, scopes = _parse_token_answer(response)
            except ValueError as exc:
                return self._failure(lease, tokens, ctx, f"malformed answer: {exc}", after_401)
            # Twitch may keep the refresh token; either way the new access token is stored.
            refresh = refresh or tokens["refresh_token"]
            try:
                with self._transaction() as conn:
                    TokenRepository(conn).store_tokens(
                        row.user_id,
                        access,
                        refresh,
                        expires_in,
                        scopes,  # None keeps the stored ones (the version check makes them the ones read)
                        token_type=row.token_type,
                        expected_version=tokens["version"],
                        release_lease=self.owner,
                    )
                lease.released = True
            except StaleTokens:
                return self._done(row, Outcome.STALE, "another writer stored newer tokens meanwhile; kept them")
            return self._done(row, Outcome.REFRESHED, f"expires in {expires_in}s")
        message = twitch_message(response, (tokens["refresh_token"], tokens["access_token"], self._client_secret))
        if status == 403 or (status in (400, 401) and "client" in message.lower()):
            raise ClientCredentialsRejected(
                f"Twitch refused the application's credentials ({status} {message}): "
                f"check {CLIENT_ID_ENV} and {CLIENT_SECRET_ENV}"
            )
        if status in (400, 401):
            return self._reauth(lease, tokens, f"Twitch answered {status} {message}".strip())
        return self._failure(lease, tokens, ctx, f"Twitch answered {status}", after_401)

    def _newer_tokens_stored(self, repo: TokenRepository, row: _Row, seen: dict[str, Any]) -> bool:
        """True if the row changed since ``seen`` was read (a bot stored new tokens): leave it alone."""
        current = repo.get_tokens(row.user_id, token_type=row.token_type)
        return current is None or current["version"] != seen["version"]

    def _reauth(self, lease: _Lease, seen: dict[str, Any], reason: str) -> TokenResult:
        row = lease.row
        with self._writing(lease) as conn:
            repo = TokenRepository(conn)
            if self._newer_tokens_stored(repo, row, seen):
                return self._done(row, Outcome.STALE, f"{reason}, but newer tokens were stored meanwhile; kept them")
            repo.mark_tokens_expired(row.user_id, token_type=row.token_type, revoked=True)
            AuditRepository(conn).log_event(
                "token_refresh_rejected",
                user_id=row.user_id,
                details={"token_type": row.token_type, "reason": reason},
                severity="error",
            )
        return self._done(row, Outcome.REAUTH, f"{reason}; marked for reauth")

    def _failure(self, lease: _Lease, seen: dict[str, Any], ctx: _Pass, reason: str, after_401: bool) -> TokenResult:
        row = lease.row
        with self._writing(lease) as conn:
            repo = TokenRepository(conn)
            if self._newer_tokens_stored(repo, row, seen):
                return self._done(row, Outcome.STALE, f"{reason}, but newer tokens were stored meanwhile; kept them")
            failures = repo.increment_refresh_failures(row.user_id, token_type=row.token_type)
            give_up = after_401 or failures >= ctx.max_failures
            if give_up:
                repo.mark_tokens_expired(row.user_id, token_type=row.token_type)
            AuditRepository(conn).log_event(
                "token_refresh_failed",
                user_id=row.user_id,
                details={"token_type": row.token_type, "reason": reason, "failures": failures, "needs_reauth": give_up},
                severity="error" if give_up else "warning",
            )
        if give_up:
            why = "the access token is invalid" if after_401 else f"{failures} failures"
            return self._done(row, Outcome.REAUTH, f"{reason}; {why}, marked for reauth")
        delay = self.backoff_delay(row.user_id, row.token_type, failures)
        return self._done(row, Outcome.FAILED, f"{reason}; failure {failures}/{ctx.max_failures}, next try in {delay:.0f}s")

    def _done(self, row: _Row, outcome: Outcome, detail: str) -> TokenResult:
        with self._counting:
            self.counters.add(outcome)
        if self.observer is not None:
            self.observer.outcome(outcome)
        level = {
            Outcome.REAUTH: logging.ERROR,
            Outcome.FAILED: logging.WARNING,
            Outcome.VALIDATION_FAILED: logging.WARNING,
            Outcome.STALE: logging.WARNING,
        }.get(outcome, logging.INFO)
        log.log(level, "%s %s (user %d, %s token): %s", outcome.value, row.login, row.user_id, row.token_type, detail)
        return TokenResult(row.user_id, row.login, row.token_type, outcome, detail)


def _rate_limit_reset(response: httpx.Response) -> float | None:
    """Seconds until Twitch's rate limit resets, for a 429 that says (capped at :data:`MAX_RATE_LIMIT_PAUSE`); else None.

    ``Retry-After`` is seconds or an HTTP date, ``Ratelimit-Reset`` a Unix
    time; with both, the later one.
    """
    if response.status_code != 429:
        return None
    waits = []
    retry_after = response.headers.get("Retry-After", "").strip()
    if retry_after:
        try:
            waits.append(float(retry_after))
        except ValueError:
            try:
                waits.append((parsedate_to_datetime(retry_after) - utcnow()).total_seconds())
            except (TypeError, ValueError):
                pass
    reset = response.headers.get("Ratelimit-Reset", "").strip()
    try:
        waits.append(float(reset) - time.time())
    except ValueError:
        pass
    waits = [w for w in waits if math.isfinite(w)]
    if not waits:
        return None
    return min(max(max(waits), 0.0), MAX_RATE_LIMIT_PAUSE)


def _parse_token_answer(response: httpx.Response) -> tuple[str, str | None, int, list[str] | None]:
    """The tokens of a successful refresh, every field checked.

    Without a usable access token there is nothing to store (``ValueError``).
    Everything else is repaired rather than refused, because Twitch has
    already spent the old refresh token: no refresh token means the old one
    stays (None), an ``expires_in`` out of range is clamped and a missing or
    absurd one becomes :data:`UNKNOWN_EXPIRES_IN`, and scopes that are not
    strings are ignored (the stored ones stay).
    """
    try:
        answer = response.json()
    except ValueError:
        raise ValueError("not JSON") from None
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    access = answer.get("access_token")
    if not isinstance(access, str) or not access.strip():
        raise ValueError("no access_token")
    refresh = answer.get("refresh_token")
    refresh = refresh if isinstance(refresh, str) and refresh.strip() else None
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, float) and math.isfinite(expires_in):
        expires_in = int(expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
        expires_in = UNKNOWN_EXPIRES_IN
    scope = answer.get("scope")
    if isinstance(scope, str):
        scopes: list[str] | None = scope.split()
    elif isinstance(scope, list) and all(isinstance(s, str) and s for s in scope):
        scopes = list(scope)
    else:
        scopes = None
    return access, refresh, clamp_expires_in(expires_in), scopes

