"""No token, refresh token or key in logs, SQL echo, reprs, exceptions, audit rows or CLI output.

The same run is done twice: once as is (must be clean) and once with a bot
that deliberately logs its token (the scanner must catch it), so the test
cannot pass by looking in the wrong place.
"""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import traceback

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from sqlalchemy import select
from sqlalchemy.orm import Session

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.crypto import KeyFileCipher, read_key_ring
from kissbot.errors import KissbotError
from kissbot.models import OAuthToken
from kissbot.repo import AuditRepository, TokenRepository

ACCESS = "yrxyuiyffxiqsbc6cpr5y7utl7xmtd"
REFRESH = "kwgxkn1ylz67vho6yoh6q88pj26xve9m4hwwa8ztcx82bd3n1z"
ACCESS_2 = "q1w2e3r4t5y6u7i8o9p0asdfghjklz"
REFRESH_2 = "zxcvbnmlkjhgfdsapoiuytrewq0987654321qwertyuiopasdf"


def leaks(text: str, secrets: set[str]) -> list[str]:
    """Which secrets appear in ``text``, whole or as a 12-character start or end (masking keeps 4)."""
    found = []
    for secret in secrets:
        if any(part in text for part in (secret, secret[:12], secret[-12:])):
            found.append(secret[:4] + "…")
    return found


def test_the_scanner_finds_whole_and_partial_secrets():
    assert leaks(f"token={ACCESS}", {ACCESS}) == ["yrxy…"]
    assert leaks(f"token={ACCESS[:14]}…", {ACCESS}) == ["yrxy…"]
    assert leaks(f"token={ACCESS[:4]}…", {ACCESS}) == []


def test_decrypted_tokens_hide_in_reprs_but_work_as_strings(kissbot_manager):
    import json

    uid = kissbot_manager.create_user("1", "bot")
    kissbot_manager.store_tokens(uid, ACCESS, REFRESH, 60)
    tokens = kissbot_manager.get_tokens(uid)
    assert ACCESS not in repr(tokens) and "'yrxy…'" in repr(tokens)
    assert tokens["access_token"] == ACCESS and f"Bearer {tokens['access_token']}" == f"Bearer {ACCESS}"
    assert type(str(tokens["access_token"])) is str and str(tokens["access_token"]) == ACCESS
    assert json.loads(json.dumps(tokens["refresh_token"])) == REFRESH
    kissbot_manager.store_tokens(uid, tokens["access_token"], tokens["refresh_token"], 60)
    assert kissbot_manager.get_tokens(uid)["refresh_token"] == REFRESH


def _exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc) + repr(exc.args)


