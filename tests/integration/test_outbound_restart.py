"""Durable retries: kill -9 the dispatcher between attempts, restart it, nothing is lost or early."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbound.schema import MIGRATIONS
from outbound.testing import EventLog, Received, Receiver, wait_until
from shipline.db import make_pool, migrate
from shipline.messages import Deployed

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def rows(settings: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.db_url) as conn:
        return conn.execute(query.replace("{s}", settings.schema("outbound")), params).fetchall()


def start(settings: Any, tmp: Path, name: str, **env: str) -> subprocess.Popen[bytes]:
    out = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "outbound"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **settings.env, **env})


def test_pending_retries_survive_kill_9_none_lost_none_early_and_sigterm_stops_quickly(settings, tmp_path):
    seen: dict[str, int] = {}
    release = threading.Event()
    lock = threading.Lock()

    def policy(req: Received) -> tuple[int, dict[str, str], bytes]:
        if req.path == "/hang":
            release.wait(60)
            return 200, {}, b"late"
        with lock:
            seen[req.delivery] = seen.get(req.delivery, 0) + 1
            first = seen[req.delivery] == 1
        return (500, {}, b"not yet") if first else (200, {}, b"ok")

    pool = make_pool(settings.db_url, max_size=1)
    migrate(pool, settings.schema("outbound"), MIGRATIONS)  # the test reads the tables before the first start
    pool.close()
    receiver = Receiver(policy)
    env = {"SHIPLINE_RETRY_SCHEDULE": "4,4", "SHIPLINE_RETRY_SCALE": "1"}
    log = EventLog(settings)
    apps = [41, 42, 43, 44]
    for app in apps:
        log.subscribe(app, receiver.url("/hook"), ["deployed"])
    hang_sid, _ = log.subscribe(45, receiver.url("/hang"), ["deployed"])
    log.emit(*[Deployed(app_id=a, revision=1, image="i", commit="c", instances=[], duration=0.1, url="") for a in apps])
    first = start(settings, tmp_path, "first", **env)
    second = None
    try:
        wait_until(lambda: rows(settings, "SELECT count(*) FROM {s}.deliveries WHERE tries = 1")[0][0] == 4,
                   what="four failed first attempts recorded")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        due = dict(rows(settings, "SELECT id::text, extract(epoch FROM next_attempt_at)::float8 FROM {s}.deliveries"))
        assert all(at > time.time() - 1 for at in due.values())
        second = start(settings, tmp_path, "second", **env)
        wait_until(lambda: sum(1 for r in receiver.received("/hook") if r.status == 200) == 4, timeout=90,
                   what="every delivery succeeds after the restart")
        by_delivery: dict[str, list[Received]] = {}
        for r in receiver.received("/hook"):
            by_delivery.setdefault(r.delivery, []).append(r)
        assert set(by_delivery) == set(due), "none lost"
        for did, reqs in by_delivery.items():
            assert [r.status for r in reqs] == [500, 200], "exactly one retry each"
            assert reqs[1].at >= due[did] - 0.01, "no retry before its durable next_attempt_at"

        # SIGTERM with a request hanging: the dispatcher stops within 10 s and keeps the delivery pending
        log.emit(Deployed(app_id=45, revision=1, image="i", commit="c", instances=[], duration=0.1, url=""))
        wait_until(lambda: receiver.received("/hang"), what="a hanging request in flight")
        stopped = time.monotonic()
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
        assert time.monotonic() - stopped < 10
        assert rows(settings, "SELECT status FROM {s}.deliveries WHERE subscription_id = %s", hang_sid) == [
            ("pending",)]
    finally:
        release.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        receiver.close()
