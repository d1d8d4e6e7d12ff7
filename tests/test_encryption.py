"""Tokens are encrypted at rest with the store's own key and fail closed."""

from __future__ import annotations

import base64

import pytest
import sqlalchemy
from cryptography.fernet import Fernet
from sqlalchemy.engine import make_url

from kissbot import DatabaseManager
from kissbot.crypto import TokenCipher, fingerprint, read_key_ring
from kissbot.errors import DecryptionError, KeyFileError
from kissbot.types import EncryptedString

ACCESS = "yrxyuiyffxiqsbc6cpr5y7utl7xmtd"
REFRESH = "kwgxkn1ylz67vho6yoh6q88pj26xve9m4hwwa8ztcx82bd3n1z"


@pytest.fixture
def db_file(tmp_path):
    return tmp_path / "kissbot.db"


def _raw(url, sql, params=None):
    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        result = conn.execute(sqlalchemy.text(sql), params or {})
        rows = result.all() if result.returns_rows else None
    engine.dispose()
    return rows


def _raw_tokens(url, user_id):
    sql = "SELECT access_token_encrypted, refresh_token_encrypted FROM oauth_tokens WHERE user_id = :u"
    (row,) = _raw(url, sql, {"u": user_id})
    return tuple(row)


def test_stored_value_is_a_fernet_token_of_the_key_file(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, ACCESS, REFRESH, 3600)
    access, refresh = _raw_tokens(store_url, uid)
    fernet = Fernet(key_file.read_bytes().strip())
    assert access.startswith("gAAAAA")
    assert fernet.decrypt(access.encode()).decode() == ACCESS
    assert fernet.decrypt(refresh.encode()).decode() == REFRESH


def test_plaintext_is_nowhere_in_the_database_or_its_wal(db_file, key_file):
    """SQLite only: it reads the database and WAL files' bytes (PostgreSQL's files are the server's)."""
    mgr = DatabaseManager(db_file, key_file)
    uid = mgr.create_user("1", "serda_bot")
    mgr.store_tokens(uid, ACCESS, REFRESH, 3600)
    wal = db_file.with_name(db_file.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0, "the write should still be in the WAL"
    for path in (db_file, wal):
        data = path.read_bytes()
        assert ACCESS.encode() not in data
        assert REFRESH.encode() not in data
    mgr.close()


def test_plaintext_is_in_no_column(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, ACCESS, REFRESH, 3600)
        mgr.store_tokens(uid, ACCESS, REFRESH, 3600, token_type="broadcaster")
    engine = sqlalchemy.create_engine(store_url)
    with engine.connect() as conn:
        for table in ("users", "oauth_tokens", "instances", "audit_log", "config"):
            for row in conn.exec_driver_sql(f"SELECT * FROM {table}"):
                text = " ".join(map(str, row))
                assert ACCESS not in text and REFRESH not in text, table
    engine.dispose()


def test_key_file_is_created_private(store_url, key_file):
    DatabaseManager(url=store_url, key_file=key_file).close()
    assert key_file.stat().st_mode & 0o777 == 0o600
    Fernet(key_file.read_bytes().strip())


def test_legacy_base64_wrapped_token_reads_back(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, "placeholder", "placeholder", 3600)
    fernet = Fernet(key_file.read_bytes().strip())
    wrapped = base64.urlsafe_b64encode(fernet.encrypt(ACCESS.encode())).decode()
    assert wrapped.startswith("Z0FBQUFB")
    _raw(store_url, "UPDATE oauth_tokens SET access_token_encrypted = :w WHERE user_id = :u", {"w": wrapped, "u": uid})
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        assert mgr.get_tokens(uid)["access_token"] == ACCESS


def test_wrong_key_is_refused_at_open_naming_the_file(store_url, key_file, tmp_path):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, ACCESS, REFRESH, 3600)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(Fernet.generate_key())
    other_key.chmod(0o600)
    with pytest.raises(KeyFileError) as caught:
        DatabaseManager(url=store_url, key_file=other_key)
    message = str(caught.value)
    db = make_url(store_url).database
    assert message.startswith(f"key file {other_key} does not match {db}: key version 1 has fingerprint ")
    assert "\n" not in message and other_key.read_text() not in message


