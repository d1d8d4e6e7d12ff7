"""The one exception hierarchy of kissbot.

Every error a caller can meet is a :class:`KissbotError`. Errors that come from
the database driver are raised ``from`` the driver's exception so the cause is
kept for debugging, while the message itself names the thing at fault and never
holds a secret.
"""

from __future__ import annotations


class KissbotError(Exception):
    """Base class of every error raised by kissbot."""


def driver_message(exc: BaseException) -> str:
    """The first line of a database error's driver message (PostgreSQL adds DETAIL/HINT lines)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ValidationError(KissbotError, ValueError):
    """An argument of a library call is of the wrong type or out of range."""


class KeyFileError(KissbotError):
    """The encryption key is missing, unreadable, unsafe or not a Fernet key."""


class DecryptionError(KissbotError):
    """A stored token could not be decrypted (wrong key or corrupted data).

    ``user_id`` and ``key_version`` name the row when it is known.
    """

    def __init__(self, message: str, *, user_id: int | None = None, key_version: int | None = None) -> None:
        super().__init__(message)
        self.user_id = user_id
        self.key_version = key_version


class NaiveDatetimeError(KissbotError, ValueError):
    """A datetime without a timezone was about to be written."""


class NotFound(KissbotError, LookupError):
    """A row that the caller named does not exist."""


class UserNotFound(NotFound):
    """No user with that id or login."""


class InstanceNotFound(NotFound):
    """No instance with that id."""


class DuplicateUser(KissbotError):
    """A user with that Twitch id or login already exists."""


class StaleTokens(KissbotError):
    """A compare-and-set write found newer tokens than the writer had read."""


class InstanceDisabled(KissbotError):
    """The instance crashed ``max_crash_count`` times and must be reset first."""


class SchemaError(KissbotError):
    """The database schema is not one this version of kissbot can use."""


class UnversionedDatabase(SchemaError):
    """The database has tables but no Alembic version: it must be adopted."""


class AdoptionError(SchemaError):
    """A KissBot v4 database cannot be adopted as it is; nothing was changed."""


class DatabaseError(KissbotError):
    """The database could not be opened or used."""


class NoDatabase(DatabaseError):
    """The database does not exist (or has no kissbot tables) and the caller asked not to create it."""


class OutdatedSchema(SchemaError):
    """The database is at an older migration and the caller asked not to migrate it."""


class BackupError(KissbotError):
    """A backup could not be taken or did not pass its integrity check, or was refused for restoring."""


class ImportSourceError(KissbotError):
    """A token file to import is missing, unreadable, malformed or holds no tokens."""


class InvalidImport(KissbotError):
    """Entries of a token file are invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class DatabaseUnavailable(DatabaseError):
    """The database server cannot be reached or dropped the connection (PostgreSQL down, restarted, killed session)."""


class DatabaseBusy(DatabaseError):
    """Another process holds the database's lock: longer than ``busy_timeout``, or while it must be replaced."""


class ConfigurationError(KissbotError, ValueError):
    """A setting (argument or environment variable) has a value kissbot does not accept."""


class CorruptConfig(KissbotError):
    """A value stored in the ``config`` table is not valid for its key ``key``.

    ``problem`` says what is wrong, ``fix`` the command that repairs it; the message holds both.
    """

    def __init__(self, problem: str, *, key: str, fix: str) -> None:
        super().__init__(f"{problem}: {fix}")
        self.key, self.problem, self.fix = key, problem, fix


class UnsupportedBackend(KissbotError):
    """The operation exists on another database backend only (e.g. SQLite's WAL checkpoint)."""


class RefreshError(KissbotError):
    """The refresh worker cannot do its job (not a problem with one token)."""


class MissingClientCredentials(RefreshError):
    """The Twitch application's client id or client secret is not configured."""


class ClientCredentialsRejected(RefreshError):
    """Twitch refused the application's client id or client secret."""


class CopyError(KissbotError):
    """A store could not be copied to another database; the target was left as it was."""


class TargetNotEmpty(CopyError):
    """The database to copy into already holds kissbot rows."""


class TokenRejected(KissbotError):
    """Twitch refused a refresh token (400/401 ``Invalid refresh token``): a human must authorise again.

    ``status`` is Twitch's HTTP status when known. The message never quotes
    Twitch's answer, which may echo the token.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
