"""``kissbot metrics``: the exposition matches the store, on SQLite and PostgreSQL, and holds no secret.

The acceptance test at the end scrapes ``kissbot metrics serve`` with a real
Prometheus (Debian's ``prometheus`` package; with ``CI`` set it must be there)
and evaluates every dashboard panel and alerting rule shipped in the repo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from kissbot import DatabaseManager, __version__
from kissbot.cli import cli
from kissbot.engine import sqlite_path, to_url
from kissbot.migrations import HEAD
from kissbot.models import instances, oauth_tokens
from kissbot.types import utcnow

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "dashboards" / "kissbot.json"
RULES = REPO / "rules" / "kissbot.yml"
ACCESS = "oauth-ACCESS-7f3a9c1e5b2d4e6f8a0b1c2d"
REFRESH = "REFRESH-9e8d7c6b5a4f3e2d1c0b9a8f7e6d"
SILENT_FOR = 3600


def populate(mgr: DatabaseManager) -> dict[str, int]:
    """A store whose metrics are known: every token state, instance status and alert condition."""
    bot = mgr.create_user("1", "serda_bot", is_bot=True)
    chan_a = mgr.create_user("2", "chan_a")
    chan_b = mgr.create_user("3", "chan_b")
    chan_c = mgr.create_user("4", "chan_c")
    mgr.store_tokens(bot, ACCESS, REFRESH, expires_in=14400)                                    # valid
    mgr.store_tokens(chan_a, ACCESS + "a", REFRESH + "a", expires_in=30, token_type="broadcaster")  # valid, due
    mgr.store_tokens(chan_b, ACCESS + "b", REFRESH + "b", expires_in=14400)                     # expired below
    mgr.store_tokens(chan_c, ACCESS + "c", REFRESH + "c", expires_in=14400, token_type="broadcaster")
    mgr.mark_tokens_expired(chan_c, token_type="broadcaster")                                   # needs_reauth
    mgr.increment_refresh_failures(bot)
    mgr.increment_refresh_failures(bot)
    silent = mgr.register_instance("chan_a", "serda_bot", 101)
    mgr.register_instance("chan_b", "serda_bot", 102)
    crashed = mgr.register_instance("chan_c", "serda_bot", 103)
    mgr.stop_instance(crashed, crash=True)
    mgr.log_event("token_refresh_failed", user_id=bot, details={"reason": "timeout"}, severity="warning")
    mgr.log_event("token_refresh_failed", user_id=bot, details={"reason": "timeout"}, severity="warning")
    with mgr.engine.begin() as conn:
        conn.execute(
            update(oauth_tokens).where(oauth_tokens.c.user_id == chan_b).values(expires_at=utcnow() - timedelta(minutes=10))
        )
        conn.execute(
            update(instances).where(instances.c.id == silent).values(last_heartbeat=utcnow() - timedelta(seconds=SILENT_FOR))
        )
    return {"bot": bot}


EXPECTED = {
    ("kissbot_tokens", (("state", "valid"), ("token_type", "bot"))): 1,
    ("kissbot_tokens", (("state", "expired"), ("token_type", "bot"))): 1,
    ("kissbot_tokens", (("state", "needs_reauth"), ("token_type", "bot"))): 0,
    ("kissbot_tokens", (("state", "valid"), ("token_type", "broadcaster"))): 1,
    ("kissbot_tokens", (("state", "expired"), ("token_type", "broadcaster"))): 0,
    ("kissbot_tokens", (("state", "needs_reauth"), ("token_type", "broadcaster"))): 1,
    ("kissbot_tokens_expiring", (("token_type", "bot"),)): 1,
    ("kissbot_tokens_expiring", (("token_type", "broadcaster"),)): 1,
    ("kissbot_token_refresh_failures", (("token_type", "bot"),)): 2,
    ("kissbot_token_refresh_failures", (("token_type", "broadcaster"),)): 0,
    ("kissbot_token_rows", (("key_version", "1"),)): 4,
    ("kissbot_key_primary_version", ()): 1,
    ("kissbot_token_refresh_window_seconds", ()): 60,
    ("kissbot_health_check_interval_seconds", ()): 30,
    ("kissbot_audit_retention_seconds", ()): 30 * 86400,
    ("kissbot_instances", (("status", "running"),)): 2,
    ("kissbot_instances", (("status", "crashed"),)): 1,
    ("kissbot_instances", (("status", "stopped"),)): 0,
    ("kissbot_instances", (("status", "disabled"),)): 0,
    ("kissbot_instance_crashes", (("status", "crashed"),)): 1,
    ("kissbot_instance_crashes", (("status", "running"),)): 0,
    ("kissbot_audit_events", (("event_type", "token_refresh_failed"),)): 2,
    ("kissbot_audit_events", (("event_type", "user_created"),)): 4,
    ("kissbot_audit_events", (("event_type", "tokens_created"),)): 4,
    ("kissbot_audit_events", (("event_type", "tokens_expired"),)): 1,
    ("kissbot_audit_events", (("event_type", "instance_started"),)): 3,
    ("kissbot_store_up", ()): 1,
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def store_args(url: str, key_file: Path) -> list[str]:
    path = sqlite_path(to_url(url))
    return ["--db", str(path), "--key-file", str(key_file)] if path else ["--url", url, "--key-file", str(key_file)]


def test_metrics_match_the_store(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        populate(mgr)
    before = time.time()
    result = CliRunner().invoke(cli, ["metrics", *store_args(store_url, key_file)])
    assert result.exit_code == 0, result.output
    got = samples(result.output)
    assert {k: got.get(k) for k in EXPECTED} == EXPECTED
    assert got[("kissbot_build_info", (("schema_revision", HEAD), ("version", __version__)))] == 1
    heartbeat = {labels: v for (name, labels), v in got.items() if name == "kissbot_instance_heartbeat_age_seconds"}
    assert set(heartbeat) == {(("channel", "chan_a"),), (("channel", "chan_b"),)}
    assert SILENT_FOR <= heartbeat[(("channel", "chan_a"),)] < SILENT_FOR + 300
    assert 0 <= heartbeat[(("channel", "chan_b"),)] < 300
    # The soonest usable expiry is chan_b's lapsed token, ten minutes ago.
    soonest = got[("kissbot_token_next_expiry_timestamp_seconds", ())]
    assert before - 600 - 300 < soonest <= before - 600 + 1
    assert got[("kissbot_database_size_bytes", ())] > 0


def test_metrics_print_no_secret(sqlite_url, key_file, tmp_path):
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        populate(mgr)
        with mgr.engine.connect() as conn:
            stored = [
                v for row in conn.exec_driver_sql(
                    "SELECT access_token_encrypted, refresh_token_encrypted FROM oauth_tokens"
                ) for v in row
            ] + [
                v for (v,) in conn.exec_driver_sql("SELECT value FROM config WHERE key LIKE 'key_fingerprint%'")
            ]
    key = key_file.read_text().strip()
    result = CliRunner().invoke(cli, ["metrics", *store_args(sqlite_url, key_file)])
    assert result.exit_code == 0
    for secret in [ACCESS, REFRESH, ACCESS[:12], REFRESH[:12], key, key[:12], *stored, *(s[:16] for s in stored)]:
        assert secret not in result.output
    assert stored and "fingerprint" not in result.output


def test_metrics_of_a_missing_database_is_one_line_and_creates_nothing(tmp_path):
    db = tmp_path / "nope.db"
    result = CliRunner().invoke(cli, ["metrics", "--db", str(db)])
    assert (result.exit_code, result.output) == (1, f"Error: database {db} does not exist; create it with kissbot init-db\n")
    assert list(tmp_path.iterdir()) == []


def test_metrics_leave_the_store_byte_identical(sqlite_url, key_file, tmp_path):
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        populate(mgr)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = CliRunner().invoke(cli, ["metrics", *store_args(sqlite_url, key_file)])
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_serve_on_a_taken_port_is_one_line(sqlite_url, key_file):
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        populate(mgr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["metrics", "serve", "--port", str(port), *store_args(sqlite_url, key_file)])
    assert (result.exit_code, result.output) == (1, f"Error: cannot listen on 127.0.0.1:{port}: Address already in use\n")


def test_a_store_that_went_away_answers_store_up_0(sqlite_url, key_file, caplog):
    from kissbot.metrics import open_engine, render, store_registry

    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        populate(mgr)
    path = sqlite_path(to_url(sqlite_url))
    engine = open_engine(path)
    registry = store_registry(engine)
    assert samples(render(registry))[("kissbot_store_up", ())] == 1
    path.rename(path.with_name("moved.db"))
    got = samples(render(registry))
    engine.dispose()
    assert got[("kissbot_store_up", ())] == 0
    assert {name for name, _ in got} == {"kissbot_build_info", "kissbot_store_up"}
    assert "metrics: cannot read the store: unable to open database file" in caplog.text


def test_refresh_metrics_count_every_outcome_and_time_twitch(mgr, fake_twitch):
    from kissbot.metrics import RefreshMetrics, render
    from kissbot.refresh import TokenRefresher

    fake_twitch.accept_unknown = True
    for n in range(3):
        mgr.store_tokens(mgr.create_user(str(10 + n), f"bot_{n}", is_bot=True), f"a{n}", f"r{n}", expires_in=30)
    answers = iter([None, (503, {"status": 503, "message": "unavailable"}), (400, {"status": 400, "message": "Invalid refresh token"})])
    fake_twitch.on_token_request = lambda: setattr(fake_twitch, "token_answer", next(answers, None))
    metrics = RefreshMetrics()
    with TokenRefresher(
        mgr, fake_twitch.client_id, "secret", token_url=fake_twitch.token_url, validate_url=fake_twitch.validate_url,
        backoff_base=3600, validate_interval=0, observer=metrics,
    ) as worker:
        results = worker.cycle() + worker.refresh_due()
    got = samples(render(metrics.registry))
    outcomes = Counter(r.outcome.value for r in results)
    assert outcomes == {"refreshed": 1, "failed": 1, "reauth": 1, "validated": 1, "backing_off": 1}
    assert {k: got[k] for k in got if k[0].endswith("_total") and "refresh_worker" in k[0]} == {
        ("kissbot_refresh_worker_refreshes_total", (("outcome", "refreshed"),)): 1,
        ("kissbot_refresh_worker_refreshes_total", (("outcome", "failed"),)): 1,
        ("kissbot_refresh_worker_refreshes_total", (("outcome", "reauth"),)): 1,
        ("kissbot_refresh_worker_refreshes_total", (("outcome", "stale"),)): 0,
        ("kissbot_refresh_worker_validations_total", (("outcome", "validated"),)): 1,
        ("kissbot_refresh_worker_validations_total", (("outcome", "failed"),)): 0,
        ("kissbot_refresh_worker_skips_total", (("reason", "locked"),)): 0,
        ("kissbot_refresh_worker_skips_total", (("reason", "fresh"),)): 0,
        ("kissbot_refresh_worker_skips_total", (("reason", "backing_off"),)): 1,
        ("kissbot_refresh_worker_backoffs_total", ()): 1,
    }
    assert got[("kissbot_refresh_worker_twitch_request_duration_seconds_count", (("endpoint", "token"),))] == len(
        fake_twitch.token_forms
    )
    assert got[("kissbot_refresh_worker_twitch_request_duration_seconds_count", (("endpoint", "validate"),))] == len(
        fake_twitch.validate_headers
    )
    assert got[("kissbot_refresh_worker_twitch_request_duration_seconds_sum", (("endpoint", "token"),))] > 0


def test_refresh_worker_metrics_on_a_taken_port_is_one_line(sqlite_url, key_file, monkeypatch):
    monkeypatch.setenv("TWITCH_CLIENT_ID", "client-id")
    monkeypatch.setenv("TWITCH_CLIENT_SECRET", "client-secret")
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        populate(mgr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["refresh-worker", "--once", "--metrics-port", str(port), *store_args(sqlite_url, key_file)]
        )
    assert (result.exit_code, result.output) == (1, f"Error: cannot listen on 127.0.0.1:{port}: Address already in use\n")


def test_label_values_from_the_store_are_bounded(sqlite_url, key_file):
    with DatabaseManager(url=sqlite_url, key_file=key_file) as mgr:
        populate(mgr)
        mgr.log_event('weird "event" with spaces and a token ' + ACCESS)
        for n in range(60):
            mgr.log_event(f"bulk_event_{n:02d}")
        rows = mgr.get_stats()["audit_log_count"]
    result = CliRunner().invoke(cli, ["metrics", "--db", sqlite_path(to_url(sqlite_url)), "--key-file", str(key_file)])
    got = samples(result.output)
    event_types = {dict(labels)["event_type"] for name, labels in got if name == "kissbot_audit_events"}
    assert len(event_types) == 51 and "other" in event_types
    assert ACCESS not in result.output
    assert sum(v for (name, _), v in got.items() if name == "kissbot_audit_events") == rows


# --- a real Prometheus -----------------------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def query(base: str, expr: str) -> list[dict]:
    answer = get_json(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    return [e.replace("$__rate_interval", "1m") for e in exprs]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CI"),
    reason="Prometheus is not installed (apt-get install prometheus; .ci/run installs it)",
)
def start_serving(command: list[str], what: str, processes: list, log: Path, **popen) -> str:
    """Start a kissbot command that serves metrics; return its host:port (it says so on stderr, into ``log``)."""
    with open(log, "w") as stderr:
        processes.append(subprocess.Popen(command, stderr=stderr, **popen))
    first = re.compile(rf"\AServing {what} on http://127\.0\.0\.1:(\d+)/metrics\n")
    match = wait_for(f"{what} to listen", lambda: first.match(log.read_text()))
    return f"127.0.0.1:{match[1]}"


def busy_refresh_worker(tmp_path: Path, twitch, processes: list) -> str:
    """A refresh worker (with --metrics-port) that refreshes two tokens every second, half of the requests failing."""
    db, key = tmp_path / "worker.db", tmp_path / "worker.key"
    with DatabaseManager(db, key_file=key) as mgr:
        mgr.set_config("max_refresh_failures", 1000)
        for n in range(2):
            mgr.store_tokens(mgr.create_user(str(50 + n), f"worker_bot_{n}", is_bot=True), f"a{n}", f"r{n}", 30)
    twitch.accept_unknown, twitch.expires_in = True, 30  # refreshed tokens are due again at once
    flaky = iter(range(10**9))
    twitch.on_token_request = lambda: setattr(
        twitch, "token_answer", (503, {"status": 503, "message": "unavailable"}) if next(flaky) % 2 else None
    )
    kissbot = Path(sys.executable).with_name("kissbot")
    env = {**os.environ, **twitch.env(), "TWITCH_CLIENT_SECRET": "worker-secret"}
    return start_serving(
        [str(kissbot), "refresh-worker", "--db", str(db), "--key-file", str(key), "--interval", "1",
         "--backoff-base", "0", "--validate-interval", "0", "--metrics-port", "0"],
        "refresh worker metrics", processes, tmp_path / "worker.log", env=env,
    )


def test_real_prometheus_scrapes_every_metric_panel_and_rule(tmp_path, key_file, processes, fake_twitch):
    assert PROMETHEUS and PROMTOOL, "CI must install Debian's prometheus package (.ci/run does)"
    db = tmp_path / "kissbot.db"
    with DatabaseManager(db, key_file=key_file) as mgr:
        populate(mgr)
    backup = CliRunner().invoke(cli, ["backup", "--db", str(db), "--key-file", str(key_file)])
    assert backup.exit_code == 0, backup.output
    (backup_file,) = tmp_path.glob("kissbot.db.backup_*")

    kissbot = Path(sys.executable).with_name("kissbot")
    target = start_serving(
        [str(kissbot), "metrics", "serve", "--db", str(db), "--port", "0"], "kissbot metrics", processes,
        tmp_path / "exporter.log",
    )
    exporter = processes[-1]
    worker = busy_refresh_worker(tmp_path, fake_twitch, processes)

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "kissbot", "static_configs": [{"targets": [target]}]},
            {"job_name": "kissbot-refresh-worker", "static_configs": [{"targets": [worker]}]},
        ],
    }))
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    processes.append(prometheus)
    base = f"http://127.0.0.1:{port}"
    wait_for("three scrapes", lambda: (r := query(base, "count_over_time(kissbot_store_up[1m])")) and float(r[0]["value"][1]) >= 3)
    wait_for("refreshes, failed and not, between scrapes", lambda: len(query(
        base, 'increase(kissbot_refresh_worker_refreshes_total{outcome=~"refreshed|failed"}[1m]) > 0'
    )) == 2)

    for (name, labels), value in EXPECTED.items():
        selector = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
        result = query(base, selector)
        assert [float(r["value"][1]) for r in result] == [value], selector
    (info,) = query(base, "kissbot_build_info")
    assert (info["metric"]["version"], info["metric"]["schema_revision"]) == (__version__, HEAD)
    (silent,) = query(base, f"kissbot_instance_heartbeat_age_seconds > {SILENT_FOR}")
    assert silent["metric"]["channel"] == "chan_a"
    (last_backup,) = query(base, "kissbot_last_backup_timestamp_seconds")
    assert float(last_backup["value"][1]) == pytest.approx(backup_file.stat().st_mtime)
    (size,) = query(base, "kissbot_database_size_bytes")
    assert float(size["value"][1]) > 0

    for expr in dashboard_exprs() + rule_exprs():
        assert query(base, expr), f"no result for {expr!r}"

    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as response:
        text = response.read()
    assert ACCESS.encode() not in text and REFRESH.encode() not in text
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    with urllib.request.urlopen(f"http://{worker}/metrics", timeout=5) as response:
        text = response.read()
    assert b"worker-secret" not in text
    check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    for proc in processes:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=10) for proc in processes[:2]] == [0, 0]
