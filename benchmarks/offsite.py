"""Off-site backup case: `backup_to` of a store to a local S3 server, while a bot writes.

The floor is the same work without kissbot: SQLite's backup API into a file,
gzip, one ``obstore.put``. The S3 server is moto's server mode on 127.0.0.1
(the test extra installs it); without it the upload goes to a folder.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks import raw
from benchmarks.cases import Context, Row, fernet_of, ns, open_store, percentile, with_writer


@contextmanager
def local_s3(workdir: Path) -> Iterator[tuple[str, object | None]]:
    """``(url, obstore store)`` of a bucket on a moto server started here, or of a folder if moto is missing."""
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    try:
        import obstore.store
    except ImportError:
        exe = None
    if exe is None:
        yield str(workdir / "offsite"), None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/kissbot-bench", method="PUT"), timeout=30)
        yield "s3://kissbot-bench/kissbot", obstore.store.from_url("s3://kissbot-bench/floor", client_options={"allow_http": True})
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=60)


def bench_offsite(ctx: Context) -> list[Row]:
    from kissbot.offsite import backup_to

    s = ctx.sizes
    path, key_file = ctx.workdir / "offsite.db", ctx.workdir / "offsite.key"
    open_store(path, key_file).close()
    conn = raw.connect(str(path))
    ids = raw.bulk_users_and_tokens(conn, fernet_of(key_file), s.offsite_rows, due=0, login_prefix="offsite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    with local_s3(ctx.workdir) as (url, floor_store):

        def kissbot_backup() -> int:
            return backup_to(path, url).size

        def raw_backup() -> int:
            snap, packed = ctx.workdir / "floor.db", ctx.workdir / "floor.db.gz"
            src, dst = sqlite3.connect(path), sqlite3.connect(snap)
            src.backup(dst, pages=-1)
            src.close()
            dst.close()
            with open(snap, "rb") as fh, gzip.open(packed, "wb", compresslevel=6) as out:
                shutil.copyfileobj(fh, out, 1 << 20)
            if floor_store is None:
                shutil.copyfile(packed, ctx.workdir / "floor-upload.gz")
            else:
                import obstore

                obstore.put(floor_store, f"floor-{ns()}.gz", packed)
            size = packed.stat().st_size
            snap.unlink()
            packed.unlink()
            return size

        k_secs, k_lat, k_size = with_writer(path, key_file, ids[0], s.writer_pause_ms, kissbot_backup)
        r_secs, r_lat, r_size = with_writer(path, key_file, ids[0], s.writer_pause_ms, raw_backup)
    where = "local S3 (moto)" if floor_store is not None else "a folder (moto not installed)"
    k50, k99 = (percentile(k_lat, 0.5), percentile(k_lat, 0.99)) if k_lat else (float("nan"),) * 2
    r50, r99 = (percentile(r_lat, 0.5), percentile(r_lat, 0.99)) if r_lat else (float("nan"),) * 2
    ctx.notes.append(
        f"Off-site backup: `backup_to` of {s.offsite_rows:,} tokens to {where} uploaded {k_size / 1e6:,.1f} MB "
        f"(the floor's gzip: {r_size / 1e6:,.1f} MB); kissbot adds integrity_check, the schema check and the manifest."
    )
    return [
        Row(f"backup --to of a {s.offsite_rows:,}-token store to {where} (snapshot, gzip, upload), writer running",
            f"{k_secs:,.2f} s", f"{r_secs:,.2f} s", k_secs / r_secs, "(duration, no target)", None),
        Row(f"  a bot's store_tokens latency during that backup ({len(k_lat)} / {len(r_lat)} samples)",
            f"p50 {k50:.1f} ms, p99 {k99:.1f} ms", f"p50 {r50:.1f} ms, p99 {r99:.1f} ms",
            k99 / r99 if r_lat and k_lat else None, "p99 ≤ 250 ms", k99 <= 250 if k_lat else None,
            ratio_label="x (p99)"),
    ]