def test_undecryptable_row_fails_closed_naming_user_and_key_version(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        other = mgr.create_user("2", "other_bot")
        mgr.store_tokens(uid, ACCESS, REFRESH, 3600)
        mgr.store_tokens(other, "other-access", "other-refresh", 3600)
    stranger = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    _raw(store_url, "UPDATE oauth_tokens SET access_token_encrypted = :s WHERE user_id = :u", {"s": stranger, "u": uid})
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        with pytest.raises(DecryptionError) as caught:
            mgr.get_tokens(uid)
        assert str(caught.value) == (
            f"Failed to decrypt tokens for user {uid} (key version 1, fingerprint {fingerprint(read_key_ring(key_file).key(1))}): "
            "wrong key or corrupted data"
        )
        assert (caught.value.user_id, caught.value.key_version) == (uid, 1)
        assert "gAAAA" not in str(caught.value)
        assert mgr.get_tokens(other)["access_token"] == "other-access", "other users keep working"
        assert mgr.get_user_by_login("serda_bot")["id"] == uid


def test_corrupted_ciphertext_fails_closed(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, ACCESS, REFRESH, 3600)
    _raw(store_url, "UPDATE oauth_tokens SET refresh_token_encrypted = 'gAAAAAnot-a-token'")
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        with pytest.raises(DecryptionError, match=f"user {uid} .key version 1, fingerprint [0-9a-f]{{16}}.: wrong key"):
            mgr.get_tokens(uid)


def test_two_stores_with_different_keys_in_one_process(tmp_path):
    """Two SQLite files stand in for any two stores: the point is two keys in one process."""
    a = DatabaseManager(tmp_path / "a.db", tmp_path / "a.key")
    b = DatabaseManager(tmp_path / "b.db", tmp_path / "b.key")
    assert a.key_file.read_bytes() != b.key_file.read_bytes()
    ua, ub = a.create_user("1", "bot_a"), b.create_user("1", "bot_b")
    a.store_tokens(ua, "token-a", "refresh-a", 60)
    b.store_tokens(ub, "token-b", "refresh-b", 60)
    assert a.get_tokens(ua)["access_token"] == "token-a"
    assert b.get_tokens(ub)["access_token"] == "token-b"
    a.close()
    b.close()


def test_missing_key_with_tokens_refuses_and_creates_nothing(store_url, key_file):
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        uid = mgr.create_user("1", "serda_bot")
        mgr.store_tokens(uid, ACCESS, REFRESH, 3600)
    key_file.unlink()
    with pytest.raises(KeyFileError) as caught:
        DatabaseManager(url=store_url, key_file=key_file)
    assert str(caught.value) == (
        f"key file {key_file} not found but {make_url(store_url).database} holds tokens for 1 users; "
        "restore the key from your backup, or point to it with --key-file PATH or KISSBOT_KEY_FILE"
    )
    assert not key_file.exists()


def test_garbage_key_file_is_refused(store_url, key_file):
    key_file.write_text("not a key\n")
    key_file.chmod(0o600)
    with pytest.raises(KeyFileError, match="does not hold a valid Fernet key"):
        DatabaseManager(url=store_url, key_file=key_file)


@pytest.mark.parametrize(
    "key",
    [
        base64.urlsafe_b64encode(bytes(range(32))),
        base64.urlsafe_b64encode(bytes(range(32))).decode(),
        base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"="),
        base64.urlsafe_b64encode(bytes(range(31))),
        base64.urlsafe_b64encode(bytes(range(33))),
        base64.b64encode(bytes(range(250, 256)) * 6)[:44],
        b" " + base64.urlsafe_b64encode(bytes(range(32))),
        base64.urlsafe_b64encode(bytes(range(32))) + "é".encode(),
        b"not a key",
        b"",
    ],
)
def test_keys_are_accepted_exactly_when_fernet_accepts_them(key):
    """kissbot checks keys without loading cryptography; it must agree with Fernet itself."""
    try:
        Fernet(key)
    except (ValueError, TypeError):
        with pytest.raises(KeyFileError, match="not a valid Fernet key"):
            TokenCipher(key)
    else:
        cipher = TokenCipher(key)
        assert Fernet(key).decrypt(cipher.encrypt("x").encode()) == b"x"


def test_reprs_hold_no_key_material():
    key = Fernet.generate_key()
    cipher = TokenCipher(key)
    assert key.decode() not in repr(cipher)
    assert repr(EncryptedString()) == "EncryptedString()"
    assert cipher.decrypt(cipher.encrypt("x")) == "x"


def test_engine_without_key_refuses_token_columns(store_url):
    from kissbot.engine import create_engine
    from kissbot.migrations import upgrade
    from kissbot.repo import TokenRepository, UserRepository

    engine = create_engine(store_url)
    upgrade(engine)
    with engine.begin() as conn:
        uid = UserRepository(conn).create_user("1", "bot")
        with pytest.raises(KeyFileError, match="no encryption key"):
            TokenRepository(conn).store_tokens(uid, "a", "r", 60)
    engine.dispose()
