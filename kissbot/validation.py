"""Checks of the arguments the public API receives, and safe echoes of untrusted text.

Repositories call these at their entry points, so a wrong argument raises a
:class:`~kissbot.errors.ValidationError` with one clear line instead of a
``TypeError`` deep in a driver or a row that cannot be read back. Nothing here
touches the database: checks that need it (a token stored for that user) get
what they compare against from the caller.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from kissbot.errors import ValidationError

MAX_EXPIRES_IN = 366 * 24 * 3600
"""Longest token lifetime accepted, in seconds (a year; Twitch's tokens live hours to weeks)."""
MAX_ID = 2**63 - 1
"""Largest row id both backends store (a signed 64-bit integer)."""
MAX_DAYS = 100 * 366
"""Longest retention, in days, that dates can still be computed for."""
MAX_SECONDS = 10**10
"""Longest duration, in seconds (~300 years), that dates can still be computed from."""
MAX_ECHO = 40
"""Longest piece of untrusted input quoted back in a message."""
_SECRET_LIKE = re.compile(r"\b[A-Za-z0-9]{20,}\b|[A-Za-z0-9_\-=]{40,}")
"""Text that may be a token: a long alphanumeric word (Twitch's tokens have 30 and 50 characters) or
a longer base64url run (Fernet keys and tokens)."""
_SECRET_KEY = re.compile(
    r"^(?:refresh|key|keys|auth|bearer|oauth|pass|pwd)$"
    r"|(?:token|secret|password|passwd|passphrase|authorization|credential|apikey|key)s?$"
)
_MIN_SECRET_VALUE = 16
_NOT_ALNUM = re.compile(r"[^a-z0-9]")
"""Shorter detail strings are not compared with the user's stored tokens."""


def shown(value: object, limit: int = MAX_ECHO) -> str:
    """Untrusted ``value`` for a message: anything token-like masked to 4 characters, the whole cut to ``limit``."""
    text = mask_secrets(str(value), ())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def echo(value: object, limit: int = MAX_ECHO) -> str:
    """:func:`shown`, quoted."""
    return repr(shown(value, limit))


def mask_secrets(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with each of ``secrets`` (and anything token-like) masked to its first 4 characters.

    Secrets shorter than 8 characters are not looked for: they would mask ordinary words.
    """
    for secret in secrets:
        if secret and len(secret) >= 8:
            text = text.replace(secret, secret[:4] + "…")
    return _SECRET_LIKE.sub(lambda m: m.group()[:4] + "…", text)


def check_id(value: Any, name: str = "user_id") -> int:
    """A row id: a positive integer (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an integer, not {type(value).__name__}")
    if not 0 < value <= MAX_ID:
        raise ValidationError(f"{name} must be between 1 and {MAX_ID}, not {value}")
    return value


def check_optional_id(value: Any, name: str) -> int | None:
    """:func:`check_id`, or None."""
    return None if value is None else check_id(value, name)


def check_text(value: Any, name: str) -> str:
    """A non-empty string (logins, event types, config keys…)."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{name} must not be empty")
    if "\x00" in value:
        raise ValidationError(f"{name} must not contain a NUL character")
    return value


def check_twitch_user_id(value: Any) -> str:
    """A Twitch user id given as a number or a string of digits, as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValidationError(f"twitch_user_id must be a number or a string of digits, not {type(value).__name__}")
    text = str(value).strip()
    if not (text.isascii() and text.isdigit()):
        raise ValidationError(f"twitch_user_id must be a number or a string of digits, not {echo(value)}")
    return text


def check_user_fields(**fields: Any) -> None:
    """The user columns given (``twitch_user_id``, ``twitch_login``, ``display_name``, ``is_bot``) have usable values."""
    if "twitch_user_id" in fields:
        check_twitch_user_id(fields["twitch_user_id"])
    if "twitch_login" in fields:
        check_text(fields["twitch_login"], "twitch_login")
    if fields.get("display_name") is not None:
        check_text(fields["display_name"], "display_name")
    if "is_bot" in fields and not isinstance(fields["is_bot"], (bool, int)):
        raise ValidationError(f"is_bot must be true or false, not {type(fields['is_bot']).__name__}")


def check_flag(value: Any, name: str) -> bool:
    """A yes/no argument: a bool (or the integers 0 and 1)."""
    if not isinstance(value, int) or value not in (0, 1):
        raise ValidationError(f"{name} must be true or false, not {echo(value)}")
    return bool(value)


def check_expires_in(value: Any) -> int | float:
    """A token lifetime in seconds: a finite number within ±:data:`MAX_EXPIRES_IN` (negative: already expired)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"expires_in must be a number of seconds, not {type(value).__name__}")
    if not (math.isfinite(value) and -MAX_EXPIRES_IN <= value <= MAX_EXPIRES_IN):
        raise ValidationError(f"expires_in must be a finite number of seconds within ±{MAX_EXPIRES_IN}, not {value!r}")
    return value


def clamp_expires_in(value: int) -> int:
    """An upstream lifetime bounded to ``1..MAX_EXPIRES_IN`` seconds."""
    return max(1, min(value, MAX_EXPIRES_IN))


def check_scopes(value: Any) -> list[str] | None:
    """Scopes as a list of strings (or None); a bare string is refused rather than split into characters."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValidationError(f"scopes must be a list of strings, not {type(value).__name__}")
    scopes = list(value)
    for scope in scopes:
        if not isinstance(scope, str) or not scope:
            raise ValidationError(f"scopes must be a list of non-empty strings, not one holding {echo(scope)}")
    return scopes


def check_seconds(value: Any, name: str, maximum: float = MAX_SECONDS) -> float:
    """A duration (seconds, or minutes where ``name`` says so): a finite number within ``±maximum``.

    Negative durations are allowed: they name a moment in the past (a lease that has already expired).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{name} must be a number, not {type(value).__name__}")
    if not (math.isfinite(value) and -maximum <= value <= maximum):
        raise ValidationError(f"{name} must be a finite number within ±{maximum:g}, not {value!r}")
    return value


def check_count(value: Any, name: str, minimum: int = 0, maximum: int = MAX_ID) -> int:
    """An integer argument such as ``days`` or ``limit`` within ``minimum..maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an integer, not {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ValidationError(f"{name} must be between {minimum} and {maximum}, not {value}")
    return value


def is_secret_key(key: str) -> bool:
    """True for a details key that names a secret, in any case or spelling (``refreshToken``, ``Client-Secret``)."""
    return bool(_SECRET_KEY.search(_NOT_ALNUM.sub("", key.lower())))


def audit_details_json(
    details: Any, stored_tokens: Callable[[], Iterable[str]] | None = None
) -> str | None:
    """The JSON of an audit event's ``details``, or a :class:`ValidationError`.

    ``details`` is a mapping of string keys to JSON values (strings, finite
    numbers, booleans, None, lists and mappings of them, nested to any depth);
    other values are stored as their ``str``. Refused: keys that name a secret
    at any depth (:func:`is_secret_key`), non-string keys, cycles, NaN and
    infinities, and any string equal to one of ``stored_tokens()`` (the user's
    stored tokens, asked for only when a long enough string is present).
    """
    if details is None:
        return None
    if not isinstance(details, dict):
        raise ValidationError(f"audit details must be a dict, not {type(details).__name__}")
    strings: list[str] = []
    _walk(details, (), strings, set())
    candidates = {s for s in strings if len(s) >= _MIN_SECRET_VALUE}
    if candidates and stored_tokens is not None and candidates.intersection(stored_tokens()):
        raise ValidationError("audit details must not hold secrets: a value equals a token stored for this user")
    try:
        return json.dumps(details, ensure_ascii=False, allow_nan=False, default=str)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValidationError(f"audit details cannot be stored as JSON: {exc}") from exc


def _walk(value: Any, where: tuple[str | int, ...], strings: list[str], active: set[int]) -> None:
    # ``where`` is the path of keys and indexes to ``value``, spelt out only in an error.
    if isinstance(value, str):
        strings.append(value)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"audit details must hold finite numbers: {_path(where)} is {value!r}")
    if not isinstance(value, (dict, list, tuple)):
        return
    if id(value) in active:
        raise ValidationError(f"audit details must not be circular: {_path(where) or 'details'} contains itself")
    if len(active) > 100:
        raise ValidationError(f"audit details are nested too deeply at {_path(where)[:MAX_ECHO]}")
    active.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(
                    f"audit details keys must be strings: {_path(where) or 'details'} has a {type(key).__name__} key"
                )
            if is_secret_key(key):
                raise ValidationError(f"audit details must not hold secrets: drop {_path((*where, key))}")
            _walk(item, (*where, key), strings, active)
    else:
        for index, item in enumerate(value):
            _walk(item, (*where, index), strings, active)
    active.discard(id(value))


def _path(where: tuple[str | int, ...]) -> str:
    """``scopes[0].name`` for ``("scopes", 0, "name")``, each key masked by :func:`shown`."""
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else f"{text and '.'}{shown(part)}"
    return text
