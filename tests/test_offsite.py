"""Off-site backups (`backup --to`, `backups list`, `restore --from`) against a directory and a real S3 server.

The S3 server is moto's server mode on 127.0.0.1 with authentication on: one
IAM user's keys work, anything else is refused like AWS would.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.engine import make_url

from kissbot import DatabaseManager
from kissbot.cli import cli
from kissbot.migrations import HEAD
from kissbot.offsite import BackupInfo, Retention, backup_to, list_backups

obstore = pytest.importorskip("obstore")
moto_server_exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))

TIMEOUT = 60
ACCESS = "access-7Qx9offsiteDISTINCTIVE"
REFRESH = "refresh-Zk3offsiteDISTINCTIVE"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC +\d+ bytes  revision \w+  (sqlite|postgresql) +kissbot-\d{8}T\d{6}Z-\w+\.(sqlite\.gz|pgdump)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                pytest.fail(f"moto_server exited: {proc.stderr.read() if proc.stderr else ''}")
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def moto() -> Iterator[dict[str, str]]:
    """A moto S3 server with authentication; yields the endpoint and a working key pair."""
    if moto_server_exe is None:
        pytest.skip("moto[server] is not installed (it is in the test extra)")
    port = free_port()
    # The first three calls (create the IAM user, its key, its policy) need no credentials; every later one does.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen(
        [moto_server_exe, "-H", "127.0.0.1", "-p", str(port)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_port(port, proc)
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="kissbot")
        key = iam.create_access_key(UserName="kissbot")["AccessKey"]
        iam.put_user_policy(UserName="kissbot", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        yield {"endpoint": endpoint, "port": str(port), "id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, key_id: str, secret: str) -> None:
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_REGION", "us-east-1")


@pytest.fixture
def s3_url(moto: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<new bucket>/kissbot``, with the AWS_* variables set for it."""
    import boto3

    bucket = f"kb-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto["endpoint"], region_name="us-east-1", aws_access_key_id=moto["id"],
                 aws_secret_access_key=moto["secret"]).create_bucket(Bucket=bucket)
    aws_env(monkeypatch, moto["endpoint"], moto["id"], moto["secret"])
    return f"s3://{bucket}/kissbot"


@pytest.fixture(params=["directory", "s3"])
def dest_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "directory":
        return str(tmp_path / "offsite")
    return request.getfixturevalue("s3_url")


class Objects:
    """The raw objects at a destination, for the tests to look at and damage."""

    def __init__(self, url: str) -> None:
        if url.startswith("s3://"):
            from obstore.store import from_url

            self.store = from_url(url, client_options={"allow_http": True})
            self.folder = None
        else:
            self.folder = Path(url)

    def names(self) -> list[str]:
        if self.folder is not None:
            return sorted(p.name for p in self.folder.iterdir()) if self.folder.exists() else []
        return sorted(m["path"] for batch in obstore.list(self.store) for m in batch)

    def read(self, name: str) -> bytes:
        if self.folder is not None:
            return (self.folder / name).read_bytes()
        return bytes(obstore.get(self.store, name).bytes())

    def write(self, name: str, data: bytes) -> None:
        if self.folder is not None:
            (self.folder / name).write_bytes(data)
        else:
            obstore.put(self.store, name, data)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def store_args(store_url: str, key_file: Path) -> list[str]:
    return ["--url", store_url, "--key-file", str(key_file)]


def make_store(store_url: str, key_file: Path, users: int = 2) -> int:
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        first = mgr.create_user("1001", "alice")
        mgr.store_tokens(first, ACCESS, REFRESH, 3600)
        for i in range(1, users):
            uid = mgr.create_user(str(2000 + i), f"user{i}")
            mgr.store_tokens(uid, f"access-{i}-{uuid.uuid4().hex}", f"refresh-{i}-{uuid.uuid4().hex}", 3600)
    return first


