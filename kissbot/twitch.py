"""Twitch's OAuth endpoints and the settings naming them (import-light, for the CLI)."""

DEFAULT_TOKEN_URL = "https://id.twitch.tv/oauth2/token"
DEFAULT_VALIDATE_URL = "https://id.twitch.tv/oauth2/validate"
CLIENT_ID_ENV = "TWITCH_CLIENT_ID"
CLIENT_SECRET_ENV = "TWITCH_CLIENT_SECRET"
TOKEN_URL_ENV = "KISSBOT_TWITCH_TOKEN_URL"
VALIDATE_URL_ENV = "KISSBOT_TWITCH_VALIDATE_URL"
