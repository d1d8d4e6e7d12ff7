"""Property tests (Hypothesis): arbitrary arguments and files give success or a typed KissbotError, nothing else."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kissbot import DatabaseManager
from kissbot.errors import KissbotError
from kissbot.importers import TIO_EXPIRES_IN, apply_batch, read_token_file, read_yaml_tokens

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "0", "1209350837", "chat:read", "oauth:abc", "refresh_token", "Refresh_Token", "nan"]),
    st.binary(max_size=8),
)
keys = st.one_of(st.text(max_size=15), st.integers(), st.none(), st.booleans(), st.tuples(st.integers()))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.tuples(inner, inner), st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DatabaseManager, int]]:
    d = tmp_path_factory.mktemp("properties")
    with DatabaseManager(d / "kissbot.db", d / ".kissbot.key") as mgr:
        user_id = mgr.create_user("1209350837", "serda_bot", is_bot=True)
        mgr.store_tokens(user_id, "k9xq2m7w4r1t8y5u3i6o0pa1s2d3f4", "zz8y7x6w5v4u3t2s1r0qponmlkjihgfedcba98", 60)
        yield mgr, user_id


def outcome(call: Any) -> None:
    """Run ``call``: success, or a KissbotError with a one-line message; any other exception fails the test."""
    try:
        call()
    except KissbotError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)


ids = st.one_of(values, st.integers(min_value=-5, max_value=5))


@FAST
@given(user_id=ids, access=values, refresh=values, expires_in=values, scopes=values)
def test_store_tokens_arguments(store, user_id, access, refresh, expires_in, scopes):
    mgr, bot = store
    outcome(lambda: mgr.store_tokens(bot if user_id == 1 else user_id, access, refresh, expires_in, scopes=scopes))


@FAST
@given(event_type=values, user_id=ids, channel_id=ids, details=values)
def test_log_event_arguments(store, event_type, user_id, channel_id, details):
    mgr, _ = store
    outcome(lambda: mgr.log_event(event_type, user_id=user_id, channel_id=channel_id, details=details))


@FAST
@given(twitch_id=values, login=values, display=values, lookup=values, limit=values, days=values)
def test_user_and_audit_arguments(store, twitch_id, login, display, lookup, limit, days):
    mgr, _ = store
    outcome(lambda: mgr.create_user(twitch_id, login, display_name=display))
    outcome(lambda: mgr.get_user_by_login(lookup))
    outcome(lambda: mgr.get_tokens(lookup))
    outcome(lambda: mgr.get_audit_log(limit=limit))
    outcome(lambda: mgr.cleanup_old_logs(days))
    outcome(lambda: mgr.register_instance(login, lookup, twitch_id))


# --- token files ---------------------------------------------------------------------------------

yaml_words = st.sampled_from([
    "twitch:", "  tokens:", "    serda_bot:", "    Serda_Bot:", "      user_id: 1209350837", "      user_id: [1]",
    "      access_token: abc", "      refresh_token: oauth:def", "      scopes: chat:read", "      scopes: [1, 2]",
    "      is_bot: yes", "  bot_id: 1209350837", "&a x", "*a", "<<: *a", "!!python/object:os.system x", "!!binary aGk=",
    "? [a]", ": b", "- x", "[", "]", "{", "}", "'", '"', "|", ">", "%YAML 1.1", "---", "...", "2024-13-01", "0x_",
    "    serda_bot:", "      user_id: 1209350837", "\t", "", "\x00", "\ufeff",
])
yaml_texts = st.one_of(
    st.text(max_size=200),
    st.lists(yaml_words, max_size=20).map("\n".join),
    values.map(lambda v: yaml.safe_dump({"twitch": {"tokens": v}}) if _dumpable(v) else repr(v)),
)
json_texts = st.one_of(
    st.text(alphabet=string.printable, max_size=100),
    values.map(lambda v: json.dumps(v, default=repr) if _dumpable(v) else repr(v)),
    st.dictionaries(st.text(max_size=12), values, max_size=4).map(lambda v: json.dumps(v) if _dumpable(v) else "{}"),
    st.integers(min_value=1, max_value=5000).map(lambda n: "[" * n + "]" * n),
)


def _dumpable(value: Any) -> bool:
    try:
        json.dumps(value)
        yaml.safe_dump(value)
    except (TypeError, ValueError, yaml.YAMLError):
        return False
    return True


@FAST
@given(text=yaml_texts)
def test_migrate_yaml_parsing(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")

    def parse() -> None:
        batch = read_yaml_tokens(path)
        apply_batch(None, batch, expires_in=0, skip_invalid=True, dry_run=True)

    outcome(parse)


@FAST
@given(text=json_texts, login=st.sampled_from([None, "serda_bot"]))
def test_import_tio_parsing(tmp_path_factory, text, login):
    path: Path = tmp_path_factory.getbasetemp() / ".tio.tokens.json"
    path.write_text(text, encoding="utf-8")

    def parse() -> None:
        batch = read_token_file(path, login=login)
        apply_batch(None, batch, expires_in=TIO_EXPIRES_IN, skip_invalid=True, dry_run=True)

    outcome(parse)


@FAST
@given(user_id=ids, owner=values, ttl=values, window=values)
def test_lease_and_window_arguments(store, user_id, owner, ttl, window):
    mgr, bot = store
    outcome(lambda: mgr.claim_refresh(bot if user_id == 1 else user_id, owner, ttl))
    outcome(lambda: mgr.get_tokens_needing_refresh(window))


token_types = st.one_of(st.sampled_from(["bot", "broadcaster"]), values)


@FAST
@given(user_id=ids, token_type=token_types, owner=values, expected=values, decrypt=values)
def test_token_row_arguments(store, user_id, token_type, owner, expected, decrypt):
    mgr, bot = store
    uid = bot if user_id == 1 else user_id
    outcome(lambda: mgr.get_tokens(uid, token_type=token_type))
    outcome(lambda: mgr.get_tokens_by_twitch_id(owner, token_type=token_type))
    outcome(lambda: mgr.release_refresh(uid, owner, token_type=token_type))
    outcome(lambda: mgr.increment_refresh_failures(uid, token_type=token_type))
    outcome(lambda: mgr.mark_tokens_expired(uid, token_type=token_type))
    outcome(lambda: mgr.store_tokens(uid, "access-token-1", "refresh-token-1", 60, token_type=token_type, expected_version=expected))
    outcome(lambda: mgr.list_tokens(decrypt=decrypt))


@FAST
@given(twitch_id=values, user_id=ids, fields=st.dictionaries(st.sampled_from(["twitch_login", "display_name", "is_bot", "twitch_user_id", "bogus"]), values, max_size=3))
def test_user_lookup_and_update_arguments(store, twitch_id, user_id, fields):
    mgr, bot = store
    outcome(lambda: mgr.get_user(twitch_id))
    outcome(lambda: mgr.update_user(bot if user_id == 1 else user_id, **fields))


@FAST
@given(instance_id=ids, status=values, crash=values, event_type=values, user_id=ids)
def test_instance_and_audit_filter_arguments(store, instance_id, status, crash, event_type, user_id):
    mgr, _ = store
    outcome(lambda: mgr.update_instance_heartbeat(instance_id, status))
    outcome(lambda: mgr.stop_instance(instance_id, crash=crash))
    outcome(lambda: mgr.reset_instance(instance_id))
    outcome(lambda: mgr.get_audit_log(event_type=event_type, user_id=user_id))


@FAST
@given(key=values, value=values, description=values, default=values)
def test_config_arguments(store, key, value, description, default):
    mgr, _ = store
    outcome(lambda: mgr.set_config(key, value, description))
    outcome(lambda: mgr.get_config(key, default))
    outcome(lambda: mgr.list_config())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(busy=values, synchronous=st.one_of(st.sampled_from(["OFF", "normal", "FULL"]), values), echo=values, key=values)
def test_opening_arguments(store, busy, synchronous, echo, key):
    mgr, _ = store
    db = mgr.url.database

    def open_and_close() -> None:
        with DatabaseManager(db, key=key if isinstance(key, (bytes, str, list)) else None, echo=echo,
                             synchronous=synchronous, busy_timeout_ms=busy, create=False) as other:
            other.get_stats()

    outcome(open_and_close)
