"""The refresh worker at fleet scale: many tokens at once, processes splitting the work, Twitch's rate limit."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest
from click.testing import CliRunner

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.errors import ValidationError
from kissbot.fake_twitch import FakeTwitch
from kissbot.refresh import MAX_CONCURRENCY, Outcome
from test_refresh import (  # noqa: F401
    PROCESS_TIMEOUT, WORKER, closed_port, outcomes, refresher, seed_due_tokens, twitch, worker_env,
)


def test_one_worker_refreshes_many_tokens_at_once_and_records_them_validated(mgr, twitch):
    refresh_tokens = seed_due_tokens(mgr, 12)
    twitch.hold_first(8)  # the first 8 requests wait for each other: they must be in flight together
    with refresher(mgr, twitch, concurrency=8) as worker:
        results = worker.refresh_due()
        assert worker.validate_due() == [], "a token just refreshed counts as validated"
    assert not twitch.gate.broken, "8 refreshes were in flight at once"
    assert sorted(outcomes(results)) == [(user, "bot", Outcome.REFRESHED) for user in sorted(refresh_tokens)]
    assert twitch.refreshes_per_token() == Counter(refresh_tokens.values())
    assert twitch.validate_headers == []
    for user in refresh_tokens:
        tokens = mgr.get_tokens(user)
        assert tokens["version"] == 2 and tokens["last_validated"] is not None
    assert len(mgr.get_audit_log(event_type="tokens_refreshed", limit=100)) == 12
    with mgr.session() as s:
        from kissbot.repo import TokenRepository

        assert TokenRepository(s).claim_due("anyone", ttl=60, buffer_minutes=10**6) != [], "every lease was released"


def test_the_worker_reuses_one_connection_per_request_in_flight(mgr, twitch):
    refresh_tokens = seed_due_tokens(mgr, 40)
    with refresher(mgr, twitch, concurrency=4) as worker:
        results = worker.refresh_due()
        assert [r.outcome for r in results] == [Outcome.REFRESHED] * 40
        assert worker.validate_due() == []
    assert twitch.refreshes_per_token() == Counter(refresh_tokens.values())
    assert 1 <= twitch.connections <= 4, "keep-alive connections are reused: at most one per request in flight"


def test_a_proxy_from_the_environment_still_carries_the_requests(mgr, twitch, monkeypatch):
    (user,) = seed_due_tokens(mgr, 1)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    with refresher(mgr, twitch, concurrency=4) as worker:
        [result] = worker.refresh_due()
    assert (result.outcome, result.detail.split(";")[0]) == (Outcome.FAILED, "connection error (ConnectError)")
    assert twitch.requests == Counter(), "the request went to the (absent) proxy, not straight to Twitch"
    monkeypatch.delenv("HTTP_PROXY")
    with refresher(mgr, twitch, concurrency=4, backoff_base=0) as worker:
        assert outcomes(worker.refresh_due()) == [(user, "bot", Outcome.REFRESHED)]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_worker_processes_split_the_due_tokens_and_refresh_each_once(mgr, twitch, store_url, key_file, processes):
    refresh_tokens = seed_due_tokens(mgr, 40)
    twitch.latency = 0.02
    args = [*WORKER, "--once", "--concurrency", "4", "--url", store_url, "--key-file", str(key_file)]
    workers = [
        subprocess.Popen(args, env=worker_env(twitch), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    outputs = [w.communicate(timeout=PROCESS_TIMEOUT) for w in workers]
    assert [w.returncode for w in workers] == [0] * processes, outputs
    assert twitch.refreshes_per_token() == Counter(refresh_tokens.values()), "one refresh per token, counted at Twitch"
    assert twitch.requests["/oauth2/token"] == 40
    refreshed = [int(out.split()[0].removeprefix("refreshed=")) for out, _ in outputs]
    assert sum(refreshed) == 40, outputs
    issued = set(twitch.issued)
    for user in refresh_tokens:
        tokens = mgr.get_tokens(user)
        assert tokens["version"] == 2 and tokens["refresh_token"] in issued


def test_a_429_pauses_every_request_until_the_limit_resets(mgr, twitch: FakeTwitch):
    refresh_tokens = seed_due_tokens(mgr, 12)
    twitch.latency = 0.05
    twitch.rate_limit(requests=1, reset_in=2)  # Retry-After: 2, Ratelimit-Reset: now + 2
    with refresher(mgr, twitch, concurrency=4) as worker:
        results = worker.refresh_due()
    assert [r.outcome for r in results] == [Outcome.REFRESHED] * 12, "the rate-limited token was sent again"
    assert worker.counters.failed == 0
    assert twitch.refreshes_per_token() == Counter(refresh_tokens.values())
    [limited] = [e for e in twitch.exchanges if e.status == 429]
    later = sorted(e.arrived - limited.answered for e in twitch.exchanges if e.arrived > limited.answered)
    racing = [t for t in later if t < 0.5]  # sent by other threads before the 429 reached the worker
    assert len(racing) <= 3, later
    assert all(t >= 1.9 for t in later[len(racing):]), f"a request was sent during the pause: {later}"
    assert len(later) >= 12 - 4, "the pause held back the rest of the pass"


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "abc", str(MAX_CONCURRENCY + 1), ""])
def test_a_bad_concurrency_is_one_line_and_exit_1_with_nothing_written(tmp_path, twitch, value):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    with DatabaseManager(db, key_file) as mgr:
        seed_due_tokens(mgr, 1)
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    args = ["refresh-worker", "--once", "--concurrency", value, "--db", str(db), "--key-file", str(key_file)]
    result = CliRunner().invoke(cli, args, env=worker_env(twitch))
    assert (result.exit_code, result.output) == (
        1, f"Error: --concurrency must be a whole number from 1 to {MAX_CONCURRENCY}, not {value!r}\n"
    )
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert twitch.requests == Counter()


def test_the_library_refuses_a_bad_concurrency(mgr, twitch):
    for bad in (0, MAX_CONCURRENCY + 1, 2.5, None):
        with pytest.raises(ValidationError, match="^concurrency must be"):
            refresher(mgr, twitch, concurrency=bad)