@pytest.mark.parametrize("deliberate_leak", [False, True], ids=["clean", "leaky-bot"])
def test_no_secret_anywhere_with_debug_logging_and_sql_echo(tmp_path, caplog, capfd, deliberate_leak):
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "sqlalchemy.engine", "sqlalchemy.pool", "alembic", "kissbot"):
        caplog.set_level(logging.DEBUG, logger=name)  # restored after the test
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    texts: list[str] = []
    keys: set[str] = set()

    def remember_keys() -> None:
        keys.update(k.decode() for _, k in read_key_ring(key_file).keys)

    mgr = DatabaseManager(db, key_file, echo="debug")
    remember_keys()
    uid = mgr.create_user("1209350837", "serda_bot", "Serda_Bot", is_bot=True)
    other = mgr.create_user("2", "other_bot")
    mgr.store_tokens(uid, ACCESS, REFRESH, 14400, ["chat:read"])
    mgr.store_tokens(other, ACCESS_2, REFRESH_2, 10, token_type="broadcaster")
    if deliberate_leak:
        logging.getLogger("my_bot").debug("connecting with token %s", mgr.get_tokens(uid)["access_token"])
    assert mgr.get_tokens(uid)["refresh_token"] == REFRESH
    mgr.get_tokens_needing_refresh(60)
    mgr.increment_refresh_failures(uid)
    mgr.mark_tokens_expired(other, token_type="broadcaster")
    instance = mgr.register_instance("other_bot", "serda_bot", 1234)
    mgr.update_instance_heartbeat(instance)
    mgr.stop_instance(instance, crash=True)
    mgr.log_event("custom", user_id=uid, details={"note": "hello"})
    mgr.set_config("x", 1)
    texts.append(repr(mgr.get_stats()))
    with mgr.session() as s:
        tokens = TokenRepository(s)
        tokens.claim_refresh(uid, "worker-1", 30)
        tokens.store_tokens(uid, ACCESS, REFRESH, 14400, expected_version=tokens.get_tokens(uid)["version"])
        tokens.release_refresh(uid, "worker-1")
    with Session(mgr.engine) as s:
        texts.extend(repr(row) for row in s.scalars(select(OAuthToken)))
    cipher = mgr.engine.dialect._kissbot_cipher
    assert isinstance(cipher, KeyFileCipher)
    texts += [repr(mgr), repr(cipher), repr(cipher.ring), repr(mgr.key_source), repr(mgr.engine), str(mgr.engine.url)]

    # Errors: a stale write, forbidden audit details, a corrupted row, a wrong key, a missing key.
    errors: list[BaseException] = []
    for action in (
        lambda: _stale(mgr, uid),
        lambda: mgr.log_event("oops", details={"access_token": ACCESS}),
        lambda: mgr.store_tokens(uid, "", REFRESH, 60),
    ):
        try:
            action()
        except KissbotError as exc:
            errors.append(exc)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE oauth_tokens SET refresh_token_encrypted = 'gAAAAAbroken' WHERE user_id = ?", (other,))
    try:
        mgr.get_tokens(other, token_type="broadcaster")
    except KissbotError as exc:
        errors.append(exc)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM oauth_tokens WHERE user_id = ?", (other,))

    runner = CliRunner()
    args = ["--db", str(db), "--key-file", str(key_file), "-vv"]
    for command in (["stats"], ["users"], ["tokens"], ["tokens", "--json"], ["instances"], ["audit", "--json"],
                    ["config", "list"], ["key", "status"], ["key", "status", "--json"],
                    ["key", "rotate", "--batch-size", "1"], ["key", "retire", "1"], ["key", "reset"],
                    ["key", "retire", "2"], ["tokens"]):
        result = runner.invoke(cli, [*command, *args])
        texts.append(result.output)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            errors.append(result.exception)
        remember_keys()
    proc = subprocess.run(
        [sys.executable, "-c", "from kissbot.cli import cli; cli()", "key", "rotate", *args],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    texts += [proc.stdout, proc.stderr]
    remember_keys()
    assert mgr.get_tokens(uid)["access_token"] == ACCESS, "the open manager followed both rotations"

    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(Fernet.generate_key())
    wrong.chmod(0o600)
    keys.add(wrong.read_text())
    for bad in (wrong, tmp_path / "missing.key"):
        try:
            DatabaseManager(db, bad)
        except KissbotError as exc:
            errors.append(exc)
    assert len(errors) >= 6

    texts += [_exception_text(e) for e in errors]
    with mgr.engine.connect() as conn:
        audit = AuditRepository(conn).get_audit_log(limit=10_000)
    texts += [repr(entry) for entry in audit]
    with sqlite3.connect(db) as conn:
        texts += [repr(row) for row in conn.execute("SELECT * FROM audit_log")]
        texts += [repr(row) for row in conn.execute("SELECT * FROM config")]
    mgr.close()
    out, err = capfd.readouterr()
    texts += [out, err]
    texts += [r.getMessage() + repr(r.args) + (r.exc_text or "") for r in caplog.records]
    texts.append(caplog.text)
    texts += [p.name for p in tmp_path.iterdir()]

    assert "SELECT" in out + caplog.text, "SQL echo was on"
    assert sum("key_" in e["event_type"] for e in audit) >= 3, "key events were audited"
    secrets = {ACCESS, REFRESH, ACCESS_2, REFRESH_2} | keys
    assert len(keys) >= 4
    found = sorted({leak for text in texts for leak in leaks(text, secrets)})
    if deliberate_leak:
        assert found == [ACCESS[:4] + "…"], "the scanner must catch a bot that logs its token"
    else:
        assert found == []


def _stale(mgr: DatabaseManager, uid: int) -> None:
    with mgr.session() as s:
        TokenRepository(s).store_tokens(uid, ACCESS, REFRESH, 60, expected_version=0)
