"""Fernet keys and the cipher that encrypts token columns.

A :class:`TokenCipher` belongs to one store (it is attached to that store's
engine), so two stores with different keys work side by side in one process.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from kissbot.errors import DecryptionError, KeyFileError

DEFAULT_KEY_FILE = ".kissbot.key"
_FERNET_PREFIX = "gAAAAA"
_DECRYPTED_KEPT = 4096


class TokenCipher:
    """Encrypts and decrypts token strings with one or more Fernet keys.

    The first key encrypts; every key is tried to decrypt. Besides standard
    Fernet tokens it reads the older KissBot format: a Fernet token wrapped once
    more in URL-safe base64 (values starting ``Z0FBQUFB``).
    """

    __slots__ = ("_fernet", "_plaintexts")

    def __init__(self, keys: list[bytes] | bytes) -> None:
        if isinstance(keys, (bytes, str)):
            keys = [keys]
        if not keys:
            raise KeyFileError("no encryption key given")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except (ValueError, TypeError, binascii.Error):
            raise KeyFileError("encryption key is not a valid Fernet key (32 url-safe base64-encoded bytes)") from None
        # Stored token -> plaintext of the tokens this store decrypted lately. A
        # bot re-reads the same ciphertext until its next refresh; Fernet's
        # HMAC + AES (~10 µs a token) is then the largest part of get_tokens.
        # Keyed by the ciphertext itself, an entry can never be stale.
        self._plaintexts: dict[str, str] = {}

    def __repr__(self) -> str:
        return "<TokenCipher>"

    def encrypt(self, plaintext: str) -> str:
        """Return the standard Fernet token of ``plaintext``."""
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, stored: str) -> str:
        """Return the plaintext of a stored token; raise :class:`DecryptionError`."""
        plaintext = self._plaintexts.get(stored)
        if plaintext is not None:
            return plaintext
        try:
            token = stored.encode("ascii")
            if not stored.startswith(_FERNET_PREFIX):
                token = base64.urlsafe_b64decode(token)
            plaintext = self._fernet.decrypt(token).decode()
        except (InvalidToken, ValueError, TypeError, binascii.Error, UnicodeError):
            raise DecryptionError("Failed to decrypt token: wrong key or corrupted data") from None
        if len(self._plaintexts) >= _DECRYPTED_KEPT:
            self._plaintexts.clear()
        self._plaintexts[stored] = plaintext
        return plaintext


def generate_key() -> bytes:
    """Return a new random Fernet key."""
    return Fernet.generate_key()


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read and check a key file; raise :class:`KeyFileError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        Fernet(data)
    except (ValueError, binascii.Error):
        raise KeyFileError(f"key file {path} does not hold a valid Fernet key") from None
    return data


def create_key_file(path: str | os.PathLike[str]) -> bytes:
    """Create ``path`` holding a new key, atomically and with mode 0600.

    The key is written to a private temporary file beside ``path`` and then
    hard-linked into place, so the file appears complete or not at all. If
    another process created it first, that key is returned instead.
    """
    path = Path(path)
    key = generate_key()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(key + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_key_file(path)
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return key


def mask_secret(value: str | None) -> str:
    """Show a secret as its first 4 characters and "…" (never more), for logs and output."""
    if not value:
        return ""
    return f"{value[:4]}…"


@dataclass(frozen=True)
class TokenCheck:
    """How many users' tokens were tried, and whose failed to decrypt."""

    checked: int
    """Distinct users with at least one token row."""
    failed_user_ids: list[int] = field(default_factory=list)
    """Users with a token (access or refresh, any token type) that does not decrypt, ascending."""


def verify_tokens(rows: Iterable[tuple[Any, str | None, str | None]], cipher: TokenCipher) -> TokenCheck:
    """Try to decrypt every ``(user_id, access_ciphertext, refresh_ciphertext)`` row with ``cipher``.

    Plaintexts are dropped at once; only the ids of users with a token that
    does not decrypt are returned.
    """
    users, failed = set(), set()
    for user_id, access, refresh in rows:
        users.add(user_id)
        try:
            for value in (access, refresh):
                if value is not None:
                    cipher.decrypt(value)
        except DecryptionError:
            failed.add(user_id)
    return TokenCheck(len(users), sorted(failed))
