"""The refresh worker against a fake Twitch (token and validate endpoints) on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.crypto import TokenCipher, read_key_ring
from kissbot.engine import create_engine
from kissbot.errors import ClientCredentialsRejected, MissingClientCredentials, UserNotFound
from kissbot.fake_twitch import FakeTwitch
from kissbot.refresh import Outcome, TokenRefresher
from kissbot.repo import TokenRepository
from kissbot.types import utcnow

CLIENT_ID = "kissbot-client-id"
CLIENT_SECRET = "client-secret-DO-NOT-LOG"
WORKER = [sys.executable, "-c", "from kissbot.cli import cli; cli()", "refresh-worker"]
PROCESS_TIMEOUT = 120


@pytest.fixture
def twitch(fake_twitch: FakeTwitch) -> FakeTwitch:
    """kissbot's fake Twitch with this file's application, taking the made-up tokens the tests store."""
    fake_twitch.client_id, fake_twitch.client_secret = CLIENT_ID, CLIENT_SECRET
    fake_twitch.accept_unknown = True
    return fake_twitch


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()
    return port


def refresher(mgr: DatabaseManager, twitch: FakeTwitch, **kwargs: Any) -> TokenRefresher:
    return TokenRefresher(
        mgr, CLIENT_ID, CLIENT_SECRET, token_url=twitch.token_url, validate_url=twitch.validate_url, **kwargs
    )


def outcomes(results) -> list[tuple[int, str, Outcome]]:
    return [(r.user_id, r.token_type, r.outcome) for r in results]


def worker_env(twitch: FakeTwitch, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "TWITCH_CLIENT_ID": CLIENT_ID,
        "TWITCH_CLIENT_SECRET": CLIENT_SECRET,
        "KISSBOT_TWITCH_TOKEN_URL": twitch.token_url,
        "KISSBOT_TWITCH_VALIDATE_URL": twitch.validate_url,
        **extra,
    }


# --- refresh -------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", [["chat:read", "chat:edit"], "chat:read chat:edit"], ids=["scope-list", "scope-string"])
def test_a_due_token_is_refreshed_and_the_rotated_refresh_token_kept(mgr, bot, twitch, scope):
    twitch.answer_scope = scope
    old_refresh = "eyJfaWQmNzMtNGCJ9%6VFV5+LNrZ/FUj8oU12=="  # needs form-encoding
    mgr.store_tokens(bot, "old-access", old_refresh, 30, scopes=["chat:read"])
    fresh = mgr.create_user("42", "fresh_bot", is_bot=True)
    mgr.store_tokens(fresh, "fresh-access", "fresh-refresh", 14400)
    with refresher(mgr, twitch) as worker:
        results = worker.refresh_due()
    assert outcomes(results) == [(bot, "bot", Outcome.REFRESHED)]
    assert (results[0].login, results[0].detail) == ("serda_bot", "expires in 14400s")
    assert twitch.token_forms == [
        {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "grant_type": "refresh_token", "refresh_token": old_refresh}
    ]
    tokens = mgr.get_tokens(bot)
    assert [tokens["access_token"], tokens["refresh_token"]] == twitch.issued
    assert tokens["scopes"] == ["chat:read", "chat:edit"]
    assert (tokens["version"], tokens["refresh_failures"], tokens["status"]) == (2, 0, "valid")
    assert tokens["expires_at"] > utcnow() + timedelta(hours=3)
    assert mgr.get_tokens(fresh)["version"] == 1, "a token far from expiry is left alone"
    events = mgr.get_audit_log(event_type="tokens_refreshed")
    assert [(e["user_id"], e["details"]["token_type"]) for e in events] == [(bot, "bot")]
    assert worker.counters.as_dict() == {"refreshed": 1, "failed": 0, "reauth_needed": 0, "validated": 0}


def test_the_refresh_window_is_config_token_refresh_interval(mgr, bot, twitch):
    mgr.store_tokens(bot, "a", "r", 600)
    mgr.store_tokens(bot, "b", "s", 30, token_type="broadcaster")
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.refresh_due()) == [(bot, "broadcaster", Outcome.REFRESHED)]
        mgr.set_config("token_refresh_interval", 900)
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.REFRESHED)]
    assert [f["refresh_token"] for f in twitch.token_forms] == ["s", "r"]


@pytest.mark.parametrize("status", [400, 401])
def test_an_invalid_refresh_token_marks_reauth_after_one_try(mgr, bot, twitch, status):
    twitch.token_answer = (status, {"error": "Bad Request", "status": status, "message": "Invalid refresh token"})
    mgr.store_tokens(bot, "old-access", "old-refresh", 30)
    with refresher(mgr, twitch, backoff_base=0) as worker:
        [result] = worker.refresh_due()
        assert (result.outcome, result.detail) == (
            Outcome.REAUTH, f"Twitch answered {status} Invalid refresh token; marked for reauth"
        )
        assert worker.refresh_due() == [], "a token needing reauth is not retried"
        assert worker.counters.reauth_needed == 1
    assert len(twitch.token_forms) == 1
    tokens = mgr.get_tokens(bot)
    assert (tokens["needs_reauth"], tokens["status"], tokens["refresh_token"]) == (True, "revoked", "old-refresh")
    [event] = mgr.get_audit_log(event_type="token_refresh_rejected")
    assert (event["severity"], event["details"]["reason"]) == ("error", f"Twitch answered {status} Invalid refresh token")


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_back_off_count_and_reach_reauth_at_the_limit(mgr, bot, twitch, status):
    twitch.token_answer = (status, {"status": status, "message": "oops"})
    mgr.store_tokens(bot, "old-access", "old-refresh", 30)
    with refresher(mgr, twitch, backoff_base=3600) as slow:
        assert outcomes(slow.refresh_due()) == [(bot, "bot", Outcome.FAILED)]
        [waiting] = slow.refresh_due()
        assert waiting.outcome is Outcome.BACKING_OFF and waiting.detail.startswith("1 failure(s), next try in ")
    assert len(twitch.token_forms) == 1, "nothing is sent while backing off"
    assert mgr.get_tokens(bot)["refresh_failures"] == 1
    with refresher(mgr, twitch, backoff_base=0) as fast:
        [second] = fast.refresh_due()
        assert (second.outcome, second.detail) == (
            Outcome.FAILED, f"Twitch answered {status}; failure 2/3, next try in 0s"
        )
        [third] = fast.refresh_due()
        assert (third.outcome, third.detail) == (
            Outcome.REAUTH, f"Twitch answered {status}; 3 failures, marked for reauth"
        )
        assert fast.refresh_due() == []
        assert fast.counters.as_dict() == {"refreshed": 0, "failed": 1, "reauth_needed": 1, "validated": 0}
    assert len(twitch.token_forms) == 3
    tokens = mgr.get_tokens(bot)
    assert (tokens["refresh_failures"], tokens["needs_reauth"], tokens["status"]) == (3, True, "expired")
    failures = mgr.get_audit_log(event_type="token_refresh_failed")
    assert [(e["details"]["failures"], e["severity"]) for e in reversed(failures)] == [
        (1, "warning"), (2, "warning"), (3, "error")
    ]


def test_max_refresh_failures_comes_from_config(mgr, bot, twitch):
    mgr.set_config("max_refresh_failures", 1)
    twitch.token_answer = (500, {})
    mgr.store_tokens(bot, "a", "r", 30)
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.REAUTH)]


def test_a_success_resets_the_failure_count(mgr, bot, twitch):
    twitch.token_answer = (502, {})
    mgr.store_tokens(bot, "a", "r", 30)
    with refresher(mgr, twitch, backoff_base=0) as worker:
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.FAILED)]
        twitch.token_answer = None
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.REFRESHED)]
    assert mgr.get_tokens(bot)["refresh_failures"] == 0


def test_timeouts_and_connection_errors_are_transient(mgr, bot, twitch):
    mgr.store_tokens(bot, "a", "r", 30)
    twitch.latency = 2
    with refresher(mgr, twitch, timeout=0.2, backoff_base=0) as worker:
        [result] = worker.refresh_due()
    assert (result.outcome, result.detail) == (Outcome.FAILED, "timeout (ReadTimeout); failure 1/3, next try in 0s")
    port = closed_port()
    with TokenRefresher(mgr, CLIENT_ID, CLIENT_SECRET, token_url=f"http://127.0.0.1:{port}/t", backoff_base=0) as worker:
        [result] = worker.refresh_due()
    assert (result.outcome, result.detail) == (
        Outcome.FAILED, "connection error (ConnectError); failure 2/3, next try in 0s"
    )
    assert mgr.get_tokens(bot)["refresh_failures"] == 2


def test_rejected_app_credentials_stop_the_pass_and_touch_no_token(mgr, bot, twitch):
    twitch.token_answer = (403, {"status": 403, "message": "invalid client secret"})
    mgr.store_tokens(bot, "a", "r", 30)
    with refresher(mgr, twitch) as worker, pytest.raises(ClientCredentialsRejected) as caught:
        worker.refresh_due()
    assert str(caught.value) == (
        "Twitch refused the application's credentials (403 invalid client secret): "
        "check TWITCH_CLIENT_ID and TWITCH_CLIENT_SECRET"
    )
    tokens = mgr.get_tokens(bot)
    assert (tokens["needs_reauth"], tokens["refresh_failures"], tokens["version"]) == (False, 0, 1)
    with refresher(mgr, twitch) as worker:
        twitch.token_answer = None
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.REFRESHED)], "the lease was released"


def test_newer_tokens_stored_meanwhile_are_kept(mgr, bot, twitch):
    mgr.store_tokens(bot, "a", "r", 30)
    twitch.on_token_request = lambda: mgr.store_tokens(bot, "bot-own-access", "bot-own-refresh", 14400)
    with refresher(mgr, twitch) as worker:
        [result] = worker.refresh_due()
    assert (result.outcome, result.detail) == (Outcome.STALE, "another writer stored newer tokens meanwhile; kept them")
    tokens = mgr.get_tokens(bot)
    assert (tokens["access_token"], tokens["refresh_token"], tokens["version"]) == ("bot-own-access", "bot-own-refresh", 2)


@pytest.mark.parametrize("answer", [(400, {"message": "Invalid refresh token"}), (500, {})], ids=["400", "500"])
def test_a_failed_refresh_does_not_touch_tokens_stored_meanwhile(mgr, bot, twitch, answer):
    mgr.store_tokens(bot, "a", "r", 30)
    twitch.token_answer = answer
    twitch.on_token_request = lambda: mgr.store_tokens(bot, "reauthorised-access", "reauthorised-refresh", 14400)
    with refresher(mgr, twitch) as worker:
        [result] = worker.refresh_due()
    assert result.outcome is Outcome.STALE
    assert result.detail.endswith(", but newer tokens were stored meanwhile; kept them")
    tokens = mgr.get_tokens(bot)
    assert (tokens["access_token"], tokens["needs_reauth"], tokens["refresh_failures"]) == ("reauthorised-access", False, 0)


def test_a_token_that_does_not_decrypt_fails_alone_and_its_lease_is_released(mgr, twitch):
    good, bad = seed_due_tokens(mgr, 2)
    with mgr.engine.begin() as conn:
        conn.execute(text("UPDATE oauth_tokens SET refresh_token_encrypted = 'not-fernet' WHERE user_id = :u"), {"u": bad})
    with refresher(mgr, twitch) as worker:
        results = {r.user_id: r for r in worker.refresh_due()}
    assert (results[good].outcome, results[bad].outcome) == (Outcome.REFRESHED, Outcome.FAILED)
    assert results[bad].detail.startswith(f"Failed to decrypt tokens for user {bad} (key version 1")
    assert sum(twitch.refreshes_per_token().values()) == 1, "nothing was sent for the token that does not decrypt"
    with mgr.session() as s:
        assert [r["user_id"] for r in TokenRepository(s).claim_due("next", ttl=60)] == [bad], "its lease was given back"


def test_a_token_leased_by_another_worker_is_skipped(mgr, bot, twitch):
    mgr.store_tokens(bot, "a", "r", 30)
    with mgr.session() as s:
        assert TokenRepository(s).claim_refresh(bot, "other-host:1", ttl=60)
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.SKIPPED_LOCKED)]
    assert twitch.token_forms == []


# --- validation ----------------------------------------------------------------------------------


def test_validation_stores_the_time_and_waits_for_the_interval(mgr, bot, twitch):
    mgr.store_tokens(bot, "bot-access", "bot-refresh", 14400)
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.validate_due()) == [(bot, "bot", Outcome.VALIDATED)]
        assert worker.validate_due() == [], "validated less than an hour ago"
        assert worker.counters.validated == 1
    assert twitch.validate_headers == ["OAuth bot-access"]
    assert mgr.get_tokens(bot)["last_validated"] > utcnow() - timedelta(minutes=1)
    with refresher(mgr, twitch, validate_interval=0) as eager:
        assert outcomes(eager.validate_due()) == [(bot, "bot", Outcome.VALIDATED)]
    mgr.set_config("token_validate_interval", 0)
    with refresher(mgr, twitch) as configured:
        assert outcomes(configured.validate_due()) == [(bot, "bot", Outcome.VALIDATED)]


def test_due_tokens_are_left_to_the_refresh_and_failed_validations_retried(mgr, bot, twitch):
    mgr.store_tokens(bot, "expiring-access", "r", 30)
    mgr.store_tokens(bot, "broadcaster-access", "s", 14400, token_type="broadcaster")
    port = closed_port()
    with TokenRefresher(mgr, CLIENT_ID, CLIENT_SECRET, validate_url=f"http://127.0.0.1:{port}/v") as offline:
        [result] = offline.validate_due()
        assert (result.token_type, result.outcome, result.detail) == (
            "broadcaster", Outcome.VALIDATION_FAILED, "validation: ConnectError"
        )
        assert offline.counters.failed == 1
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.validate_due()) == [(bot, "broadcaster", Outcome.VALIDATED)]
    assert twitch.validate_headers == ["OAuth broadcaster-access"]
    tokens = mgr.get_tokens(bot, token_type="broadcaster")
    assert (tokens["refresh_failures"], tokens["needs_reauth"]) == (0, False)


def test_a_401_on_validation_triggers_a_refresh(mgr, bot, twitch):
    mgr.store_tokens(bot, "revoked-access", "bot-refresh", 14400)
    twitch.expire("revoked-access")
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.validate_due()) == [(bot, "bot", Outcome.REFRESHED)]
        assert [f["refresh_token"] for f in twitch.token_forms] == ["bot-refresh"]
        new_access = mgr.get_tokens(bot)["access_token"]
        assert new_access == twitch.issued[0]
        assert worker.validate_due() == [], "a token just refreshed counts as validated"
    assert twitch.validate_headers == ["OAuth revoked-access"]
    assert mgr.get_tokens(bot)["last_validated"] > utcnow() - timedelta(minutes=1)


@pytest.mark.parametrize("answer", [(500, {}), (400, {"status": 400, "message": "Invalid refresh token"})])
def test_a_failed_refresh_after_a_401_marks_reauth(mgr, bot, twitch, answer):
    mgr.store_tokens(bot, "revoked-access", "bot-refresh", 14400)
    twitch.expire("revoked-access")
    twitch.token_answer = answer
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.validate_due()) == [(bot, "bot", Outcome.REAUTH)]
        assert worker.validate_due() == []
    assert len(twitch.token_forms) == 1
    assert mgr.get_tokens(bot)["needs_reauth"] is True


# --- the run loop and the CLI --------------------------------------------------------------------


def test_run_stops_when_the_event_is_set(mgr, bot, twitch):
    mgr.store_tokens(bot, "a", "r", 30)
    stop = threading.Event()
    twitch.on_token_request = stop.set
    with refresher(mgr, twitch) as worker:
        counters = worker.run(stop, interval=3600)
    assert counters.as_dict() == {"refreshed": 1, "failed": 0, "reauth_needed": 0, "validated": 0}
    assert twitch.validate_headers == [], "stopped between two tokens"


def test_from_env_reads_the_credentials_and_endpoints(mgr, bot, twitch, monkeypatch):
    for name, value in worker_env(twitch).items():
        monkeypatch.setenv(name, value)
    mgr.store_tokens(bot, "a", "r", 30)
    with TokenRefresher.from_env(mgr) as worker:
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.REFRESHED)]
    assert twitch.token_forms[0]["client_secret"] == CLIENT_SECRET
    monkeypatch.delenv("TWITCH_CLIENT_ID")
    with pytest.raises(MissingClientCredentials, match="^no Twitch client id: set TWITCH_CLIENT_ID$"):
        TokenRefresher.from_env(mgr)


def test_a_public_client_refreshes_its_single_use_tokens_without_a_secret(mgr, bot, twitch, store_url, key_file):
    public = twitch.mint("serda_bot", "1209350837", ["chat:read"], single_use=True)
    mgr.store_tokens(bot, public.access_token, public.refresh_token, 30)
    args = ["refresh-worker", "--once", "--url", store_url, "--key-file", str(key_file)]
    result = CliRunner().invoke(cli, args, env=worker_env(twitch, TWITCH_CLIENT_SECRET=""))
    assert (result.exit_code, result.output) == (0, "refreshed=1 failed=0 reauth_needed=0 validated=0\n")
    [form] = twitch.token_forms
    assert "client_secret" not in form and form["refresh_token"] == public.refresh_token
    assert mgr.get_tokens(bot)["refresh_token"] == twitch.issued[1]
    confidential = twitch.mint("serda_bot", "1209350837", ["chat:read"])
    mgr.store_tokens(bot, confidential.access_token, confidential.refresh_token, 30)
    result = CliRunner().invoke(cli, args, env=worker_env(twitch, TWITCH_CLIENT_SECRET=""))
    assert (result.exit_code, result.output) == (
        1, "Error: Twitch refused the application's credentials (400 missing client secret): "
        "check TWITCH_CLIENT_ID and TWITCH_CLIENT_SECRET\n"
    )
    assert mgr.get_tokens(bot)["refresh_token"] == confidential.refresh_token, "nothing was touched"


def test_a_database_error_ends_only_the_current_pass(sqlite_url, key_file, twitch):
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        bot = mgr.create_user("1", "serda_bot", is_bot=True)
        mgr.store_tokens(bot, "a", "r", 30)
    engine = create_engine(sqlite_url, cipher=TokenCipher(read_key_ring(key_file)), busy_timeout_ms=50)
    db = sqlite_url.removeprefix("sqlite:///")
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    failures: list[str] = []

    class UnlockAfterTheFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("pass failed ("):
                failures.append(record.getMessage())
                locker.execute("ROLLBACK")

    stop = threading.Event()
    twitch.on_token_request = stop.set
    handler = UnlockAfterTheFailure()
    logging.getLogger("kissbot.refresh").addHandler(handler)
    try:
        with TokenRefresher(engine, CLIENT_ID, CLIENT_SECRET, token_url=twitch.token_url) as worker:
            counters = worker.run(stop, interval=0)
    finally:
        logging.getLogger("kissbot.refresh").removeHandler(handler)
        locker.close()
        engine.dispose()
    [failure] = failures
    assert failure.startswith(f"pass failed (DatabaseBusy: database {db} is locked: another connection held it for ")
    assert failure.endswith("); next pass in 0s")
    assert counters.refreshed == 1 and len(twitch.token_forms) == 1, "the next pass refreshed the token"


def test_the_refresher_repr_holds_no_secret(mgr, twitch):
    with refresher(mgr, twitch) as worker:
        assert CLIENT_SECRET not in repr(worker) and CLIENT_ID in repr(worker)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TWITCH_CLIENT_ID": None, "TWITCH_CLIENT_SECRET": "s"}, "no Twitch client id: set TWITCH_CLIENT_ID or pass --client-id"),
    ],
)
def test_the_worker_needs_client_credentials_and_writes_nothing(tmp_path, env, message):
    db = tmp_path / "kissbot.db"
    result = CliRunner().invoke(cli, ["refresh-worker", "--once", "--db", str(db)], env=env)
    assert (result.exit_code, result.output) == (1, f"Error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_the_worker_creates_no_database(tmp_path, twitch):
    db = tmp_path / "typo.db"
    args = ["refresh-worker", "--once", "--db", str(db), "--key-file", str(tmp_path / "k.key")]
    result = CliRunner().invoke(cli, args, env=worker_env(twitch))
    assert (result.exit_code, result.output) == (1, f"Error: database {db} does not exist; create it with kissbot init-db\n")
    assert list(tmp_path.iterdir()) == []


def test_the_worker_reports_rejected_app_credentials_in_one_line(mgr, bot, twitch, store_url, key_file):
    twitch.token_answer = (403, {"status": 403, "message": "invalid client secret"})
    mgr.store_tokens(bot, "a", "r", 30)
    args = ["refresh-worker", "--once", "--url", store_url, "--key-file", str(key_file)]
    result = CliRunner().invoke(cli, [*args, "--client-secret", CLIENT_SECRET], env=worker_env(twitch))
    assert result.exit_code == 1
    assert result.output == (
        "Error: Twitch refused the application's credentials (403 invalid client secret): "
        "check TWITCH_CLIENT_ID and TWITCH_CLIENT_SECRET\n"
    )


def seed_due_tokens(mgr: DatabaseManager, count: int) -> dict[int, str]:
    refresh_tokens = {}
    for i in range(count):
        user = mgr.create_user(str(1000 + i), f"bot_{i:02d}", is_bot=True)
        refresh_tokens[user] = f"old-refresh-{i}-{uuid.uuid4().hex}"
        mgr.store_tokens(user, f"old-access-{i}-{uuid.uuid4().hex}", refresh_tokens[user], 30)
    return refresh_tokens


@pytest.mark.slow
def test_two_worker_processes_refresh_each_due_token_exactly_once(mgr, twitch, store_url, key_file):
    refresh_tokens = seed_due_tokens(mgr, 10)
    twitch.hold_first(2)
    twitch.latency = 0.05
    args = [*WORKER, "--once", "--url", store_url, "--key-file", str(key_file)]
    workers = [
        subprocess.Popen(args, env=worker_env(twitch), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=PROCESS_TIMEOUT) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert not twitch.gate.broken, "both workers were refreshing at the same time"
    assert twitch.refreshes_per_token() == Counter(refresh_tokens.values()), "one refresh per token"
    issued = set(twitch.issued)
    for user in refresh_tokens:
        tokens = mgr.get_tokens(user)
        assert tokens["version"] == 2 and tokens["refresh_token"] in issued
    refreshed = [int(out.split()[0].removeprefix("refreshed=")) for out, _ in outputs]
    assert sum(refreshed) == 10, outputs
    assert twitch.validate_headers == [], "a token just refreshed is not validated again in the same pass"


def test_the_worker_log_holds_no_secret(mgr, bot, twitch, store_url, key_file):
    refresh_tokens = seed_due_tokens(mgr, 2)
    mgr.store_tokens(bot, "revoked-access-secret", "bot-refresh-secret", 14400)
    twitch.expire("revoked-access-secret")
    secrets = [CLIENT_SECRET, "revoked-access-secret", "bot-refresh-secret", *refresh_tokens.values()]
    secrets += [mgr.get_tokens(user)["access_token"] for user in refresh_tokens]
    args = [*WORKER, "--once", "-vv", "--url", store_url, "--key-file", str(key_file)]
    done = subprocess.run(args, env=worker_env(twitch), capture_output=True, text=True, timeout=PROCESS_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "refreshed=3 failed=0 reauth_needed=0 validated=0\n"
    secrets += twitch.issued
    assert len(secrets) == 1 + 2 + 2 + 2 + 6
    assert "refreshed bot_00 (user " in done.stderr and "validation answered 401, refreshing" in done.stderr
    for secret in secrets:
        assert secret not in done.stderr and secret not in done.stdout
    assert "kissbot.sql: UPDATE oauth_tokens" in done.stderr, "-vv logs the SQL statements too"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_running_worker_cleanly(mgr, bot, twitch, store_url, key_file, sig):
    mgr.store_tokens(bot, "a", "r", 30)
    args = [*WORKER, "--interval", "3600", "-v", "--url", store_url, "--key-file", str(key_file)]
    worker = subprocess.Popen(args, env=worker_env(twitch), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while mgr.get_tokens(bot)["last_validated"] is None:
            assert worker.poll() is None, worker.communicate()
            assert time.monotonic() < deadline, "the worker did not finish its first pass"
            time.sleep(0.05)
        worker.send_signal(sig)
        out, err = worker.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, err
    assert out == "refreshed=1 failed=0 reauth_needed=0 validated=0\n"
    assert "stopped: refreshed=1 failed=0 reauth_needed=0 validated=0" in err
    assert "Traceback" not in err


def test_record_validation_needs_the_token_row(mgr, bot):
    with pytest.raises(UserNotFound, match=f"user {bot} has no broadcaster tokens"), mgr.session() as s:
        TokenRepository(s).record_validation(bot, token_type="broadcaster")


# --- hostile answers (issue 14, items 4 and 5) ---------------------------------------------------


@pytest.mark.parametrize(
    "fields, stored_refresh",
    [
        ({"expires_in": 10**15}, "new"),
        ({"expires_in": -5}, "new"),
        ({"expires_in": "soon"}, "new"),
        ({"expires_in": 1e400}, "new"),
        ({"refresh_token": None}, "old"),
        ({"scope": [1, None]}, "new"),
    ],
    ids=["huge-expires_in", "negative-expires_in", "text-expires_in", "inf-expires_in", "no-refresh", "bad-scopes"],
)
def test_an_absurd_successful_answer_still_stores_the_new_tokens(mgr, bot, twitch, fields, stored_refresh):
    access, refresh = f"new-access-{uuid.uuid4().hex}", f"new-refresh-{uuid.uuid4().hex}"
    answer = {"access_token": access, "refresh_token": refresh, "expires_in": 14400, "scope": ["chat:read"], **fields}
    twitch.token_answer = (200, {k: v for k, v in answer.items() if v is not None})
    mgr.store_tokens(bot, "old-access", "old-refresh-token", 30, scopes=["chat:edit"])
    with refresher(mgr, twitch) as worker:
        assert outcomes(worker.refresh_due()) == [(bot, "bot", Outcome.REFRESHED)]
    tokens = mgr.get_tokens(bot)
    assert tokens["access_token"] == access
    assert tokens["refresh_token"] == (refresh if stored_refresh == "new" else "old-refresh-token")
    assert utcnow() < tokens["expires_at"] <= utcnow() + timedelta(days=367)
    assert tokens["scopes"] == (["chat:edit"] if "scope" in fields else ["chat:read"])


def test_run_survives_an_unexpected_error_on_one_token_and_counts_it(mgr, bot, twitch):
    import httpx

    other = mgr.create_user("42", "other_bot", is_bot=True)
    mgr.store_tokens(bot, "a-access", "boom-refresh", 10)
    mgr.store_tokens(other, "b-access", "fine-refresh", 20)
    stop = threading.Event()

    def explode(response: httpx.Response) -> None:
        response.read()
        if b"boom-refresh" in response.request.content:
            raise RuntimeError("a bug in one token's path")
        stop.set()

    client = httpx.Client(event_hooks={"response": [explode]})
    with client, refresher(mgr, twitch, http=client) as worker:
        counters = worker.run(stop, interval=0.01)
    assert counters.as_dict() == {"refreshed": 1, "failed": 1, "reauth_needed": 0, "validated": 0}
    assert mgr.get_tokens(other)["refresh_token"] in twitch.issued


def test_twitch_error_text_echoing_the_token_leaves_no_plaintext_anywhere(mgr, bot, twitch, store_url, key_file, tmp_path):
    from urllib.parse import quote_plus

    refresh = "rt0" + uuid.uuid4().hex + "x/+=Z"
    access = "at0" + uuid.uuid4().hex
    secrets = [refresh, quote_plus(refresh), access, CLIENT_SECRET]
    twitch.token_answer = (400, {
        "status": 400,
        "error": "Bad Request",
        "message": f"Invalid refresh token {refresh} ({quote_plus(refresh)}) for {access}",
    })
    mgr.store_tokens(bot, access, refresh, 30)
    args = ["refresh-worker", "--once", "-v", "--url", store_url, "--key-file", str(key_file)]
    result = CliRunner().invoke(cli, args, env=worker_env(twitch))
    assert result.exit_code == 0, result.output
    assert "reauth" in result.stderr
    [event] = mgr.get_audit_log(event_type="token_refresh_rejected")
    assert event["details"]["reason"].startswith("Twitch answered 400 Invalid refresh token rt0")
    texts = {"output": result.output, "audit": json.dumps(mgr.get_audit_log(limit=1000), default=str)}
    if store_url.startswith("sqlite"):
        backup = tmp_path / "copy.db"
        assert CliRunner().invoke(cli, ["backup", str(backup), "--url", store_url, "--key-file", str(key_file)]).exit_code == 0
        texts.update({os.fspath(p): p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()})
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, (where, secret)
