"""Off-site backups: snapshots uploaded to a directory or S3-compatible storage, listed, pruned, restored.

A backup is two objects under the destination URL (a directory, ``file://``,
``s3://bucket/prefix``; ``gs://`` and ``az://`` work the same way):

- ``kissbot-YYYYMMDDTHHMMSSZ-<revision>.sqlite.gz``: a consistent SQLite
  snapshot (:func:`kissbot.backup.backup_sqlite`, integrity-checked), gzipped;
  or ``….pgdump``: ``pg_dump -Fc`` of a PostgreSQL store (compressed by pg_dump,
  read back whole with ``pg_restore`` before upload);
- ``kissbot-YYYYMMDDTHHMMSSZ-<revision>.json``: its manifest (size, SHA-256,
  backend, revision), written only after the snapshot is fully stored.

Only snapshots with a manifest are backups: an upload cut short leaves none,
and :func:`prune_backups` later deletes its remains. The key is never uploaded;
tokens travel Fernet-encrypted as they are stored. Object storage is reached
through obstore, whose credentials, region and endpoint come from the standard
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_REGION``, ``AWS_ENDPOINT_URL``…).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from kissbot import __version__
from kissbot.backup import (
    _fsync_file,
    _install_new,
    _private_temp_file,
    backup_sqlite,
    default_backup_path,
    restore_sqlite,
)
from kissbot.crypto import TokenCipher, verify_tokens
from kissbot.urls import sqlite_path, to_url
from kissbot.errors import BackupError, KissbotError, UnsupportedBackend
from kissbot.migrations import KISSBOT_TABLES, is_known_revision
from kissbot.types import utcnow
from kissbot.validation import echo

log = logging.getLogger(__name__)

SUFFIXES = {"sqlite": ".sqlite.gz", "postgresql": ".pgdump"}
_NAME = re.compile(r"^(kissbot-(\d{8}T\d{6}Z)-([0-9A-Za-z_]+))(\.sqlite\.gz|\.pgdump)$")
_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
_CHUNK = 1 << 20
MAX_INTERVAL_DAYS = 366
"""Longest ``--every`` interval."""
ORPHAN_AGE = timedelta(days=1)
"""A snapshot left without a manifest this long (an upload that died) is deleted by :func:`prune_backups`."""
PG_LOCK_TIMEOUT = "10s"
"""How long a PostgreSQL restore waits for a table lock a bot holds before giving up, unchanged."""


@dataclass(frozen=True)
class BackupInfo:
    """One complete backup at a destination."""

    name: str
    """The snapshot object, e.g. ``kissbot-20261129T084600Z-0002.sqlite.gz``."""
    created_at: datetime
    """When the snapshot was taken (aware UTC, to the second)."""
    revision: str
    """The store's Alembic revision."""
    backend: str
    """``sqlite`` or ``postgresql``."""
    size: int
    """Bytes stored (compressed)."""

    @property
    def manifest(self) -> str:
        """The manifest object's name."""
        return manifest_name(self.name)


def manifest_name(snapshot: str) -> str:
    """``kissbot-…-<rev>.json`` for the snapshot ``kissbot-…-<rev>.sqlite.gz`` (or ``.pgdump``)."""
    match = _NAME.match(snapshot)
    assert match, snapshot
    return f"{match.group(1)}.json"


@dataclass(frozen=True)
class Retention:
    """Which backups to keep: the newest ``last``, the newest of each of the last ``daily``
    days and ``weekly`` ISO weeks that have one. The newest backup is always kept."""

    last: int = 0
    daily: int = 0
    weekly: int = 0

    def __bool__(self) -> bool:
        return bool(self.last or self.daily or self.weekly)

    def keep(self, backups: Iterable[BackupInfo]) -> set[str]:
        """The names of ``backups`` this policy keeps."""
        newest_first = sorted(backups, key=lambda b: b.created_at, reverse=True)
        kept = {b.name for b in newest_first[: max(self.last, 1)]}
        periods: list[tuple[int, Callable[[datetime], object]]] = [
            (self.daily, lambda t: t.date()),
            (self.weekly, lambda t: t.isocalendar()[:2]),
        ]
        for count, period in periods:
            seen: set[object] = set()
            for backup in newest_first:
                key = period(backup.created_at)
                if key in seen:
                    continue
                if len(seen) == count:
                    break
                seen.add(key)
                kept.add(backup.name)
        return kept


