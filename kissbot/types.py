"""Column types: Fernet-encrypted strings and timezone-aware UTC datetimes.

The cipher is not a module global: it is attached to an engine's dialect by
:func:`attach_cipher`, so each store encrypts with its own key.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, DateTime, Text, type_coerce
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.types import TypeDecorator

from kissbot.crypto import TokenCipher, mask_secret
from kissbot.errors import KeyFileError, NaiveDatetimeError

_CIPHER_ATTR = "_kissbot_cipher"


def attach_cipher(engine: Engine, cipher: TokenCipher) -> None:
    """Make ``engine`` encrypt and decrypt token columns with ``cipher``."""
    setattr(engine.dialect, _CIPHER_ATTR, cipher)


def cipher_of(dialect: Dialect) -> TokenCipher:
    """Return the cipher attached to ``dialect``'s engine."""
    cipher = getattr(dialect, _CIPHER_ATTR, None)
    if cipher is None:
        raise KeyFileError("this engine has no encryption key: open the store through kissbot with a key")
    return cipher


class Secret(str):
    """A decrypted token: an ordinary ``str`` whose ``repr`` shows only its first 4 characters.

    SQLAlchemy's debug log, tracebacks and the repr of a tokens dict print
    reprs, so a token read from the store never appears whole in them, while
    ``==``, ``str()``, f-strings and JSON see the full value.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_secret(self))


class EncryptedString(TypeDecorator[str]):
    """A text column stored as a Fernet token and read back as plaintext (a :class:`Secret`).

    Reading a value that does not decrypt raises
    :class:`~kissbot.errors.DecryptionError`; it never returns ciphertext.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return cipher_of(dialect).encrypt(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return Secret(cipher_of(dialect).decrypt(value))

    def __repr__(self) -> str:
        return "EncryptedString()"


def ciphertext(column: ColumnElement[Any]) -> ColumnElement[str]:
    """``column`` (an :class:`EncryptedString` column) as the stored Fernet text: read or compared, never decrypted.

    Rotation, copies and adoption move tokens as stored; this is the one way
    they see them (write ciphertext back with ``bindparam(…, type_=Text)``).
    """
    return type_coerce(column, Text).label(column.key)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that must be timezone-aware on write and is aware UTC on read."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise NaiveDatetimeError(f"naive datetime {value!r}: pass a timezone-aware datetime (UTC)")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)
