"""pytest fixtures for bot projects that use kissbot (loaded through the ``pytest11`` entry point).

Every fixture gives a fresh in-memory SQLite store migrated to head with a new
random key, so tests are isolated from each other and from any real store::

    def test_my_bot_reads_its_tokens(kissbot_manager):
        uid = kissbot_manager.create_user("1", "my_bot", is_bot=True)
        kissbot_manager.store_tokens(uid, "access", "refresh", expires_in=3600)
        assert MyBot(kissbot_manager).token() == "access"

``fake_twitch`` serves a fake Twitch (OAuth token, validate, device and
authorize endpoints, Helix ``/users``) on 127.0.0.1 for the test; see
:class:`kissbot.fake_twitch.FakeTwitch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from kissbot.fake_twitch import FakeTwitch
    from sqlalchemy.orm import Session

    from kissbot.manager import DatabaseManager


@pytest.fixture
def kissbot_key() -> bytes:
    """A fresh Fernet key."""
    from kissbot.crypto import generate_key

    return generate_key()


@pytest.fixture
def kissbot_engine(kissbot_key: bytes) -> Iterator[Engine]:
    """An engine on a new in-memory database at the newest migration, encrypting with ``kissbot_key``."""
    from kissbot.crypto import TokenCipher
    from kissbot.engine import create_engine
    from kissbot.migrations import upgrade

    engine = create_engine("sqlite://", cipher=TokenCipher(kissbot_key))
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def kissbot_session(kissbot_engine: Engine) -> Iterator[Session]:
    """A session on ``kissbot_engine`` in a write transaction, rolled back after the test."""
    from sqlalchemy.orm import Session

    from kissbot.engine import writer

    with Session(writer(kissbot_engine)) as session:
        yield session
        session.rollback()


@pytest.fixture
def kissbot_manager(kissbot_key: bytes) -> Iterator[DatabaseManager]:
    """A :class:`~kissbot.DatabaseManager` on a new in-memory database with ``kissbot_key``."""
    from kissbot.manager import DatabaseManager

    with DatabaseManager(url="sqlite://", key=kissbot_key) as manager:
        yield manager


@pytest.fixture
def fake_twitch() -> Iterator[FakeTwitch]:
    """A :class:`~kissbot.fake_twitch.FakeTwitch` on a free port of 127.0.0.1, stopped after the test."""
    from kissbot.fake_twitch import FakeTwitch

    with FakeTwitch() as twitch:
        yield twitch