# --- destinations ---------------------------------------------------------------------------------------------


class Destination(Protocol):
    """Where backups are stored: a flat namespace of objects."""

    label: str

    def list(self) -> dict[str, int]: ...  # name -> size

    def put(self, name: str, source: Path) -> None: ...

    def put_bytes(self, name: str, data: bytes) -> None: ...

    def download(self, name: str, dest: Path) -> None: ...

    def read(self, name: str) -> bytes: ...

    def delete(self, name: str) -> None: ...


class DirectoryDestination:
    """A local folder (or a mounted one). Files appear whole (temp file + link) with mode 0600."""

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label

    def list(self) -> dict[str, int]:
        if not self.path.is_dir():
            return {}
        return {e.name: e.stat().st_size for e in os.scandir(self.path) if e.is_file(follow_symlinks=False)}

    def put(self, name: str, source: Path) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        dest = self.path / name
        tmp = _private_temp_file(dest)
        try:
            shutil.copyfile(source, tmp)
            _fsync_file(tmp)
            _install_new(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory(prefix="kissbot-offsite-") as work:
            source = Path(work, name)
            source.write_bytes(data)
            self.put(name, source)

    def download(self, name: str, dest: Path) -> None:
        shutil.copyfile(self.path / name, dest)

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)


class ObjectStoreDestination:
    """Object storage through obstore (``pip install 'kissbot[s3]'``)."""

    def __init__(self, url: str) -> None:
        try:
            import obstore.store
        except ImportError as exc:
            raise BackupError(f"{url}: object storage needs obstore: pip install 'kissbot[s3]'") from exc
        self.label = url
        self._obstore = obstore
        with self._errors("open"):
            self._store = obstore.store.from_url(
                url,
                # http:// only when an endpoint such as a local MinIO says so; AWS's own endpoints are https.
                client_options={"allow_http": True, "connect_timeout": timedelta(seconds=10)},
                retry_config={
                    "max_retries": 4,
                    "retry_timeout": timedelta(seconds=60),
                    "backoff": {"init_backoff": timedelta(milliseconds=200), "max_backoff": timedelta(seconds=5), "base": 2},
                },
            )

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (self._obstore.exceptions.BaseError, FileNotFoundError, ValueError, OSError) as exc:
            raise BackupError(f"cannot {action} {self.label}: {_storage_reason(exc)}") from exc

    def list(self) -> dict[str, int]:
        with self._errors("list"):
            return {
                meta["path"]: meta["size"]
                for batch in self._obstore.list(self._store)
                for meta in batch
                if "/" not in meta["path"]
            }

    def put(self, name: str, source: Path) -> None:
        with self._errors(f"upload {name} to"):
            self._obstore.put(self._store, name, source)

    def put_bytes(self, name: str, data: bytes) -> None:
        with self._errors(f"upload {name} to"):
            self._obstore.put(self._store, name, data)

    def download(self, name: str, dest: Path) -> None:
        with self._errors(f"download {name} from"), open(dest, "wb") as fh:
            for chunk in self._obstore.get(self._store, name).stream(min_chunk_size=_CHUNK):
                fh.write(chunk)

    def read(self, name: str) -> bytes:
        with self._errors(f"download {name} from"):
            return bytes(self._obstore.get(self._store, name).bytes())

    def delete(self, name: str) -> None:
        with self._errors(f"delete {name} from"):
            self._obstore.delete(self._store, name)


