"""Where a store is: a SQLite path or a database URL, checked before anything is opened.

A path is a SQLite file; a URL must be well formed and name a backend kissbot
supports (SQLite, PostgreSQL through psycopg). A text that only looks like a
URL (``postgresql+psycopg:/kb@host/db``, one slash missing) is refused rather
than taken for a file name. No message here prints a password.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from kissbot.errors import ConfigurationError, KissbotError, NoDatabase

SUPPORTED = {"sqlite": ("pysqlite",), "postgresql": ("psycopg",)}
"""Backends and the driver kissbot runs each on."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9.+-]*):")
_AUTHORITY = re.compile(r"\s*[A-Za-z][A-Za-z0-9.+-]*:/*")
_BACKEND_NAMES = ("sqlite", "postgres", "mysql", "mariadb", "oracle", "mssql")


def shown(url: URL | str) -> str:
    """``url`` as it may be printed: its password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    # Up to the last "@": a password may hold "@", "/" or ":" that the user forgot to escape.
    head, at, tail = url.rpartition("@")
    scheme = _AUTHORITY.match(head)
    start = scheme.end() if scheme else 0
    user, colon, _ = head[start:].partition(":")
    return f"{head[:start]}{user}:***@{tail}" if at and colon else url


def parse_url(text: str) -> URL:
    """The :class:`URL` ``text`` names; :class:`ConfigurationError` unless it is a well-formed supported URL.

    ``postgresql://`` means ``postgresql+psycopg://`` (SQLAlchemy's default, psycopg2, is not kissbot's driver).
    """
    scheme = _SCHEME.match(text)
    if scheme is None or not text[scheme.end():].startswith("//"):
        raise ConfigurationError(
            f"malformed database URL {shown(text)!r}: expected BACKEND://…, e.g. postgresql+psycopg://user@host/db "
            "(a SQLite file is given with --db PATH)"
        )
    try:
        url = make_url(text)
    except (ArgumentError, ValueError) as exc:
        detail = "the port must be a number" if isinstance(exc, ValueError) else "it cannot be parsed"
        raise ConfigurationError(f"malformed database URL {shown(text)!r}: {detail}") from None
    if "@" in (url.host or "") or (url.get_backend_name() != "sqlite" and "@" in (url.database or "")):
        raise ConfigurationError(f"malformed database URL {shown(text)!r}: write '@' as %40 in a user name or password")
    backend, driver = url.get_backend_name(), url.drivername.partition("+")[2] or None
    drivers = SUPPORTED.get(backend)
    if drivers is None or (driver is not None and driver not in drivers):
        supported = ", ".join(f"{b}+{d[0]}://" for b, d in SUPPORTED.items())
        raise ConfigurationError(f"unsupported database URL {shown(url)!r}: kissbot supports {supported}")
    if backend == "sqlite" and (url.username or url.password or url.host or url.port):
        raise ConfigurationError(
            f"malformed database URL {shown(text)!r}: a SQLite URL names a file (sqlite:///relative.db, "
            "sqlite:////absolute.db), with no user, password, host or port"
        )
    if driver is None and backend == "postgresql":
        url = url.set(drivername=f"{backend}+{drivers[0]}")
    if url.port is not None and not 0 < url.port < 65536:
        raise ConfigurationError(f"malformed database URL {shown(url)!r}: port {url.port} is out of range")
    return url


def to_url(target: str | os.PathLike[str] | URL) -> URL:
    """Turn a SQLite path or a database URL into a :class:`URL` (see :func:`parse_url`).

    A path that starts like a database URL (``postgresql+psycopg:/…``) is
    refused, not taken for a file name.
    """
    if isinstance(target, URL):
        return target
    text = os.fspath(target)
    if text == ":memory:":
        return make_url("sqlite://")
    scheme = _SCHEME.match(text)
    if "://" in text or (scheme is not None and scheme.group(1).lower().startswith(_BACKEND_NAMES)):
        return parse_url(text)
    return URL.create("sqlite", database=text)


def is_memory(url: URL) -> bool:
    """True for an in-memory SQLite URL."""
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def sqlite_path(url: URL) -> Path | None:
    """The file of a file-backed SQLite URL, else None."""
    if url.get_backend_name() != "sqlite" or is_memory(url):
        return None
    return Path(url.database)


def existing_store(target: str | os.PathLike[str] | URL, in_memory: KissbotError) -> URL:
    """The URL of the existing store at ``target``, without opening it.

    Raises ``in_memory`` for an in-memory SQLite URL (what the caller cannot
    do on one) and :class:`~kissbot.errors.NoDatabase` for a SQLite file that
    does not exist.
    """
    url = to_url(target)
    if is_memory(url):
        raise in_memory
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise NoDatabase(f"database {path} does not exist; create it with kissbot init-db")
    return url
