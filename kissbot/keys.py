"""A store's keys: where they come from, their fingerprints, rotation, retirement and reset.

Key sources, first match wins: a ``key=`` given in code, the ``KISSBOT_KEY``
environment variable (a Fernet key, or several comma-separated, newest first,
optionally written ``v<N>:<key>``), then the key file (``--key-file`` /
``key_file=``, else ``KISSBOT_KEY_FILE``, else ``.kissbot.key`` beside the
database; see :func:`default_key_file`).

The store records a fingerprint of each key version in its ``config`` table
(``key_fingerprint_v<N>``; see :func:`kissbot.crypto.fingerprint`, never the
key), so a wrong key, or a key file missing a version that rows still use, is
refused at open, naming the key's source, before any token is decrypted.

Rotation adds a version to the key file (written atomically before anything
is re-encrypted), re-encrypts token rows in short batches, recording each
row's ``key_version``, then sets ``encryption_key_version``. Killed at any
point it can be run again: it resumes, and every row stays readable with the
key file throughout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Text, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import IntegrityError

from kissbot.crypto import (
    DEFAULT_KEY_FILE,
    MAX_KEY_VERSION,
    POINT_ELSEWHERE,
    KeyFileCipher,
    KeyRing,
    TokenCipher,
    backup_notice,
    create_key_file,
    decrypts_with,
    fingerprint,
    generate_key,
    key_file_lock,
    read_key_ring,
    write_key_file,
)
from kissbot import settings
from kissbot.engine import write_transaction, writer
from kissbot.errors import CorruptConfig, DecryptionError, KeyFileError, ValidationError
from kissbot.models import config, oauth_tokens
from kissbot.repo import AuditRepository, TokenRepository
from kissbot.types import ciphertext, utcnow
from kissbot.urls import sqlite_path, to_url
from kissbot.validation import check_count

ENV_KEY = "KISSBOT_KEY"
ENV_KEY_FILE = "KISSBOT_KEY_FILE"
FINGERPRINT_KEY = "key_fingerprint_v{}"
KEY_VERSION_KEY = "encryption_key_version"
ROTATE_BATCH_SIZE = 500
MAX_BATCH_SIZE = 100_000
"""Most token rows re-encrypted in one transaction."""
log = logging.getLogger(__name__)
_PROBE_ROWS = 5

@dataclass(frozen=True)
class KeySource:
    """Where a store's keys come from: ``kind`` is ``"file"``, ``"env"`` or ``"argument"``.

    ``ring`` holds the keys of the env and argument sources (its repr shows
    fingerprints only); a file source is read when the store opens.
    """

    kind: str
    path: Path | None = None
    ring: KeyRing | None = None

    @property
    def label(self) -> str:
        """How errors name this source."""
        if self.kind == "file":
            return f"key file {self.path}"
        return ENV_KEY if self.kind == "env" else "the given key"


def default_key_file(db: str | os.PathLike[str] | URL | None = None) -> Path:
    """The key file of the store ``db`` when none is named: ``.kissbot.key`` beside a SQLite database.

    For a URL, an in-memory database or no ``db``, it is ``.kissbot.key`` in
    the current directory. An existing database whose key is only in the
    current directory (where kissbot looked before) keeps using it, with a
    warning saying where to move it. The path is absolute.
    """
    here = Path(os.path.abspath(DEFAULT_KEY_FILE))
    path = sqlite_path(to_url(db)) if db is not None else None
    if path is None:
        return here
    beside = Path(os.path.abspath(path)).parent / DEFAULT_KEY_FILE
    if beside != here and not os.path.lexists(beside) and os.path.lexists(here) and path.exists():
        log.warning(
            "using key file %s (the current directory) for %s: kissbot looks beside the database first, "
            "move the key to %s",
            here, path, beside,
        )
        return here
    return beside


def resolve_key_source(
    key: KeyRing | bytes | str | list[bytes] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    db: str | os.PathLike[str] | URL | None = None,
) -> KeySource:
    """Pick the key source: ``key``, else ``KISSBOT_KEY``, else the key file.

    The key file is ``key_file``, else ``KISSBOT_KEY_FILE``, else
    :func:`default_key_file` of the store ``db`` (``.kissbot.key`` beside
    it). A key given in code wins over the environment (a test's key is never
    replaced by the operator's); ``KISSBOT_KEY`` wins over every key file.
    """
    environ = os.environ if environ is None else environ
    if key is not None:
        return KeySource("argument", ring=KeyRing.of(key))
    value = environ.get(ENV_KEY, "").strip()
    if value:
        fix = "set it to a Fernet key, or several comma-separated, newest first"
        return KeySource("env", ring=KeyRing.parse(value.split(","), ENV_KEY, fix))
    if key_file is None:
        key_file = environ.get(ENV_KEY_FILE) or default_key_file(db)
    return KeySource("file", path=Path(os.path.abspath(key_file)))


# --- what the store knows --------------------------------------------------------------------


@dataclass(frozen=True)
class _StoreKeys:
    recorded: dict[int, str]
    in_use: tuple[int, ...]
    """The key versions that label at least one token row, ascending."""
    current: int
    corrupt_current: bool = False
    """``encryption_key_version`` was not a valid version: ``current`` is derived from the rows."""

    @property
    def highest(self) -> int:
        return max([self.current, *self.recorded, *self.in_use])


def _versions_in_use(conn: Connection) -> tuple[int, ...]:
    # One probe of idx_oauth_key_version per version (the smallest one above the last found):
    # the same cost at 100 or 100,000 tokens, where a GROUP BY reads every row.
    key_version = oauth_tokens.c.key_version
    found: list[int] = []
    probe = select(func.min(key_version))
    while (version := conn.execute(probe).scalar()) is not None:
        found.append(version)
        probe = select(func.min(key_version)).where(key_version > version)
    return tuple(found)


def _row_count(conn: Connection, version: int) -> int:
    return conn.execute(select(func.count()).where(oauth_tokens.c.key_version == version)).scalar_one()


def _row_counts(conn: Connection) -> dict[int, int]:
    # Every row read: for the key commands (status, rotate), never when a store opens.
    by_version = select(oauth_tokens.c.key_version, func.count()).group_by(oauth_tokens.c.key_version)
    return {version: count for version, count in conn.execute(by_version)}


def _store_keys(conn: Connection) -> _StoreKeys:
    # Config rows that are not what kissbot writes (by hand in SQL, or from
    # before values were checked) never stop a store from opening: a malformed
    # fingerprint counts as not recorded, a corrupt encryption_key_version is
    # derived from the rows; verify_key records both again.
    recorded = {}
    for key, value in conn.execute(
        select(config.c.key, config.c.value).where(config.c.key.startswith(FINGERPRINT_KEY.format("")))
    ):
        version = settings.fingerprint_version(key)
        if version is not None and settings.is_fingerprint(value):
            recorded[version] = value
    in_use = _versions_in_use(conn)
    try:
        return _StoreKeys(recorded, in_use, settings.value(conn, KEY_VERSION_KEY))
    except CorruptConfig:
        return _StoreKeys(recorded, in_use, max(in_use, default=1), corrupt_current=True)


def _set_key_version(conn: Connection, version: int) -> None:
    # encryption_key_version is internal: ConfigRepository.set_config refuses it.
    now = utcnow()
    done = conn.execute(update(config).where(config.c.key == KEY_VERSION_KEY).values(value=str(version), updated_at=now))
    if done.rowcount == 0:
        description = settings.SETTINGS[KEY_VERSION_KEY].description
        conn.execute(insert(config).values(key=KEY_VERSION_KEY, value=str(version), description=description, updated_at=now))


def _problems(conn: Connection, ring: KeyRing, label: str, db: str, known: _StoreKeys) -> list[str]:
    problems = []
    for version, fp in ring.fingerprints().items():
        stored = known.recorded.get(version)
        if stored is not None and stored != fp:
            problems.append(
                f"{label} does not match {db}: key version {version} has fingerprint {fp} but the store "
                f"recorded {stored}; use the key this store was written with (restore it from your backup, "
                f"or point to it with {POINT_ELSEWHERE})"
            )
        elif stored is None and version in known.in_use and not _probe(conn, ring.key(version), version):
            problems.append(
                f"{label} does not decrypt the tokens in {db} (key version {version}); "
                f"use the key they were written with (restore it from your backup, or point to it with {POINT_ELSEWHERE})"
            )
    for version in known.in_use:
        if version not in ring.versions:
            problems.append(
                f"{label} lacks key version {version}, which encrypts {_row_count(conn, version)} token rows in {db}; "
                f"restore the key file from your backup, or point to one that has it with {POINT_ELSEWHERE}"
            )
    return problems


def _probe(conn: Connection, key: bytes, version: int) -> bool:
    # A version the store never fingerprinted (a store from before fingerprints):
    # trust it only if it decrypts some of the rows labelled with it.
    stmt = (
        select(ciphertext(oauth_tokens.c.access_token_encrypted))
        .where(oauth_tokens.c.key_version == version)
        .order_by(oauth_tokens.c.id)
        .limit(_PROBE_ROWS)
    )
    return any(decrypts_with(key, value) for value in conn.execute(stmt).scalars())


def check_key(engine: Engine, ring: KeyRing, label: str = "key", db: str = "the store") -> list[str]:
    """Why ``ring`` cannot open the store at ``engine``, as one-line messages (empty: it can).

    Read-only: compares each version's fingerprint with the one the store
    recorded, checks that every version used by a token row is present, and
    test-decrypts a few rows of any version the store has not fingerprinted.
    ``label`` and ``db`` name the key's source and the store in the messages.
    """
    with engine.connect() as conn:
        return _problems(conn, ring, label, db, _store_keys(conn))


def verify_key(engine: Engine, ring: KeyRing, label: str = "key", db: str = "the store") -> None:
    """Refuse ``ring`` with :class:`KeyFileError` if :func:`check_key` finds a problem; else record it.

    Records the fingerprint of every version the store has not seen yet (the
    first open of a store records its key), and on a store without tokens
    makes the ring's primary the ``encryption_key_version``. Writes only when
    there is something to record.
    """
    with engine.connect() as conn:
        known = _store_keys(conn)
        problems = _problems(conn, ring, label, db, known)
    if problems:
        raise KeyFileError(problems[0])
    missing = [v for v in ring.versions if v not in known.recorded]
    adopt = not known.in_use and known.current < ring.primary
    if not missing and not adopt and not known.corrupt_current:
        return
    with writer(engine).begin() as conn:
        for version in missing:
            if not _record_fingerprint(conn, version, ring.key(version)):
                if _store_keys(conn).recorded.get(version) != fingerprint(ring.key(version)):
                    raise KeyFileError(
                        f"{label} does not match {db}: another process recorded a different key version {version}"
                    )
        if adopt and not TokenRepository(conn).count():
            _set_key_version(conn, ring.primary)
        elif known.corrupt_current:
            _set_key_version(conn, known.current)


def _record_fingerprint(conn: Connection, version: int, key: bytes) -> bool:
    """Record the fingerprint of ``version`` unless a well-formed one is; True if recorded."""
    name = FINGERPRINT_KEY.format(version)
    stored = conn.execute(select(config.c.value).where(config.c.key == name)).first()
    if stored is not None:
        if settings.is_fingerprint(stored.value):
            return False
        conn.execute(update(config).where(config.c.key == name).values(value=fingerprint(key), updated_at=utcnow()))
        return True
    try:
        with conn.begin_nested():
            conn.execute(
                insert(config).values(
                    key=name,
                    value=fingerprint(key),
                    description=f"Fingerprint of encryption key version {version} (not the key)",
                    updated_at=utcnow(),
                )
            )
    except IntegrityError:
        return False
    return True


def read_key_source(source: KeySource) -> TokenCipher | None:
    """The cipher of ``source`` before any store is touched, or None if its key file does not exist yet.

    Reading (and refusing) the key first means a bad key file leaves the
    database untouched. A file source gives a
    :class:`~kissbot.crypto.KeyFileCipher`, which follows rotations.
    """
    if source.kind != "file":
        assert source.ring is not None
        return TokenCipher(source.ring)
    assert source.path is not None
    if not (source.path.exists() or source.path.is_symlink()):
        return None
    return KeyFileCipher(source.path)


def load_cipher(
    engine: Engine,
    source: KeySource,
    db: str,
    cipher: TokenCipher | None = None,
    *,
    create: bool = True,
    need_key: bool = True,
) -> TokenCipher | None:
    """The cipher of the store at ``engine``, from ``source``, verified against the store.

    ``cipher`` is what :func:`read_key_source` returned, if the caller read it
    first. A missing key file is created (atomically, mode 0600) only when
    the store holds no tokens; otherwise it is an error naming the file and
    the number of users whose tokens it would orphan. With ``create=False``
    nothing is written: a missing key file gives None (on a store without
    tokens) and fingerprints are checked but not recorded. With
    ``need_key=False`` a missing key file gives None even on a store with
    tokens (they then do not decrypt).
    """
    if cipher is None:
        cipher = read_key_source(source)
    if cipher is None:
        path = source.path
        assert path is not None
        with engine.connect() as conn:
            known = _store_keys(conn)
            holders = TokenRepository(conn).count_users_with_tokens() if known.in_use else 0
        if holders and need_key:
            raise KeyFileError(
                f"key file {path} not found but {db} holds tokens for {holders} users; "
                f"restore the key from your backup, or point to it with {POINT_ELSEWHERE}"
            )
        if holders or not create:
            return None
        create_key_file(path, version=known.highest + 1 if known.recorded else 1)
        cipher = KeyFileCipher(path)
    if create:
        verify_key(engine, cipher.ring, source.label, db)
    else:
        problems = check_key(engine, cipher.ring, source.label, db)
        if problems:
            raise KeyFileError(problems[0])
    return cipher


# --- status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyVersionStatus:
    """One key version as the key source and the store see it."""

    version: int
    fingerprint: str | None
    recorded_fingerprint: str | None
    rows: int
    primary: bool

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "recorded_fingerprint": self.recorded_fingerprint,
            "rows": self.rows,
            "primary": self.primary,
        }


@dataclass(frozen=True)
class KeyStatus:
    """Key versions of a store, newest first, and what is wrong (``problems``)."""

    source: str
    encryption_key_version: int
    versions: list[KeyVersionStatus]
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "source": self.source,
            "encryption_key_version": self.encryption_key_version,
            "versions": [v.as_dict() for v in self.versions],
            "problems": list(self.problems),
        }


def _source_ring(source: KeySource) -> KeyRing:
    if source.kind == "file":
        assert source.path is not None
        return read_key_ring(source.path)
    assert source.ring is not None
    return source.ring


def key_status(engine: Engine, source: KeySource, db: str = "the store") -> KeyStatus:
    """Versions, fingerprints and token rows per version; works even when the key is wrong or missing."""
    problems: list[str] = []
    ring: KeyRing | None
    try:
        ring = _source_ring(source)
    except KeyFileError as exc:
        ring, problems = None, [str(exc)]
    with engine.connect() as conn:
        known = _store_keys(conn)
        rows = _row_counts(conn)
        if ring is not None:
            problems = _problems(conn, ring, source.label, db, known)
    ours = ring.fingerprints() if ring is not None else {}
    versions = sorted(set(ours) | set(known.recorded) | set(rows), reverse=True)
    return KeyStatus(
        source=source.label,
        encryption_key_version=known.current,
        versions=[
            KeyVersionStatus(
                version=v,
                fingerprint=ours.get(v),
                recorded_fingerprint=known.recorded.get(v),
                rows=rows.get(v, 0),
                primary=ring is not None and v == ring.primary,
            )
            for v in versions
        ],
        problems=problems,
    )


# --- rotation, retirement, reset --------------------------------------------------------------


def writable_key_file(source: KeySource, action: str) -> Path:
    """The key file of ``source``; raise :class:`KeyFileError` if keys come from elsewhere (``action`` says why)."""
    if source.kind != "file":
        raise KeyFileError(
            f"keys come from {source.label}, which kissbot cannot rewrite: to {action}, unset {ENV_KEY} and use "
            f"a key file holding the same keys (--key-file), then give {ENV_KEY} the file's new keys"
        )
    assert source.path is not None
    return source.path


@dataclass(frozen=True)
class RotationResult:
    """What :func:`rotate_keys` did: re-encrypted ``rows`` from older versions to ``to_version``."""

    to_version: int
    fingerprint: str
    rows: int
    resumed: bool


def pending_rotation(engine: Engine, source: KeySource) -> tuple[int, int]:
    """``(target version, token rows not yet at it)`` that :func:`rotate_keys` would re-encrypt now.

    The target is the key file's primary version if a rotation to it is
    unfinished, else the version a new rotation would add.
    """
    ring = _source_ring(source)
    with engine.connect() as conn:
        known = _store_keys(conn)
        rows = _row_counts(conn)
    if ring.primary > known.current or any(v != ring.primary for v in known.in_use):
        return ring.primary, sum(n for v, n in rows.items() if v != ring.primary)
    return _next_version(known, ring), sum(rows.values())


def _next_version(known: _StoreKeys, ring: KeyRing) -> int:
    version = max(known.highest, *ring.versions) + 1
    if version > MAX_KEY_VERSION:
        raise KeyFileError(
            f"cannot rotate: key version {version - 1} is the highest there can be ({MAX_KEY_VERSION}); "
            "keep using it, or start again from a new key with kissbot key reset (which deletes every token)"
        )
    return version


def rotate_keys(
    engine: Engine,
    source: KeySource,
    *,
    db: str = "the store",
    batch_size: int = ROTATE_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> RotationResult:
    """Rotate the store's key: add a new key version, re-encrypt every token row with it.

    If an earlier rotation did not finish (the key file's newest version is
    newer than ``encryption_key_version``, or rows still use older versions),
    this finishes it instead of adding another version. The new key's
    fingerprint is claimed in the store, then the key file is rewritten
    atomically with the new key first and the old ones kept, before any row
    is touched. Rows are then re-encrypted ``batch_size`` at a time, each
    batch its own short write transaction, never overwriting a row a bot
    rewrote meanwhile (bots pick up the new key from the file and write with
    it; a row still at an older version is re-encrypted by a later pass).
    ``progress`` is called with the number of rows each batch re-encrypted. Finally
    ``encryption_key_version`` is set and the rotation audited.

    Raises :class:`ValidationError` for a ``batch_size`` outside
    1..:data:`MAX_BATCH_SIZE` or a ``progress`` that is not callable, before
    anything is written; :class:`DecryptionError` (naming the first user) if
    rows cannot be decrypted with any key: they keep their old version, the
    rotation stays unfinished and the old key must be kept.
    """
    check_count(batch_size, "batch_size", 1, MAX_BATCH_SIZE)
    if progress is not None and not callable(progress):
        raise ValidationError(f"progress must be callable, not {type(progress).__name__}")
    path = writable_key_file(source, "rotate keys")
    with key_file_lock(path):
        ring = read_key_ring(path)
        verify_key(engine, ring, source.label, db)
        with engine.connect() as conn:
            known = _store_keys(conn)
        resumed = ring.primary > known.current or any(v != ring.primary for v in known.in_use)
        if not resumed:
            ring = _add_version(engine, path, ring, _next_version(known, ring), source.label)
    target = ring.primary
    cipher = TokenCipher(ring)
    done, failed = _reencrypt(engine, cipher, batch_size, progress)
    if failed:
        first = failed[0]
        raise DecryptionError(
            f"rotation to key version {target} is unfinished: {len(failed)} token rows cannot be decrypted "
            f"(first: user {first[0]}, {first[1]}, key version {first[2]}); store new tokens for them "
            "(re-authorise) and run kissbot key rotate again",
            user_id=first[0],
            key_version=first[2],
        )
    with writer(engine).begin() as conn:
        _set_key_version(conn, target)
        AuditRepository(conn).log_event(
            "key_rotated",
            details={"to_version": target, "fingerprint": fingerprint(ring.key(target)), "rows": done, "resumed": resumed},
            severity="warning",
        )
    return RotationResult(target, fingerprint(ring.key(target)), done, resumed)


def _add_version(engine: Engine, path: Path, ring: KeyRing, version: int, label: str) -> KeyRing:
    key = generate_key()
    with writer(engine).begin() as conn:
        if not _record_fingerprint(conn, version, key):
            raise KeyFileError(f"key version {version} is already recorded by another rotation; run kissbot key status")
        AuditRepository(conn).log_event(
            "key_rotation_started",
            details={"from_version": ring.primary, "to_version": version, "fingerprint": fingerprint(key)},
            severity="warning",
        )
    new_ring = ring.adding(version, key)
    write_key_file(path, new_ring)
    backup_notice(path, new_ring, f"key version {version} added (earlier backups of the key file lack it)")
    return new_ring


_REENCRYPT_ROW = (
    update(oauth_tokens)
    .where(
        oauth_tokens.c.id == bindparam("p_id"),
        oauth_tokens.c.version == bindparam("p_version"),
        oauth_tokens.c.key_version == bindparam("p_key_version"),
    )
    .values(
        access_token_encrypted=bindparam("p_access", type_=Text),
        refresh_token_encrypted=bindparam("p_refresh", type_=Text),
        key_version=bindparam("p_target"),
    )
)


def _reencrypt(
    engine: Engine, cipher: TokenCipher, batch_size: int, progress: Callable[[int], None] | None
) -> tuple[int, list[tuple[int, str, int]]]:
    target = cipher.current_version
    ring = cipher.ring
    # A row is decrypted with the key its key_version names, not by trying the
    # ring's keys newest first (a failed HMAC per token); the whole ring is the
    # fallback for a row whose label is wrong.
    own = {v: TokenCipher(KeyRing(((v, ring.key(v)),))) for v in ring.versions if v != target}
    t = oauth_tokens.c
    pending = (
        select(t.id, t.user_id, t.token_type, t.version, t.key_version,
               ciphertext(t.access_token_encrypted), ciphertext(t.refresh_token_encrypted))
        .where(t.key_version != target, t.id > bindparam("after"))
        .order_by(t.id)
        .limit(batch_size)
    )

    def reencrypt(stored: str, version: int) -> str:
        decrypting = own.get(version)
        try:
            plaintext = (decrypting or cipher).decrypt(stored)
        except DecryptionError:
            if decrypting is None:
                raise
            plaintext = cipher.decrypt(stored)
        return cipher.encrypt(plaintext)

    # Passes go on until one finds nothing left to write back (rows that do
    # not decrypt stay behind): a row a bot rewrote between the read and the
    # UPDATE is not matched by it, and is picked up by the next pass.
    done = 0
    while True:
        tried, after, failed = 0, 0, []
        while True:
            with write_transaction(engine) as conn:
                batch = conn.execute(pending, {"after": after}).all()
                if not batch:
                    break
                params = []
                for row_id, user_id, token_type, version, key_version, access, refresh in batch:
                    try:
                        params.append({
                            "p_id": row_id, "p_version": version, "p_key_version": key_version, "p_target": target,
                            "p_access": reencrypt(access, key_version), "p_refresh": reencrypt(refresh, key_version),
                        })
                    except DecryptionError:
                        failed.append((user_id, token_type, key_version))
                # rowcount is exact (the sum over the rows) only on drivers that say so.
                if not params:
                    count = 0
                elif conn.dialect.supports_sane_multi_rowcount:
                    count = conn.execute(_REENCRYPT_ROW, params).rowcount
                else:
                    count = sum(conn.execute(_REENCRYPT_ROW, p).rowcount for p in params)
            after = batch[-1][0]
            tried += len(params)
            done += count
            if progress is not None:
                progress(count)
        if not tried:
            return done, failed


def retire_key(engine: Engine, source: KeySource, version: int, *, db: str = "the store") -> str:
    """Remove key ``version`` from the key file; return its fingerprint.

    Refuses while any token row still uses it, and refuses the primary
    version. The file is rewritten atomically; the retirement is audited.
    A ``version`` that is not an integer from 1 to :data:`MAX_KEY_VERSION`
    raises :class:`ValidationError`.
    """
    check_count(version, "version", 1, MAX_KEY_VERSION)
    path = writable_key_file(source, "retire a key")
    with key_file_lock(path):
        ring = read_key_ring(path)
        problems = check_key(engine, ring, source.label, db)  # read-only: a refused retire records nothing
        if problems:
            raise KeyFileError(problems[0])
        if version not in ring.versions:
            held = ", ".join(map(str, ring.versions))
            raise KeyFileError(f"key file {path} has no key version {version} (it holds {held})")
        if version == ring.primary:
            raise KeyFileError(
                f"key version {version} is the primary key of {path}: run kissbot key rotate, then retire it"
            )
        with engine.connect() as conn:
            rows = _row_count(conn, version)
        if rows:
            raise KeyFileError(
                f"key version {version} still encrypts {rows} token rows: run kissbot key rotate first"
            )
        write_key_file(path, ring.without(version))
    fp = fingerprint(ring.key(version))
    with writer(engine).begin() as conn:
        AuditRepository(conn).log_event(
            "key_retired", details={"version": version, "fingerprint": fp}, severity="warning"
        )
    return fp


@dataclass(frozen=True)
class ResetResult:
    """What :func:`reset_keys` did."""

    tokens_deleted: int
    users: int
    version: int
    fingerprint: str


def token_holders(engine: Engine) -> tuple[int, int]:
    """``(users, token rows)`` that :func:`reset_keys` would delete."""
    with engine.connect() as conn:
        repo = TokenRepository(conn)
        return repo.count_users_with_tokens(), repo.count()


def reset_keys(engine: Engine, source: KeySource) -> ResetResult:
    """Delete every token and start over with a new key (for a lost or leaked key).

    Needs no working key. In one transaction it deletes all token rows, forgets
    the old fingerprints, records the new key's and audits the reset; then it
    replaces the key file atomically. Version numbers keep growing, so a key
    is never confused with an older one. Users must authorise again.
    """
    path = writable_key_file(source, "reset the key")
    with key_file_lock(path):
        try:
            old_versions: tuple[int, ...] = read_key_ring(path).versions
        except KeyFileError:
            old_versions = ()
        key = generate_key()
        with writer(engine).begin() as conn:
            repo = TokenRepository(conn)
            users, rows = repo.count_users_with_tokens(), repo.count()
            known = _store_keys(conn)
            version = max(known.highest, *old_versions, 0) + 1
            conn.execute(delete(oauth_tokens))
            conn.execute(delete(config).where(config.c.key.startswith(FINGERPRINT_KEY.format(""))))
            _record_fingerprint(conn, version, key)
            _set_key_version(conn, version)
            AuditRepository(conn).log_event(
                "key_reset",
                details={"tokens_deleted": rows, "users": users, "version": version, "fingerprint": fingerprint(key)},
                severity="warning",
            )
        new_ring = KeyRing(((version, key),))
        write_key_file(path, new_ring)
    backup_notice(path, new_ring, "key reset")
    return ResetResult(rows, users, version, fingerprint(key))
