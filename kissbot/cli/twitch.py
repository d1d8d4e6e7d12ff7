"""The options naming the Twitch application, shared by ``kissbot auth`` and ``kissbot refresh-worker``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from kissbot.twitch import CLIENT_ID_ENV, CLIENT_SECRET_ENV


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--client-id`` and ``--client-secret`` (from ``TWITCH_CLIENT_ID`` / ``TWITCH_CLIENT_SECRET``) to a command."""
    fn = click.option(
        "--client-secret", envvar=CLIENT_SECRET_ENV, show_envvar=True,
        help="Twitch application client secret: confidential clients only, a public client (Device Code flow) has "
        "none; prefer the environment variable.",
    )(fn)
    return click.option("--client-id", envvar=CLIENT_ID_ENV, show_envvar=True, help="Twitch application client id.")(fn)
