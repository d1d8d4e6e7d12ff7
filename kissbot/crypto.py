"""Fernet keys, key files and the cipher that encrypts token columns.

A :class:`TokenCipher` belongs to one store (it is attached to that store's
engine), so two stores with different keys work side by side in one process.

Key file format
---------------
A key file holds one or more numbered key versions, one per line, newest
first; blank lines and ``#`` comments are ignored::

    # kissbot key file: "v<version>:<Fernet key>" per line, newest first
    v2:kX3…=
    v1:Qm9…=

The highest version encrypts; every version decrypts. The specification's
file, a single bare Fernet key, is read as version 1 (and a store that never
rotated keeps that format). A key file must be a regular file (not a symlink)
that only its owner can read or write (mode 0600).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import logging
import os
import re
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from kissbot.errors import DecryptionError, KeyFileError

if TYPE_CHECKING:
    from cryptography.fernet import Fernet, MultiFernet

DEFAULT_KEY_FILE = ".kissbot.key"
MAX_KEY_VERSION = 2**31 - 1
"""The highest key version: token rows record it in an INTEGER column (32 bits on PostgreSQL)."""
_FERNET_PREFIX = "gAAAAA"
_FINGERPRINT_LABEL = b"kissbot key fingerprint v1"
_VERSIONED = re.compile(r"^v([1-9][0-9]*):(.*)$")
_HEADER = b'# kissbot key file: "v<version>:<Fernet key>" per line, newest first. Back it up; never commit it.\n'

log = logging.getLogger(__name__)


def _fernet() -> ModuleType:
    # cryptography (~15 ms to import) is loaded when something is encrypted or
    # decrypted: opening a store, reading its key file and checking its
    # fingerprints (HMAC), as `kissbot stats` does, needs none of it.
    import cryptography.fernet

    return cryptography.fernet


def generate_key() -> bytes:
    """Return a new random Fernet key."""
    return _fernet().Fernet.generate_key()


def fingerprint(key: bytes) -> str:
    """A short public fingerprint of ``key``: HMAC-SHA256 of a fixed label keyed by the key (16 hex digits).

    It identifies a key without revealing anything about it, and never changes
    (stores record it to recognise their key at open).
    """
    return hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def _valid(key: bytes) -> bool:
    # Fernet's own check of a key (32 bytes, URL-safe base64), without importing cryptography.
    try:
        return len(base64.urlsafe_b64decode(key)) == 32
    except (ValueError, TypeError, binascii.Error):
        return False


@dataclass(frozen=True, repr=False)
class KeyRing:
    """Numbered Fernet keys, newest first. The newest (``primary``) encrypts.

    Its repr shows versions and fingerprints, never a key.
    """

    keys: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyFileError("no encryption key given")
        for version, _ in self.keys:
            if not 1 <= version <= MAX_KEY_VERSION:
                raise KeyFileError(f"key version {version} is out of range: versions go from 1 to {MAX_KEY_VERSION}")
        ordered = tuple(sorted(self.keys, key=lambda vk: -vk[0]))
        if len({v for v, _ in ordered}) != len(ordered):
            raise KeyFileError("a key version appears twice")
        object.__setattr__(self, "keys", ordered)

    def __repr__(self) -> str:
        shown = ", ".join(f"v{v}={fingerprint(k)}" for v, k in self.keys)
        return f"<KeyRing {shown}>"

    @classmethod
    def of(cls, keys: KeyRing | Iterable[bytes | str] | bytes | str) -> KeyRing:
        """A ring from one key or several (newest first, numbered down to version 1)."""
        if isinstance(keys, KeyRing):
            return keys
        if isinstance(keys, (bytes, str)):
            keys = [keys]
        items = list(keys) if isinstance(keys, Iterable) else [keys]
        if not all(isinstance(k, (bytes, str)) for k in items):
            raise KeyFileError("an encryption key must be bytes or a str, or a list of them")
        raw = [k.encode("utf-8", "replace") if isinstance(k, str) else k for k in items]
        for key in raw:
            if not _valid(key):
                raise KeyFileError("encryption key is not a valid Fernet key (32 url-safe base64-encoded bytes)")
        return cls(tuple((len(raw) - i, k) for i, k in enumerate(raw)))

    @classmethod
    def parse(cls, entries: Iterable[str], origin: str, fix: str) -> KeyRing:
        """Parse key entries: all ``v<N>:<key>``, or all bare keys newest first (numbered down to 1).

        ``origin`` names where they come from in errors; ``fix`` says how to
        repair them. No error ever holds key material.
        """
        items = [e.strip() for e in entries]
        items = [e for e in items if e and not e.startswith("#")]
        if not items:
            raise KeyFileError(f"{origin} holds no key: {fix}")
        bare = not any(_VERSIONED.match(item) for item in items)
        if bare:
            versioned = [(len(items) - i, item) for i, item in enumerate(items)]
        else:
            versioned = []
            for number, item in enumerate(items, 1):
                match = _VERSIONED.match(item)
                if match is None:
                    raise KeyFileError(f"{origin}: entry {number} is not \"v<version>:<key>\": {fix}")
                version = int(match.group(1)) if len(match.group(1)) <= 10 else MAX_KEY_VERSION + 1
                if version > MAX_KEY_VERSION:
                    raise KeyFileError(
                        f"{origin}: entry {number} has key version {match.group(1)[:12]}"
                        f"{'…' if len(match.group(1)) > 12 else ''}, above the highest ({MAX_KEY_VERSION}): {fix}"
                    )
                versioned.append((version, match.group(2).strip()))
        keys = []
        for number, (version, text) in enumerate(versioned, 1):
            key = text.encode("ascii", "replace")
            if not _valid(key):
                where = f" (key version {version})" if not bare else f" (entry {number})" if len(items) > 1 else ""
                raise KeyFileError(f"{origin} does not hold a valid Fernet key{where}: {fix}")
            keys.append((version, key))
        if len({v for v, _ in keys}) != len(keys):
            raise KeyFileError(f"{origin} holds a key version twice: {fix}")
        return cls(tuple(keys))

    def dumps(self) -> bytes:
        """The key file text of this ring (a bare key for a lone version 1, as the specification writes)."""
        if len(self.keys) == 1 and self.primary == 1:
            return self.keys[0][1]
        return _HEADER + b"".join(b"v%d:%s\n" % (v, k) for v, k in self.keys)

    @property
    def primary(self) -> int:
        """The version that encrypts (the highest)."""
        return self.keys[0][0]

    @property
    def versions(self) -> tuple[int, ...]:
        """Every version, newest first."""
        return tuple(v for v, _ in self.keys)

    def key(self, version: int) -> bytes:
        """The key of ``version``; raise :class:`KeyError` if the ring lacks it."""
        for v, k in self.keys:
            if v == version:
                return k
        raise KeyError(version)

    def fingerprints(self) -> dict[int, str]:
        """``{version: fingerprint}``, newest first."""
        return {v: fingerprint(k) for v, k in self.keys}

    def adding(self, version: int, key: bytes) -> KeyRing:
        """This ring with ``key`` as ``version``."""
        return KeyRing(((version, key), *self.keys))

    def without(self, version: int) -> KeyRing:
        """This ring without ``version``."""
        return KeyRing(tuple((v, k) for v, k in self.keys if v != version))


class TokenCipher:
    """Encrypts and decrypts token strings with a :class:`KeyRing`.

    The ring's primary key encrypts; every key is tried to decrypt. Besides
    standard Fernet tokens it reads the older KissBot format: a Fernet token
    wrapped once more in URL-safe base64 (values starting ``Z0FBQUFB``).
    ``TokenCipher(key)`` and ``TokenCipher([newest, …, oldest])`` still work.
    """

    __slots__ = ("_state",)

    def __init__(self, keys: KeyRing | list[bytes] | bytes) -> None:
        self._set(KeyRing.of(keys))

    def _set(self, ring: KeyRing) -> None:
        self._state = (ring, _Fernets(k for _, k in ring.keys))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} v{self._state[0].primary}>"

    @property
    def ring(self) -> KeyRing:
        """The keys in use."""
        return self._state[0]

    @property
    def current_version(self) -> int:
        """The key version that :meth:`encrypt` uses."""
        return self.ring.primary

    def encrypt(self, plaintext: str) -> str:
        """Return the standard Fernet token of ``plaintext`` under the primary key."""
        return self._state[1].get().encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, stored: str) -> str:
        """Return the plaintext of a stored token; raise :class:`DecryptionError`."""
        return _decrypt(self._state[1].get(), stored)


class _Fernets:
    """A ring's keys as one ``MultiFernet``, made on first use (see :func:`_fernet`).

    Each ring has its own, so a rotation replacing the ring never races with it.
    """

    __slots__ = ("_keys", "_multi")

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = tuple(keys)
        self._multi: MultiFernet | None = None

    def get(self) -> MultiFernet:
        if self._multi is None:
            fernet = _fernet()
            self._multi = fernet.MultiFernet([fernet.Fernet(k) for k in self._keys])
        return self._multi


def _decrypt(fernet: Fernet | MultiFernet, stored: str) -> str:
    try:
        token = stored.encode("ascii")
        if not stored.startswith(_FERNET_PREFIX):
            token = base64.urlsafe_b64decode(token)
        return fernet.decrypt(token).decode()
    except (_fernet().InvalidToken, ValueError, TypeError, binascii.Error, UnicodeError):
        raise DecryptionError("Failed to decrypt token: wrong key or corrupted data") from None


def decrypts_with(key: bytes, stored: str) -> bool:
    """True if ``stored`` (a Fernet token, or a legacy wrapped one) decrypts with ``key`` alone."""
    try:
        _decrypt(_fernet().Fernet(key), stored)
    except DecryptionError:
        return False
    return True


class KeyFileCipher(TokenCipher):
    """A :class:`TokenCipher` that follows its key file while the store is open.

    When ``kissbot key rotate`` or ``retire`` rewrites the file, the cipher
    loads the new ring before its next encryption (a ``stat`` per call) or when
    a value does not decrypt, so running bots read rotated rows and write with
    the newest key. A changed file is only taken if it is safe, keeps every
    version it still holds unchanged and does not lower the primary version;
    otherwise the old keys stay in use and a warning is logged.
    """

    __slots__ = ("path", "_signature", "_lock")

    def __init__(self, path: str | os.PathLike[str], ring: KeyRing | None = None) -> None:
        self.path = Path(os.path.abspath(path))
        self._lock = threading.Lock()
        if ring is None:
            ring = read_key_ring(self.path)
        self._signature = _signature(self.path)
        super().__init__(ring)

    @property
    def current_version(self) -> int:
        self.refresh()
        return self.ring.primary

    def encrypt(self, plaintext: str) -> str:
        self.refresh()
        return super().encrypt(plaintext)

    def decrypt(self, stored: str) -> str:
        try:
            return super().decrypt(stored)
        except DecryptionError:
            if not self.refresh():
                raise
        return super().decrypt(stored)

    def refresh(self) -> bool:
        """Load the key file again if it changed; True if new keys were taken."""
        if _signature(self.path) == self._signature:
            return False
        with self._lock:
            signature = _signature(self.path)
            if signature == self._signature:
                return False
            self._signature = signature
            try:
                ring = read_key_ring(self.path)
            except KeyFileError as exc:
                log.warning("key file changed but is not usable, keeping the loaded keys: %s", exc)
                return False
            old = self.ring
            changed = [v for v in ring.versions if v in old.versions and ring.key(v) != old.key(v)]
            if changed or ring.primary < old.primary:
                log.warning(
                    "key file %s changed key version(s) %s in place, keeping the loaded keys",
                    self.path, ", ".join(map(str, changed or [ring.primary])),
                )
                return False
            self._set(ring)
            log.info("key file %s reloaded: key versions %s", self.path, ", ".join(map(str, ring.versions)))
            return True


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


POINT_ELSEWHERE = "--key-file PATH or KISSBOT_KEY_FILE"
"""How an error says to use another key file."""


def _fix_hint(path: Path) -> str:
    return f"restore {path} from your backup, or point to the right key with {POINT_ELSEWHERE}"


def read_key_ring(path: str | os.PathLike[str], *, check_mode: bool = True) -> KeyRing:
    """Read and check a key file; raise :class:`KeyFileError` (one line, naming it and the fix).

    Refuses a symlink, anything but a regular file, a file owned by another
    user (as OpenSSH does), a file that the group or others may read or write (unless ``check_mode`` is false: a diagnosis
    that reports the mode itself), and a file without valid Fernet keys.
    """
    path = Path(os.path.abspath(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} not found: {_fix_hint(path)}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(
                f"key file {path} is a symlink, which kissbot does not follow: "
                f"replace it with the key itself (cp --remove-destination \"$(readlink -f {path})\" {path})"
            ) from None
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file: {_fix_hint(path)}")
        if st.st_uid != os.geteuid():
            raise KeyFileError(
                f"key file {path} is owned by uid {st.st_uid}, not by the user running kissbot (uid {os.geteuid()}): "
                f"run kissbot as its owner, or give it to this user (chown {os.geteuid()} {path})"
            )
        mode = stat.S_IMODE(st.st_mode)
        if check_mode and mode & 0o077:
            what = "readable" if mode & 0o044 else "writable"
            raise KeyFileError(f"key file {path} is {what} by others (mode {mode:04o}): run chmod 600 {path}")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(64 * 1024)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} does not hold a valid Fernet key: {_fix_hint(path)}") from None
    return KeyRing.parse(text.splitlines(), f"key file {path}", _fix_hint(path))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _private_temp(path: Path, data: bytes) -> Iterator[Path]:
    # A complete, fsynced, mode-0600 file beside ``path``, removed on exit.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def create_key_file(path: str | os.PathLike[str], version: int = 1) -> KeyRing:
    """Create ``path`` holding a new key (as ``version``), atomically and with mode 0600.

    The key is written to a private temporary file beside ``path`` and then
    hard-linked into place, so the file appears complete or not at all and an
    existing file or symlink is never replaced. If another process created it
    first, that file is read (and checked) instead: every process starting at
    once ends up with the same key.
    """
    path = Path(os.path.abspath(path))
    ring = KeyRing(((version, generate_key()),))
    with _private_temp(path, ring.dumps()) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return read_key_ring(path)
        except OSError as exc:
            raise KeyFileError(f"cannot create key file {path}: {exc.strerror}") from None
    _fsync_dir(path.parent)
    backup_notice(path, ring, "new key")
    return ring


def backup_notice(path: Path, ring: KeyRing, what: str) -> None:
    """Log (as a warning, which the CLI prints) that ``path`` must be backed up now, with a fingerprint prefix."""
    log.warning(
        "%s: back up %s now: fingerprint %s… (key version %d); without it the tokens cannot be decrypted",
        what, path, fingerprint(ring.key(ring.primary))[:8], ring.primary,
    )


def write_key_file(path: str | os.PathLike[str], ring: KeyRing) -> None:
    """Replace the key file ``path`` with ``ring``, atomically, mode 0600, fsynced.

    Readers see the old file or the new one, never a mix; a symlink at
    ``path`` is replaced by the file, never followed. Call it under
    :func:`key_file_lock`.
    """
    path = Path(path)
    with _private_temp(path, ring.dumps()) as tmp:
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from None
    _fsync_dir(path.parent)


@contextmanager
def key_file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock that serialises rewrites of the key file ``path``.

    The lock is on the file's directory, so nothing is created beside the key.
    """
    import fcntl  # POSIX only, like the 0600 key file itself

    directory = Path(path).parent
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise KeyFileError(f"cannot lock key directory {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
