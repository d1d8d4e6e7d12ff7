"""Silent instances: left out of the active list, reaped as crashes, disabled at max_crash_count."""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import update

from kissbot.cli import cli
from kissbot.errors import InstanceDisabled
from kissbot.models import instances
from kissbot.types import utcnow


def _silence(mgr, instance_id: int, seconds: float) -> None:
    """Pretend ``instance_id``'s last heartbeat was ``seconds`` ago."""
    with mgr.session() as s:
        s.execute(update(instances).where(instances.c.id == instance_id).values(last_heartbeat=utcnow() - timedelta(seconds=seconds)))


@pytest.fixture
def two_instances(mgr, bot):
    mgr.create_user("2", "el_serda")
    mgr.create_user("3", "other_channel")
    return mgr.register_instance("el_serda", "serda_bot", 101), mgr.register_instance("other_channel", "serda_bot", 102)


def test_a_silent_instance_is_not_active_and_is_reaped_as_a_crash(mgr, two_instances):
    fresh, silent = two_instances
    _silence(mgr, fresh, 80)  # under 3 × health_check_interval (30 s)
    _silence(mgr, silent, 91)
    assert [i["id"] for i in mgr.get_active_instances()] == [fresh]
    assert mgr.get_stats()["active_instances"] == 1

    (reaped,) = mgr.reap_stale_instances()
    assert {k: reaped[k] for k in ("id", "bot_login", "channel_login", "pid", "status", "crash_count")} == {
        "id": silent, "bot_login": "serda_bot", "channel_login": "other_channel", "pid": 102,
        "status": "crashed", "crash_count": 1,
    }
    assert mgr.reap_stale_instances() == []
    (event,) = mgr.get_audit_log(limit=1)
    assert (event["event_type"], event["severity"]) == ("instance_crashed", "warning")
    assert event["details"]["reason"] == "no heartbeat" and event["details"]["crash_count"] == 1

    mgr.set_config("health_check_interval", 20)  # the interval is read from config
    assert [r["id"] for r in mgr.reap_stale_instances()] == [fresh]
    assert mgr.get_active_instances() == []


def test_reaping_counts_toward_max_crash_count_and_disables(mgr, two_instances):
    _, silent = two_instances
    mgr.set_config("max_crash_count", 2)
    _silence(mgr, silent, 3600)
    assert [r["status"] for r in mgr.reap_stale_instances()] == ["crashed"]
    assert mgr.register_instance("other_channel", "serda_bot", 103) == silent
    _silence(mgr, silent, 3600)
    assert [(r["status"], r["crash_count"]) for r in mgr.reap_stale_instances()] == [("disabled", 2)]
    assert mgr.get_audit_log(limit=1)[0]["event_type"] == "instance_disabled"
    with pytest.raises(InstanceDisabled):
        mgr.register_instance("other_channel", "serda_bot", 104)
    with pytest.raises(InstanceDisabled, match=f"instance {silent} is disabled"):
        mgr.update_instance_heartbeat(silent)  # a late heartbeat does not revive it
    mgr.reset_instance(silent)
    assert mgr.register_instance("other_channel", "serda_bot", 105) == silent


def test_cli_instances_reap(mgr, two_instances, store_url, key_file):
    _, silent = two_instances
    _silence(mgr, silent, 3600)
    with mgr.engine.connect() as conn:
        last = conn.execute(instances.select().where(instances.c.id == silent)).one().last_heartbeat
    runner = CliRunner()
    args = ["instances", "reap", "--url", store_url, "--key-file", str(key_file)]
    result = runner.invoke(cli, args)
    assert (result.exit_code, result.output) == (
        0,
        f"Instance {silent} (serda_bot on other_channel, pid 102): last heartbeat "
        f"{last:%Y-%m-%d %H:%M:%S} UTC, now crashed (crash 1)\nReaped 1 stale instance.\n",
    )
    assert runner.invoke(cli, args).output == "Reaped 0 stale instances.\n"
