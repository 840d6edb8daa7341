"""kill -9 the projector process mid-stream, twice, restart it: the tables equal an uninterrupted run."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from projections.schema import checksum
from tests.integration.test_projections_kit import produce, projector, pushes, wait_caught_up

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def folded(settings) -> int:
    """Records the projection has committed (sum of stored next offsets)."""
    with psycopg.connect(settings.db_url, autocommit=True) as conn:
        try:
            row = conn.execute(f'SELECT coalesce(sum("offset"), 0) FROM {settings.schema("projections")}.offsets')
            return int(row.fetchone()[0])
        except psycopg.errors.UndefinedTable:
            return 0


def test_kill_9_mid_stream_and_restart_leaves_tables_identical(settings, pg_schema, tmp_path) -> None:
    s = pushes(apps=150, cycles=30)
    produce(settings, s.envs)
    total = len(s.envs)
    env = {**os.environ, **settings.env, "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "projector.log", "ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "projections"], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)

    kills = []
    for fraction in (0.1, 0.5):
        proc = start()
        deadline = time.monotonic() + 120
        while (done := folded(settings)) < fraction * total:
            assert proc.poll() is None, (tmp_path / "projector.log").read_text()
            assert time.monotonic() < deadline, f"no progress past {done}/{total}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills.append(done)
        assert done < total, "the projector finished before it could be killed mid-stream"
        print(f"killed at {done}/{total}")
    assert kills[0] < kills[1]

    proc = start()
    try:
        wait_caught_up(settings, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0

    # the uninterrupted run: another schema, another group, the same topic
    reference = dataclasses.replace(settings, db_schema=pg_schema + "ref")
    with projector(reference, group=f"{settings.topic_prefix}-reference"):
        wait_caught_up(reference, timeout=120)

    with psycopg.connect(settings.db_url, autocommit=True) as conn:
        killed = checksum(conn, settings.schema("projections"))
        uninterrupted = checksum(conn, reference.schema("projections"))
    assert killed == uninterrupted
    assert killed["audit"].startswith(f"{total}:")