_CODE = re.compile(r"<Code>(\w+)</Code>")
_REASONS = {
    "NoSuchBucket": "no such bucket",
    "InvalidAccessKeyId": "wrong credentials (InvalidAccessKeyId): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "SignatureDoesNotMatch": "wrong credentials (SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "access denied: the credentials may not read, write and delete under this prefix",
}


def _storage_reason(exc: BaseException) -> str:
    """One line on why a storage call failed; never the server's whole answer."""
    text = str(exc)
    code = _CODE.search(text)
    if code:
        return _REASONS.get(code.group(1), code.group(1))
    if isinstance(exc, FileNotFoundError):
        return "not found"
    for hint, reason in (
        ("169.254.169.254", "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("Connection refused", "connection refused"),
        ("error sending request", "the server did not answer"),
        ("dns error", "unknown host"),
        ("timed out", "timed out"),
        ("Missing region", "no region: set AWS_REGION"),
        ("Missing bucket", "no bucket in the URL"),
    ):
        if hint.lower() in text.lower():
            return reason
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def open_destination(url: str | os.PathLike[str]) -> Destination:
    """The destination for a folder, ``file://`` URL, or object storage URL (``s3://bucket/prefix``, ``gs://``, ``az://``)."""
    text = os.fspath(url)
    parts = urlsplit(text)
    if parts.scheme == "file":
        return DirectoryDestination(Path(parts.path), text)
    if len(parts.scheme) <= 1:  # a path (or a Windows drive letter)
        return DirectoryDestination(Path(text), text)
    if parts.scheme in ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure"):
        if not parts.netloc:
            raise BackupError(f"{text}: no bucket in the URL (e.g. s3://my-bucket/kissbot)")
        return ObjectStoreDestination(text)
    raise BackupError(f"{text}: unsupported destination (use a folder, file://, s3://, gs:// or az://)")


def list_backups(url: str | os.PathLike[str] | Destination) -> list[BackupInfo]:
    """The complete backups at ``url`` (snapshots with a manifest), oldest first."""
    dest = url if not isinstance(url, (str, os.PathLike)) else open_destination(url)
    return _complete(dest.list())


def _complete(objects: dict[str, int]) -> list[BackupInfo]:
    found = []
    for name, size in objects.items():
        match = _NAME.match(name)
        if match and f"{match.group(1)}.json" in objects:
            created = datetime.strptime(match.group(2), _TIME_FORMAT).replace(tzinfo=timezone.utc)
            backend = "sqlite" if match.group(4) == SUFFIXES["sqlite"] else "postgresql"
            found.append(BackupInfo(name, created, match.group(3), backend, size))
    return sorted(found, key=lambda b: b.created_at)


# --- backup ---------------------------------------------------------------------------------------------------


def backup_to(store: str | os.PathLike[str], url: str | os.PathLike[str], *, now: datetime | None = None) -> BackupInfo:
    """Snapshot the store (a SQLite path or a database URL) and upload it to ``url``; return the new backup.

    The snapshot is checked (SQLite ``integrity_check``; a PostgreSQL dump is
    read back whole with ``pg_restore``) and must be a kissbot store at a known
    migration. The manifest is written last, so the backup is listed only once
    it is complete. Raises :class:`~kissbot.errors.BackupError` on any failure.
    """
    dest = open_destination(url)
    db_url = to_url(store)
    created = (now or utcnow()).astimezone(timezone.utc).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="kissbot-offsite-") as work:
        backend, revision, snapshot = _snapshot(db_url, Path(work))
        name = f"kissbot-{created:{_TIME_FORMAT}}-{revision}{SUFFIXES[backend]}"
        existing = dest.list()
        if name in existing or manifest_name(name) in existing:
            raise BackupError(f"backup {name} already exists in {dest.label}")
        digest, size = _sha256(snapshot)
        dest.put(name, snapshot)
        manifest = {
            "format": "kissbot-offsite-backup", "version": 1, "snapshot": name, "created_at": created.isoformat(),
            "backend": backend, "revision": revision, "size": size, "sha256": digest, "kissbot": __version__,
        }
        dest.put_bytes(manifest_name(name), json.dumps(manifest, indent=2).encode())
    log.info("uploaded backup %s (%d bytes) to %s", name, size, dest.label)
    return BackupInfo(name, created, revision, backend, size)


def _snapshot(db_url: Any, work: Path) -> tuple[str, str, Path]:
    path = sqlite_path(db_url)
    if path is not None:
        copy = backup_sqlite(path, work / "snapshot.db")
        revision = _sqlite_revision(copy, f"database {path}")
        packed = work / "snapshot.sqlite.gz"
        with open(copy, "rb") as src, gzip.open(packed, "wb", compresslevel=6) as out:
            shutil.copyfileobj(src, out, _CHUNK)
        return "sqlite", revision, packed
    if db_url.get_backend_name() == "postgresql":
        dump = work / "snapshot.pgdump"
        _pg_run("pg_dump", ["-Fc", "--no-owner", "--no-privileges", *_pg_schema_args(db_url), "-f", str(dump)], db_url)
        revision, _ = _read_pg_dump(dump, f"the dump of {_pg_label(db_url)}", with_tokens=False)
        return "postgresql", revision, dump
    raise UnsupportedBackend(f"off-site backups support SQLite files and PostgreSQL, not {db_url.get_backend_name()}")


def _sqlite_revision(path: Path, what: str) -> str:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
    finally:
        conn.close()
    return _known_revision(row[0] if row else None, tables, what)


def _known_revision(revision: str | None, tables: set[str], what: str) -> str:
    if not KISSBOT_TABLES <= tables or revision is None:
        raise BackupError(f"{what} is not a kissbot database (no kissbot tables or no alembic_version)")
    if not re.fullmatch(r"[0-9A-Za-z_]+", revision) or not is_known_revision(revision):
        raise BackupError(f"{what} is at migration {revision}, which this kissbot version does not know")
    return revision


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# --- PostgreSQL through pg_dump / pg_restore ------------------------------------------------------------------


def _pg_schema(db_url: Any) -> str | None:
    """The schema named by ``options=-csearch_path=…`` in the URL, if any."""
    match = re.search(r"search_path\s*=\s*([^\s,]+)", str(db_url.query.get("options", "")))
    return match.group(1).strip('"') if match else None


def _pg_schema_args(db_url: Any) -> list[str]:
    schema = _pg_schema(db_url)
    return ["-n", schema] if schema else []


def _pg_label(db_url: Any) -> str:
    return db_url.render_as_string(hide_password=True)


def _pg_run(tool: str, args: list[str], db_url: Any | None, *, lock_timeout: bool = False) -> str:
    """Run a PostgreSQL client tool; the password goes through PGPASSWORD, never the command line."""
    exe = shutil.which(tool)
    if exe is None:
        raise BackupError(
            f"{tool} is not installed: install the PostgreSQL client tools (e.g. apt-get install postgresql-client)"
        )
    env = dict(os.environ)
    command = [exe, *args]
    if db_url is not None:
        conninfo = db_url.set(drivername="postgresql", password=None)
        command.append(f"--dbname={conninfo.render_as_string(hide_password=False)}")
        if db_url.password is not None:
            env["PGPASSWORD"] = str(db_url.password)
        if lock_timeout:
            env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} -c lock_timeout={PG_LOCK_TIMEOUT}".strip()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
        detail = lines[0] if lines else f"exit status {result.returncode}"
        what = _pg_label(db_url) if db_url is not None else "the dump"
        raise BackupError(f"{tool} failed on {what}: {detail.removeprefix(f'{tool}: ')}")
    return result.stdout


