"""Every Python snippet of the specification runs unchanged once the import reads `from kissbot import …`.

The snippets below are copied from DATABASE_ARCHITECTURE.md; the only edit is the import line
(`from database.manager import DatabaseManager` → `from kissbot import DatabaseManager`). Each runs in a
fresh interpreter in one directory, as an operator would run them one after the other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SETUP = """
from kissbot import DatabaseManager
mgr = DatabaseManager()
mgr.create_user(twitch_user_id="44322889", twitch_login="el_serda", display_name="El_Serda")
"""

API = """
from kissbot import DatabaseManager

# Initialisation
mgr = DatabaseManager(db_path="kissbot.db", key_file=".kissbot.key")

# === USERS ===
user = mgr.get_user_by_login("serda_bot")
user_id = mgr.create_user(
    twitch_user_id="1209350837",
    twitch_login="serda_bot",
    display_name="Serda_Bot",
    is_bot=True
)

# === TOKENS ===
# Stocker (chiffrement automatique)
mgr.store_tokens(
    user_id=user_id,
    access_token="yrxyuiyffxiqsbc6cpr5y7utl7xmtd",
    refresh_token="kwgxkn1ylz67vho6yoh6q88pj26xve9m4hwwa8ztcx82bd3n1z",
    expires_in=3600,  # secondes
    scopes=["chat:read", "chat:edit"]
)

# Récupérer (déchiffrement automatique)
tokens = mgr.get_tokens(user_id)
print(tokens['access_token'])  # Token en clair
print(tokens['expires_at'])    # Timestamp d'expiration

# Tokens expirant bientôt (pour refresh proactif)
expiring = mgr.get_tokens_needing_refresh(buffer_minutes=10)
for token in expiring:
    print(f"User {token['user_id']} expires at {token['expires_at']}")

# === INSTANCES ===
instance_id = mgr.register_instance(
    channel_login="el_serda",
    bot_login="serda_bot",
    pid=12345
)

mgr.update_instance_heartbeat(instance_id, status='running')
mgr.stop_instance(instance_id, crash=False)

# === AUDIT LOG ===
logs = mgr.get_audit_log(limit=10, event_type="tokens_refreshed")
for log in logs:
    print(f"[{log['timestamp']}] {log['event_type']}: {log['details']}")

# === CONFIG ===
interval = mgr.get_config("token_refresh_interval", default=60)
mgr.set_config("custom_setting", "value", description="Mon setting")

# === STATS ===
stats = mgr.get_stats()
print(f"Database size: {stats['db_size_bytes'] / 1024:.1f} KB")
"""

TIO_MIGRATION = """
# Script de migration manuelle
import sys
sys.path.insert(0, '.')
from kissbot import DatabaseManager
import json

mgr = DatabaseManager()

# Lire les tokens actifs
with open('.tio.tokens.json', 'r') as f:
    tokens = json.load(f)

# Migrer chaque utilisateur
for user_id, data in tokens.items():
    # Récupérer l'utilisateur depuis la DB
    user = mgr.get_user(user_id)  # ou get_user_by_login()

    if user:
        mgr.store_tokens(
            user_id=user['id'],
            access_token=data['token'],
            refresh_token=data['refresh'],
            expires_in=14400  # 4 heures
        )
        print(f"✅ Updated tokens for user {user['twitch_login']}")
"""

STATUS = """
from kissbot import DatabaseManager
mgr = DatabaseManager()
stats = mgr.get_stats()
print(f'Users: {stats[\"users_count\"]}')
print(f'Tokens: {stats[\"tokens_count\"]}')
print(f'Active instances: {stats[\"active_instances\"]}')
"""

CLEANUP = """
from kissbot import DatabaseManager

mgr = DatabaseManager()

# Supprimer les logs de plus de 30 jours
deleted = mgr.cleanup_old_logs(days=30)
print(f"✅ Supprimé {deleted} logs d'audit anciens")
"""

DIAGNOSE = """
from kissbot import DatabaseManager
mgr = DatabaseManager()
user = mgr.get_user_by_login('serda_bot')
tokens = mgr.get_tokens(user['id'])
print(f'Access token: {tokens[\"access_token\"][:20]}...')
print(f'Expires at: {tokens[\"expires_at\"]}')
print(f'Needs reauth: {tokens[\"needs_reauth\"]}')
"""

FAILURES = """
# Diagnostic
from kissbot import DatabaseManager
mgr = DatabaseManager()

# Vérifier les tokens en échec
tokens = mgr.get_tokens_needing_refresh(buffer_minutes=999999)
for t in tokens:
    if t['refresh_failures'] >= 3 or t['needs_reauth']:
        print(f"⚠️ User {t['user_id']}: {t['refresh_failures']} failures, needs_reauth={t['needs_reauth']}")
"""

DEBUG = """
# Activer les logs SQL
import logging
logging.basicConfig(level=logging.DEBUG)

from kissbot import DatabaseManager
mgr = DatabaseManager()  # Verra tous les SQL queries
mgr.get_tokens(1)
"""

MARK_EXPIRED = """
from kissbot import DatabaseManager
mgr = DatabaseManager()
mgr.mark_tokens_expired(mgr.get_user_by_login("serda_bot")["id"])
"""


def run(snippet: str, cwd) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(snippet)], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("spec")
    run(SETUP, cwd)
    return cwd


def test_api_snippet(workdir):
    out = run(API, workdir).stdout.splitlines()
    assert out[0] == "yrxyuiyffxiqsbc6cpr5y7utl7xmtd"
    assert out[1].endswith("+00:00")
    assert out[-1].startswith("Database size: ") and out[-1].endswith(" KB")
    assert (workdir / ".kissbot.key").stat().st_mode & 0o777 == 0o600


def test_status_snippet(workdir):
    assert run(STATUS, workdir).stdout == "Users: 2\nTokens: 1\nActive instances: 0\n"


def test_tio_migration_snippet(workdir):
    (workdir / ".tio.tokens.json").write_text(json.dumps({
        "1209350837": {"user_id": "1209350837", "token": "fresh-access-token-0001", "refresh": "fresh-refresh", "last_validated": "2025-11-05T00:00:00"},
        "999": {"user_id": "999", "token": "x", "refresh": "y", "last_validated": "2025-11-05T00:00:00"},
    }))
    assert run(TIO_MIGRATION, workdir).stdout == "✅ Updated tokens for user serda_bot\n"


def test_diagnose_snippet(workdir):
    out = run(DIAGNOSE, workdir).stdout.splitlines()
    assert out[0] == "Access token: fresh-access-token-0...", "the previous snippet's tokens are read back"
    assert out[2] == "Needs reauth: False"


def test_refresh_failures_snippet(workdir):
    assert run(FAILURES, workdir).stdout == ""
    run(MARK_EXPIRED, workdir)
    assert run(FAILURES, workdir).stdout == "⚠️ User 2: 0 failures, needs_reauth=True\n"


def test_cleanup_snippet(workdir):
    assert run(CLEANUP, workdir).stdout == "✅ Supprimé 0 logs d'audit anciens\n"


def test_debug_snippet_logs_sql_but_no_secret(workdir):
    err = run(DEBUG, workdir).stderr
    assert "DEBUG:kissbot.sql:SELECT oauth_tokens.user_id" in err
    assert "fresh-access-token" not in err and "gAAAAA" not in err
