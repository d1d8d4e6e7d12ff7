"""Twitch's OAuth endpoints, the settings naming them, and its error text made safe (import-light, for the CLI)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx


DEFAULT_TOKEN_URL = "https://id.twitch.tv/oauth2/token"
DEFAULT_VALIDATE_URL = "https://id.twitch.tv/oauth2/validate"
DEFAULT_DEVICE_URL = "https://id.twitch.tv/oauth2/device"
DEFAULT_AUTHORIZE_URL = "https://id.twitch.tv/oauth2/authorize"
DEFAULT_HELIX_URL = "https://api.twitch.tv/helix"
CLIENT_ID_ENV = "TWITCH_CLIENT_ID"
CLIENT_SECRET_ENV = "TWITCH_CLIENT_SECRET"
TOKEN_URL_ENV = "KISSBOT_TWITCH_TOKEN_URL"
VALIDATE_URL_ENV = "KISSBOT_TWITCH_VALIDATE_URL"
DEVICE_URL_ENV = "KISSBOT_TWITCH_DEVICE_URL"
AUTHORIZE_URL_ENV = "KISSBOT_TWITCH_AUTHORIZE_URL"
HELIX_URL_ENV = "KISSBOT_TWITCH_HELIX_URL"


def twitch_message(response: httpx.Response, sent: Iterable[str | None]) -> str:
    """Twitch's error ``message`` (e.g. ``Invalid refresh token``), safe to show and store; empty if none.

    Twitch's text may echo what it was sent: each secret of the request (as
    sent, or form-encoded) and anything token-like is masked to 4
    characters, and the text is cut short.
    """
    from urllib.parse import quote, quote_plus

    from kissbot.validation import mask_secrets, shown

    try:
        answer = response.json()
    except ValueError:
        return ""
    message = answer.get("message") if isinstance(answer, dict) else None
    if not message:
        return ""
    secrets = [variant for s in sent if s for variant in {s, quote(s, safe=""), quote_plus(s)}]
    return shown(mask_secrets(str(message), sorted(secrets, key=len, reverse=True)), limit=100)