def _read_pg_dump(path: Path, what: str, *, with_tokens: bool) -> tuple[str, list[tuple[Any, str | None, str | None]]]:
    """Read a ``pg_dump -Fc`` archive whole; return its kissbot revision and (if asked) its token rows.

    pg_restore decompresses every data block to print it, so a damaged archive fails here.
    """
    toc = _pg_run("pg_restore", ["--list", str(path)], None)
    tables = {m.group(1) for m in re.finditer(r"^\d+; \d+ \d+ TABLE \S+ (\S+) ", toc, re.M)}
    revision, rows = None, []
    proc = subprocess.Popen(
        [shutil.which("pg_restore") or "pg_restore", "--data-only", "-f", "-", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    table: str | None = None
    columns: list[str] = []
    for line in proc.stdout:
        if table is None:
            header = re.match(r"COPY (?:\S+\.)?(\w+) \(([^)]*)\) FROM stdin;", line)
            if header:
                table, columns = header.group(1), [c.strip().strip('"') for c in header.group(2).split(",")]
            continue
        if line.startswith("\\."):
            table = None
            continue
        values = dict(zip(columns, line.rstrip("\n").split("\t")))
        if table == "alembic_version":
            revision = values.get("version_num")
        elif table == "oauth_tokens" and with_tokens:
            rows.append((values.get("user_id"), _copy_value(values.get("access_token_encrypted")),
                         _copy_value(values.get("refresh_token_encrypted"))))
    stderr = proc.stderr.read()
    if proc.wait() != 0:
        first = next((ln for ln in stderr.splitlines() if ln.strip()), "unreadable archive")
        raise BackupError(f"{what} is not a readable pg_dump archive: {first.removeprefix('pg_restore: ')}")
    return _known_revision(revision, tables, what), rows


def _copy_value(value: str | None) -> str | None:
    return None if value in (None, "\\N") else value


# --- restore --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OffsiteRestoreReport:
    """What :func:`restore_from` did."""

    backup: BackupInfo
    tokens_checked: int
    """Users whose tokens were decrypted with the current key before restoring."""
    previous_backup: Path | None
    """The local copy of the database that was replaced."""


def choose_backup(backups: list[BackupInfo], at: datetime | None, label: str) -> BackupInfo:
    """The newest of ``backups`` taken at or before ``at`` (the newest of all without ``at``)."""
    if not backups:
        raise BackupError(f"no backups in {label}")
    if at is None:
        return backups[-1]
    at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
    candidates = [b for b in backups if b.created_at <= at]
    if not candidates:
        raise BackupError(
            f"no backup in {label} at or before {at.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC "
            f"(the oldest is {backups[0].created_at:%Y-%m-%d %H:%M:%S} UTC)"
        )
    return candidates[-1]


def restore_from(
    url: str | os.PathLike[str],
    store: str | os.PathLike[str],
    cipher: TokenCipher,
    *,
    at: datetime | None = None,
    previous_dir: Path | None = None,
) -> OffsiteRestoreReport:
    """Download the newest backup at ``url`` (taken at or before ``at``), verify it, and restore it into ``store``.

    The download must match its manifest's size and SHA-256, be a kissbot store
    at a known migration, and every token must decrypt with ``cipher``; else
    :class:`~kissbot.errors.BackupError` and nothing is changed. A SQLite store
    is then restored by :func:`kissbot.backup.restore_sqlite` (every bot
    stopped, the current file backed up beside it, an atomic swap). A
    PostgreSQL store is first dumped to ``previous_dir`` (default: the current
    folder), then restored by ``pg_restore`` in one transaction.
    """
    dest = open_destination(url)
    chosen = choose_backup(list_backups(dest), at, dest.label)
    label = f"{dest.label.rstrip('/')}/{chosen.name}"
    db_url = to_url(store)
    target = sqlite_path(db_url)
    target_backend = "sqlite" if target is not None else db_url.get_backend_name()
    if chosen.backend != target_backend:
        raise BackupError(f"{label} is a {chosen.backend} backup; it cannot be restored into a {target_backend} store")
    with tempfile.TemporaryDirectory(prefix="kissbot-offsite-") as work:
        download = Path(work, chosen.name)
        _download_verified(dest, chosen, download, label)
        if target is not None:
            snapshot = Path(work, chosen.name.removesuffix(".gz"))
            try:
                with gzip.open(download, "rb") as src, open(snapshot, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            except (OSError, EOFError) as exc:
                raise BackupError(f"{label} is corrupted ({exc}); nothing restored") from exc
            try:
                report = restore_sqlite(snapshot, target, cipher)
            except KissbotError as exc:
                raise type(exc)(str(exc).replace(str(snapshot), label)) from exc
            return OffsiteRestoreReport(chosen, report.tokens_checked, report.previous_backup)
        checked = _check_pg_dump(download, label, cipher)
        previous = _pg_previous_copy(db_url, previous_dir or Path.cwd())
        _pg_run(
            "pg_restore",
            ["--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error",
             str(download)],
            db_url, lock_timeout=True,
        )
        return OffsiteRestoreReport(chosen, checked, previous)


def _download_verified(dest: Destination, chosen: BackupInfo, download: Path, label: str) -> None:
    try:
        manifest = json.loads(dest.read(chosen.manifest))
        expected_sha, expected_size = str(manifest["sha256"]), int(manifest["size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{label}: its manifest {chosen.manifest} is unreadable; nothing restored") from exc
    dest.download(chosen.name, download)
    digest, size = _sha256(download)
    if (digest, size) != (expected_sha, expected_size):
        raise BackupError(
            f"{label} is corrupted: {size} bytes with SHA-256 {digest[:12]}…, its manifest says {expected_size} "
            f"bytes with {expected_sha[:12]}…; nothing restored"
        )


def _check_pg_dump(dump: Path, label: str, cipher: TokenCipher) -> int:
    try:
        _, rows = _read_pg_dump(dump, label, with_tokens=True)
    except BackupError as exc:
        raise BackupError(f"{exc}; nothing restored") from exc
    check = verify_tokens(rows, cipher)
    if check.failed_user_ids:
        raise BackupError(
            f"{label}: tokens of {len(check.failed_user_ids)} of {check.checked} users do not decrypt with "
            "the current key (made with another key?); nothing restored"
        )
    return check.checked


def _pg_previous_copy(db_url: Any, folder: Path) -> Path:
    """Dump (``pg_dump -Fc``) the PostgreSQL store about to be replaced to ``<database>.backup_YYYYMMDD_HHMMSS`` (0600) in ``folder``."""
    dest = default_backup_path(folder / (db_url.database or "kissbot"))
    tmp = _private_temp_file(dest)
    try:
        _pg_run("pg_dump", ["-Fc", "--no-owner", "--no-privileges", *_pg_schema_args(db_url), "-f", str(tmp)], db_url)
        _install_new(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --- retention and schedule -----------------------------------------------------------------------------------


def prune_backups(url: str | os.PathLike[str] | Destination, policy: Retention, *, now: datetime | None = None) -> list[BackupInfo]:
    """Delete the backups ``policy`` does not keep (never the newest); return them, oldest first.

    A manifest goes before its snapshot, so a backup is never listed half
    deleted. Snapshots left without a manifest for :data:`ORPHAN_AGE` (uploads
    that died) are deleted too.
    """
    dest = url if not isinstance(url, (str, os.PathLike)) else open_destination(url)
    objects = dest.list()
    backups = _complete(objects)
    if not backups or not policy:
        return []
    kept = policy.keep(backups)
    gone = [b for b in backups if b.name not in kept]
    for backup in gone:
        dest.delete(backup.manifest)
        dest.delete(backup.name)
    listed = {b.name for b in backups}
    cutoff = (now or utcnow()) - ORPHAN_AGE
    for name in objects:
        match = _NAME.match(name)
        if match and name not in listed and datetime.strptime(match.group(2), _TIME_FORMAT).replace(tzinfo=timezone.utc) < cutoff:
            dest.delete(name)
    return gone


def parse_interval(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``1h``, ``1d`` as a timedelta (one second to 366 days)."""
    match = re.fullmatch(r"\s*(\d{1,12})\s*([smhd]?)\s*", text.lower())
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_INTERVAL_DAYS * 86400:
        raise ValueError(f"{echo(text)} is not an interval from 1s to {MAX_INTERVAL_DAYS}d such as 30s, 15m, 1h or 1d")
    return timedelta(seconds=seconds)


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (``2026-11-29T08:00:00Z``, ``2026-11-29 08:00``, ``2026-11-29``); no zone means UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise ValueError(f"{echo(text)} is not a time such as 2026-11-29T08:00:00Z") from None


def run_every(
    store: str | os.PathLike[str],
    url: str | os.PathLike[str],
    interval: timedelta,
    policy: Retention,
    stop: threading.Event,
    report: Callable[[BackupInfo | None, list[BackupInfo], KissbotError | None], None],
) -> bool:
    """Back up, then prune, every ``interval`` until ``stop`` is set; return whether the last run succeeded.

    A run in progress when ``stop`` is set is finished (its upload completes or
    fails as a whole) before returning. A failed run is reported and retried at
    the next interval.
    """
    ok = False
    while not stop.is_set():
        try:
            info = backup_to(store, url)
            gone = prune_backups(url, policy) if policy else []
        except KissbotError as exc:
            ok = False
            report(None, [], exc)
        else:
            ok = True
            report(info, gone, None)
        stop.wait(interval.total_seconds())
    return ok
