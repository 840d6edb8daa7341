"""Rebuild from offset 0 into fresh tables and swap them in while the API answers and the live
projector keeps running; the rebuilt tables equal the live ones by checksum."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import psycopg
import pytest
import requests

from projections.projector import migrate_schema
from projections.rebuild import (
    RebuildError,
    _run_workers,
    _watermarks,
    _worker_count,
    names,
    rebuild,
    swap_in,
)
from projections.schema import checksum
from tests.integration.test_projections_kit import Story, produce, projector, pushes, rows, serve, wait_caught_up

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def live_checksum(settings) -> dict[str, str]:
    with psycopg.connect(settings.db_url, autocommit=True) as conn:
        return checksum(conn, settings.schema("projections"))


class Reader(threading.Thread):
    """Reads the history API in a loop, keeping every status code and body size."""

    def __init__(self, settings) -> None:
        super().__init__(daemon=True)
        self.url = f"{settings.public_url}/api/v1/apps/1/history"
        self.headers = {"Authorization": f"Bearer {settings.admin_token}"}
        self.stop = threading.Event()
        self.answers: list[tuple[int, int]] = []

    def run(self) -> None:
        with requests.Session() as http:
            while not self.stop.is_set():
                resp = http.get(self.url, headers=self.headers, timeout=30)
                self.answers.append((resp.status_code, len(resp.json()) if resp.ok else -1))


def test_rebuild_equals_live_and_swaps_in_while_the_api_answers(settings) -> None:
    s = pushes(apps=20, cycles=15)
    produce(settings, s.envs)
    with projector(settings), serve(settings):
        wait_caught_up(settings)
        live = live_checksum(settings)
        reader = Reader(settings)
        reader.start()
        progress = io.StringIO()
        result = rebuild(settings, progress=progress)
        reader.stop.set()
        reader.join(30)

        assert result.checksum == live  # rebuilt from offset 0 == what the live projector folded
        assert result.swapped and result.events == len(s.envs) and result.applied == len(s.envs)
        assert live_checksum(settings) == live  # swapped in, same content
        assert "100%" in progress.getvalue() and f"{len(s.envs):,}/{len(s.envs):,} events" in progress.getvalue()
        assert len(reader.answers) > 0
        assert {code for code, _ in reader.answers} == {200}
        assert {size for _, size in reader.answers} == {15}  # never empty, never partial

        # the live projector carries on in the swapped-in schema
        more = Story(tag="more")
        more.seq.update(s.seq)
        more.push_to_deploy(1, 16, 16, "gh-after-rebuild")
        produce(settings, more.envs)
        wait_caught_up(settings)
        assert rows(settings, "SELECT current_revision FROM {s}.apps WHERE app_id = 1") == [{"current_revision": 16}]
        schemas = rows(settings, "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
                       (settings.schema("projections") + "%",))
        assert [r["nspname"] for r in schemas] == [settings.schema("projections")]  # old one dropped


def test_events_after_the_snapshot_are_folded_into_the_swapped_in_tables(settings) -> None:
    first = pushes(apps=5, cycles=4)
    produce(settings, first.envs)
    with projector(settings):
        wait_caught_up(settings)
        built = rebuild(settings, swap=False, progress=None)  # snapshot of `first` only, beside live
        later = Story(tag="later")
        later.seq.update(first.seq)
        for app in range(1, 6):
            later.push_to_deploy(app, 5, 5, f"gh-later-{app}")
        produce(settings, later.envs)
        wait_caught_up(settings)  # live has first + later
        everything = live_checksum(settings)
        assert built.checksum != everything

        swap_in(settings)  # live now holds `first` only; the projector must notice and fold `later` again
        wait_caught_up(settings)
        assert rows(settings, "SELECT count(*) AS n FROM {s}.releases WHERE revision = 5") == [{"n": 5}]
        assert live_checksum(settings) == everything


def test_a_rebuild_shared_out_over_worker_processes_equals_the_live_tables(settings) -> None:
    s = pushes(apps=12, cycles=6)
    produce(settings, s.envs)
    with projector(settings):
        wait_caught_up(settings)
        live = live_checksum(settings)
    used = rows(settings, 'SELECT count(*) AS n FROM {s}.offsets WHERE "offset" > 0')[0]["n"]
    assert used >= 2  # the apps' records sit in several partitions: there is something to share out

    parallel = replace(settings, rebuild_workers=2)
    assert _worker_count(parallel, used, len(s.envs)) == 2
    assert _worker_count(settings, used, len(s.envs)) == 1  # automatic: a small log is not worth a process
    progress = io.StringIO()
    result = rebuild(parallel, progress=progress)

    assert result.checksum == live
    assert result.events == result.applied == len(s.envs) and result.rejected == 0
    assert f"{len(s.envs):,}/{len(s.envs):,} events" in progress.getvalue()
    assert live_checksum(settings) == live


def test_a_worker_that_fails_fails_the_rebuild_with_its_reason(settings) -> None:
    s = pushes(apps=2, cycles=1)
    produce(settings, s.envs)
    fresh, _ = names(settings.schema("projections"))
    migrate_schema(settings, fresh)
    marks = _watermarks(settings, settings.topics.events)
    # a watermark the log never reaches: the worker reads everything, then waits for more in vain
    share = {p: (low, high + 10) for p, (low, high) in marks.items() if high > low}
    with pytest.raises(RebuildError, match=r"rebuild-worker-0 failed: RebuildError: no records for 1s"):
        _run_workers(settings, fresh, settings.topics.events, [share], 1000, 1.0, lambda done: None)


# a rebuild's parent process whose two workers wait for records past the end of the log (60 s)
STALLED_PARENT = """
import os
from shipline.config import load
from projections.rebuild import _run_workers, _watermarks, names
settings = load(os.environ)
fresh, _ = names(settings.schema("projections"))
marks = _watermarks(settings, settings.topics.events)
todo = sorted(p for p, (low, high) in marks.items() if high > low)
shares = [{p: (marks[p][0], marks[p][1] + 10) for p in todo[i::2]} for i in range(2)]
_run_workers(settings, fresh, settings.topics.events, shares, 1000, 60.0, lambda done: None)
"""


def test_killing_a_parallel_rebuild_takes_its_workers_down_and_the_next_rebuild_is_whole(settings, tmp_path) -> None:
    s = pushes(apps=12, cycles=6)
    produce(settings, s.envs)
    with projector(settings):
        wait_caught_up(settings)
        live = live_checksum(settings)
    fresh, _ = names(settings.schema("projections"))
    migrate_schema(settings, fresh)
    env = {**os.environ, **settings.env, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "rebuild.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", STALLED_PARENT], env=env, cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT)
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while len(workers := [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]) < 2:
        assert proc.poll() is None, (tmp_path / "rebuild.log").read_text()
        assert time.monotonic() < deadline, "the rebuild started no workers"
        time.sleep(0.05)
    time.sleep(3)  # past their start-up: replaying, then waiting for records that never come
    assert all(w.is_running() for w in workers)
    proc.kill()
    proc.wait(10)

    _, alive = psutil.wait_procs(workers, timeout=10)  # not the 60 s they would otherwise wait
    assert alive == []  # no orphan keeps writing into the fresh schema
    result = rebuild(settings, progress=None)
    assert result.checksum == live
    assert live_checksum(settings) == live