def access_token(store_url: str, key_file: Path, uid: int) -> str:
    with DatabaseManager(url=store_url, key_file=key_file, create=False) as mgr:
        return mgr.get_tokens(uid)["access_token"]


def set_access(store_url: str, key_file: Path, uid: int, value: str) -> None:
    with DatabaseManager(url=store_url, key_file=key_file) as mgr:
        mgr.store_tokens(uid, value, REFRESH, 3600)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output
    return result.output.strip()


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_backup_list_restore_latest(runner, dest_url, store_url, key_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uid = make_store(store_url, key_file)
    result = runner.invoke(cli, ["backup", "--to", dest_url, *store_args(store_url, key_file)])
    assert result.exit_code == 0, result.output
    backend = "postgresql" if store_url.startswith("postgresql") else "sqlite"
    suffix = ".pgdump" if backend == "postgresql" else ".sqlite.gz"
    match = re.fullmatch(rf"Uploaded (kissbot-\d{{8}}T\d{{6}}Z-{HEAD}\{suffix}) \((\d+) bytes, revision {HEAD}\) to {re.escape(dest_url)}\n", result.output)
    assert match, result.output
    name = match.group(1)
    assert Objects(dest_url).names() == [name.removesuffix(suffix) + ".json", name]

    listed = runner.invoke(cli, ["backups", "list", dest_url])
    assert listed.exit_code == 0, listed.output
    assert LINE.match(listed.output.strip()), listed.output
    assert listed.output.rstrip().endswith(f"{match.group(2)} bytes  revision {HEAD}  {backend:<10}  {name}")
    as_json = json.loads(runner.invoke(cli, ["backups", "list", dest_url, "--json"]).output)
    assert [(b["name"], b["size"], b["revision"], b["backend"]) for b in as_json] == [(name, int(match.group(2)), HEAD, backend)]

    set_access(store_url, key_file, uid, "changed-after-the-backup")
    restored = runner.invoke(cli, ["restore", "--from", dest_url, *store_args(store_url, key_file)])
    assert restored.exit_code == 0, restored.output
    lines = restored.output.splitlines()
    assert lines[0].startswith("Backed up the current database to "), restored.output
    assert Path(lines[0].removeprefix("Backed up the current database to ")).is_file()
    assert re.fullmatch(
        rf"Restored .+ from {re.escape(dest_url)}/{re.escape(name)} \(taken \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC, "
        rf"revision {HEAD}; tokens of 2 users decrypt with {re.escape(str(key_file))}\)", lines[1]), restored.output
    assert access_token(store_url, key_file, uid) == ACCESS


def test_restore_at_picks_the_newest_backup_at_or_before(runner, dest_url, store_url, key_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uid = make_store(store_url, key_file)
    day = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
    backup_to(store_url, dest_url, now=day)
    set_access(store_url, key_file, uid, "second")
    backup_to(store_url, dest_url, now=day + timedelta(hours=2))
    set_access(store_url, key_file, uid, "live")

    args = ["restore", "--from", dest_url, *store_args(store_url, key_file)]
    result = runner.invoke(cli, [*args, "--at", "2026-11-20T13:59:59Z"])
    assert result.exit_code == 0, result.output
    assert f"kissbot-20261120T120000Z-{HEAD}" in result.output
    assert access_token(store_url, key_file, uid) == ACCESS
    result = runner.invoke(cli, [*args, "--at", "2026-11-20 14:00"])
    assert result.exit_code == 0, result.output
    assert access_token(store_url, key_file, uid) == "second"

    before = runner.invoke(cli, [*args, "--at", "2026-11-20T11:00:00+00:00"])
    assert one_line_error(before) == (
        f"Error: no backup in {dest_url} at or before 2026-11-20 11:00:00 UTC (the oldest is 2026-11-20 12:00:00 UTC)"
    )
    assert access_token(store_url, key_file, uid) == "second"


def fake_times(start: datetime) -> list[datetime]:
    """Backups over five weeks: two a day on some days, none on others."""
    times = []
    for day in (0, 1, 1, 3, 8, 9, 15, 22, 29, 30):
        times.append(start + timedelta(days=day, hours=len(times)))
    return times


@pytest.mark.parametrize(
    ("options", "policy"),
    [
        (["--keep-last", "3"], Retention(last=3)),
        (["--keep-daily", "4"], Retention(daily=4)),
        (["--keep-weekly", "3"], Retention(weekly=3)),
        (["--keep-last", "1", "--keep-daily", "2", "--keep-weekly", "2"], Retention(last=1, daily=2, weekly=2)),
    ],
)
def test_prune_by_policy(runner, dest_url, sqlite_url, key_file, options, policy):
    make_store(sqlite_url, key_file)
    for when in fake_times(datetime(2026, 10, 1, 1, 0, tzinfo=timezone.utc)):
        backup_to(sqlite_url, dest_url, now=when)
    before = list_backups(dest_url)
    result = runner.invoke(cli, ["backup", "--to", dest_url, *options, *store_args(sqlite_url, key_file)])
    assert result.exit_code == 0, result.output
    newest = list_backups(dest_url)[-1]
    pruned = [line.removeprefix("Pruned ") for line in result.output.splitlines()[1:]]
    after = [b.name for b in list_backups(dest_url)]
    assert set(after) | set(pruned) == {b.name for b in before} | {newest.name}
    assert not set(after) & set(pruned)
    assert newest.name in after
    if options == ["--keep-last", "3"]:
        assert after == [b.name for b in before[-2:]] + [newest.name]
    elif options == ["--keep-daily", "4"]:
        # today, then the newest of 10-31, 10-30 and 10-23
        assert [n[8:16] for n in after] == ["20261023", "20261030", "20261031", newest.name[8:16]]
    elif options == ["--keep-weekly", "3"]:
        # this week, then the newest of ISO weeks 44 (10-30 and 10-31 are in it) and 43
        assert [n[8:16] for n in after] == ["20261023", "20261031", newest.name[8:16]]
    else:
        assert [n[8:16] for n in after] == ["20261031", newest.name[8:16]]
    assert set(after) == policy.keep([*before, newest])
    names = Objects(dest_url).names()
    assert sorted(names) == sorted([*after, *(n.removesuffix(".sqlite.gz") + ".json" for n in after)])


def test_retention_never_drops_the_newest():
    backups = [BackupInfo(f"kissbot-2026110{d}T000000Z-0002.sqlite.gz", datetime(2026, 11, d, tzinfo=timezone.utc),
                          "0002", "sqlite", 1) for d in range(1, 6)]
    assert Retention(daily=1).keep(backups) == {backups[-1].name}
    assert Retention(weekly=1).keep(backups) == {backups[-1].name}
    assert Retention(last=2).keep(backups) == {backups[-1].name, backups[-2].name}


class CuttingProxy:
    """A TCP proxy to the S3 server that dies (connections cut, port closed) once the client has sent ``limit`` bytes."""

    def __init__(self, upstream: int, limit: int) -> None:
        self.upstream, self.limit, self.sent = upstream, limit, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.dead = threading.Event()
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.dead.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            with self.lock:
                self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
        self.listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    with self.lock:
                        self.sent += len(data)
                        over = self.sent > self.limit
                    if over:
                        dst.sendall(data[: len(data) // 2])
                        self.kill()
                        return
                dst.sendall(data)
        except OSError:
            pass

    def kill(self) -> None:
        self.dead.set()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def big_store(db: Path, key_file: Path, users: int) -> None:
    from kissbot.repo import TokenRepository, UserRepository

    with DatabaseManager(db, key_file) as mgr, mgr.session() as s:
        ids = UserRepository(s).create_users([{"twitch_user_id": str(i), "twitch_login": f"u{i}"} for i in range(1, users + 1)])
        TokenRepository(s).store_many_tokens(
            [(uid, f"a-{uuid.uuid4().hex}", f"r-{uuid.uuid4().hex}", None) for uid in ids.values()], 3600)


def test_upload_cut_mid_way_leaves_no_backup_and_the_next_run_succeeds(runner, moto, s3_url, tmp_path, monkeypatch):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    big_store(db, key_file, 1500)
    proxy = CuttingProxy(int(moto["port"]), limit=64 * 1024)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    args = ["backup", "--to", s3_url, "--db", str(db), "--key-file", str(key_file)]
    before = folder_state(tmp_path)
    cut = runner.invoke(cli, args)
    assert proxy.dead.is_set()
    assert one_line_error(cut).startswith(f"Error: cannot upload kissbot-"), cut.output
    assert folder_state(tmp_path) == before

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto["endpoint"])
    assert runner.invoke(cli, ["backups", "list", s3_url]).output == f"No backups in {s3_url}\n"
    assert not [n for n in Objects(s3_url).names() if n.endswith(".json")]
    again = runner.invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert len(list_backups(s3_url)) == 1


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other key"])
def test_a_damaged_backup_is_refused_and_nothing_changes(runner, dest_url, tmp_path, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    db, key_file = live / "kissbot.db", live / ".kissbot.key"
    make_store(f"sqlite:///{db}", key_file)
    assert runner.invoke(cli, ["backup", "--to", dest_url, "--db", str(db), "--key-file", str(key_file)]).exit_code == 0
    [backup] = list_backups(dest_url)
    objects = Objects(dest_url)
    if damage == "other key":
        other = tmp_path / "other"
        other.mkdir()
        make_store(f"sqlite:///{other / 'kissbot.db'}", other / ".kissbot.key")
        backup_to(other / "kissbot.db", dest_url, now=backup.created_at + timedelta(minutes=1))
        expected = "tokens of 2 of 2 users do not decrypt with the current key: they need key version 1 (fingerprint "
    else:
        data = bytearray(objects.read(backup.name))
        if damage == "flipped byte":
            data[len(data) // 2] ^= 0x40
        else:
            del data[-100:]
        objects.write(backup.name, bytes(data))
        expected = "is corrupted"
    before, around = folder_state(live), sorted(tmp_path.iterdir())
    result = runner.invoke(cli, ["restore", "--from", dest_url, "--db", str(db), "--key-file", str(key_file)])
    assert expected in one_line_error(result)
    assert "nothing restored" in result.output
    assert folder_state(live) == before
    assert sorted(tmp_path.iterdir()) == around


def test_wrong_credentials_or_bucket_one_line(runner, moto, s3_url, tmp_path, monkeypatch):
    db, key_file = tmp_path / "kissbot.db", tmp_path / ".kissbot.key"
    make_store(f"sqlite:///{db}", key_file)
    before = folder_state(tmp_path)
    backup = ["backup", "--db", str(db), "--key-file", str(key_file), "--to"]
    bucket = s3_url.split("/")[2]
    missing = runner.invoke(cli, [*backup, "s3://no-such-bucket-kb/kissbot"])
    assert one_line_error(missing) == "Error: cannot list s3://no-such-bucket-kb/kissbot: no such bucket"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    wrong = runner.invoke(cli, [*backup, s3_url])
    assert one_line_error(wrong) == (
        f"Error: cannot list s3://{bucket}/kissbot: wrong credentials (SignatureDoesNotMatch): "
        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )
    assert "not-the-secret" not in wrong.output
    listed = runner.invoke(cli, ["backups", "list", s3_url])
    assert "wrong credentials" in one_line_error(listed)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    unknown = runner.invoke(cli, ["restore", "--from", s3_url, "--db", str(db), "--key-file", str(key_file)])
    assert "wrong credentials" in one_line_error(unknown)
    assert folder_state(tmp_path) == before


def test_no_token_password_or_key_in_any_uploaded_object_or_output(runner, store_url, key_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    password = "pw-8hJoffsiteDISTINCTIVE"
    if store_url.startswith("postgresql"):  # the test server trusts 127.0.0.1: the password must only not leak
        store_url = make_url(store_url).set(password=password).render_as_string(hide_password=False)
    make_store(store_url, key_file)
    dest = tmp_path / "offsite"
    result = runner.invoke(cli, ["backup", "--to", str(dest), *store_args(store_url, key_file)])
    assert result.exit_code == 0, result.output
    restored = runner.invoke(cli, ["restore", "--from", str(dest), *store_args(store_url, key_file)])
    assert restored.exit_code == 0, restored.output
    assert password not in result.output + restored.output
    key_lines = [line.split(":")[-1].strip().encode() for line in key_file.read_text().splitlines() if line.strip()]
    files = sorted(dest.iterdir())
    assert len(files) == 2
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600
        contents = [path.read_bytes()]
        if path.name.endswith(".gz"):
            contents.append(gzip.decompress(contents[0]))
        elif path.name.endswith(".pgdump"):
            contents.append(subprocess.run(["pg_restore", "-f", "-", str(path)], capture_output=True, check=True).stdout)
            assert b"oauth_tokens" in contents[-1]
        for content in contents:
            for secret in (ACCESS.encode(), REFRESH.encode(), password.encode(), *key_lines):
                assert secret not in content, (path.name, secret[:4])


def test_pg_dump_missing_is_one_line(runner, postgresql_url, key_file, tmp_path, monkeypatch):
    make_store(postgresql_url, key_file)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = runner.invoke(cli, ["backup", "--to", str(tmp_path / "offsite"), *store_args(postgresql_url, key_file)])
    assert one_line_error(result) == (
        "Error: pg_dump is not installed: install the PostgreSQL client tools (e.g. apt-get install postgresql-client)"
    )
    assert not (tmp_path / "offsite").exists()


def test_option_combinations_are_one_line_errors(runner, tmp_path):
    def usage(args):
        return one_line_error(runner.invoke(cli, args))

    assert usage(["backup", "--every", "1h"]) == "Error: --every, --keep-daily and --keep-weekly need --to URL"
    assert usage(["backup", "dest", "--to", str(tmp_path)]) == "Error: give DEST or --to URL, not both"
    assert "the key is never uploaded" in usage(["backup", "--with-key", "--to", str(tmp_path)])
    assert "'0h' is not an interval" in usage(["backup", "--to", str(tmp_path), "--every", "0h"])
    assert "is not an interval from 1s to 366d" in usage(["backup", "--to", str(tmp_path), "--every", "99999999999999999999d"])
    assert "is not a time" in usage(["restore", "--from", str(tmp_path), "--at", "0001-01-01T00:00:00+01:00"])
    assert usage(["restore", "--at", "2026-01-01"]) == "Error: --at needs --from URL"
    assert usage(["restore"]) == "Error: give BACKUP or --from URL"
    assert "is not a time" in usage(["restore", "--from", str(tmp_path), "--at", "yesterday"])
    assert not list(tmp_path.iterdir())


def test_every_runs_until_sigterm_and_prunes(tmp_path):
    db, key_file, dest = tmp_path / "kissbot.db", tmp_path / ".kissbot.key", tmp_path / "offsite"
    make_store(f"sqlite:///{db}", key_file)
    out = tmp_path / "out.txt"
    exe = shutil.which("kissbot", path=os.path.dirname(sys.executable))
    with open(out, "w") as fh:
        proc = subprocess.Popen(
            [exe, "backup", "--db", str(db), "--key-file", str(key_file), "--to", str(dest), "--every", "1s",
             "--keep-last", "2"], stdout=fh, stderr=subprocess.PIPE, text=True,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while out.read_text().count("Uploaded") < 3:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "timed out waiting for three backups"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = out.read_text()
    assert output.endswith("Stopped\n"), output
    assert "Pruned" in output
    assert "stopping after the current backup" in proc.stderr.read()
    assert len(list_backups(dest)) == 2
    assert len(list(dest.iterdir())) == 4
