"""The ingress's hot path without a database round trip: the host's index, the credentials
snapshot and the background delivery notes, each against fakes of their ports (no services)."""

from __future__ import annotations

import multiprocessing
import threading
import time

import psycopg
import pytest

from ingress.credentials import Credentials
from ingress.local_index import LocalIndex, today
from ingress.notes import DeliveryNotes
from ingress.store import App, Snapshot
from shipline import messages as m
from shipline.envelope import wrap

pytestmark = pytest.mark.unit


def _app(app_id: int, **fields) -> App:
    base = dict(name=f"app{app_id}", namespace="acme", repo_key="github.com/acme/shop", branch="main", image=None,
                kind="service", allow_unsigned=False, secret_encrypted=None, token_hash=None)
    return App(app_id, **{**base, **fields})  # type: ignore[arg-type]


class FakeSource:
    """The snapshot port: what PostgreSQL would answer, and how often it was asked."""

    def __init__(self, apps: list[App], hooks: list[tuple[str, str, int]] | None = None) -> None:
        self.apps, self.hooks = apps, hooks or []
        self.gen = 1
        self.loads = 0
        self.polls = 0
        self.fail = False

    def snapshot(self) -> Snapshot:
        if self.fail:
            raise psycopg.OperationalError("connection refused")
        self.loads += 1
        return Snapshot(self.gen, list(self.apps), list(self.hooks))

    def generation(self) -> int:
        self.polls += 1
        if self.fail:
            raise psycopg.OperationalError("connection refused")
        return self.gen

    def change(self, apps: list[App], hooks: list[tuple[str, str, int]] | None = None) -> None:
        self.apps, self.hooks = apps, hooks or []
        self.gen += 1


# ------------------------------------------------------------------------------ local index


def _add_from_child(path: str, delivery: str) -> None:
    index = LocalIndex(__import__("pathlib").Path(path))
    index.add([7], delivery, today())
    index.bump()


def test_index_is_shared_by_processes_on_the_host(tmp_path):
    path = tmp_path / "run" / "ingress.sqlite3"
    index = LocalIndex(path)
    assert index.seen([7], "d-1", today() - 30) == set() and index.generation() == 0
    child = multiprocessing.get_context("spawn").Process(target=_add_from_child, args=(str(path), "d-1"))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert index.seen([7], "d-1", today() - 30) == {7}  # accepted by another process: a duplicate here
    assert index.seen([7, 8], "d-1", today() - 30) == {7}  # per app: app 8 has not seen it
    assert index.generation() == 1


def _bump_many(path: str, times: int) -> None:
    index = LocalIndex(__import__("pathlib").Path(path))
    for _ in range(times):
        index.bump()


def test_generation_bumps_from_many_processes_are_never_lost(tmp_path):
    path = tmp_path / "i.sqlite3"
    index = LocalIndex(path)
    assert index.generation() == 0  # mapped before the others write: it sees their bumps live
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_bump_many, args=(str(path), 100)) for _ in range(4)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert index.generation() == 400
    assert LocalIndex(path).generation() == 400  # and a process started later reads the same file


def test_index_window_and_prune(tmp_path):
    index = LocalIndex(tmp_path / "i.sqlite3")
    index.add([1, 2], "old", today() - 40)
    index.add([1], "young", today())
    assert index.seen([1, 2], "old", today() - 30) == set()  # outside the dedupe window
    assert index.seen([1, 2], "old", today() - 50) == {1, 2}
    assert index.prune(today() - 30) == 2
    assert index.seen([1], "young", today() - 30) == {1}
    index.add([1], "old", today())  # accepted again later: the day moves forward
    assert index.seen([1], "old", today() - 1) == {1}


def test_index_fills_from_the_database_once_per_file_and_store(tmp_path):
    index = LocalIndex(tmp_path / "i.sqlite3")
    asked = []

    def rows(n: int, prefix: str = "d"):
        asked.append(n)
        for i in range(n):
            yield 3, f"{prefix}{i}", today()

    assert index.fill("store-a", rows(25_000)) == 25_000
    assert index.seen([3], "d24999", today() - 1) == {3}
    other = LocalIndex(tmp_path / "i.sqlite3")  # another worker starting on the same host
    assert other.fill("store-a", rows(5)) == 0
    assert asked == [25_000]  # the second fill never read the database
    # the schema was dropped and made again: app 3 is a new app, the old ids must not be duplicates
    assert other.fill("store-b", rows(2, prefix="new")) == 2
    assert index.seen([3], "d0", 0) == set() and index.seen([3], "new1", 0) == {3}


def test_index_fill_that_fails_leaves_it_unfilled(tmp_path):
    index = LocalIndex(tmp_path / "i.sqlite3")

    def broken():
        yield 1, "a", today()
        raise psycopg.OperationalError("gone")

    with pytest.raises(psycopg.OperationalError):
        index.fill("s", broken())
    assert index.seen([1], "a", 0) == set()
    assert index.fill("s", iter([(1, "b", today())])) == 1


# ------------------------------------------------------------------------- credentials view


def test_lookups_follow_the_snapshot_and_mark_seen_deliveries(tmp_path):
    index = LocalIndex(tmp_path / "i.sqlite3")
    a, b = _app(1, token_hash="t1"), _app(2, name="app1", namespace="acme")  # b reuses a's name: newest wins
    source = FakeSource([a, b], hooks=[("h1", "hash1", 1), ("h-gone-app", "hash9", 99)])
    creds = Credentials(source, index, dedupe_days=30)
    assert creds.app(1, "d").id == 1 and creds.app(3, "d") is None  # type: ignore[union-attr]
    assert [x.id for x in creds.apps_by_repo(["github.com/acme/shop", "nothing"], "d")] == [1, 2]
    assert creds.app_by_name("acme", "app1", "d").id == 2  # type: ignore[union-attr]
    assert creds.hook_by_token("hash1", "d")[:2] == ("h1", "hash1")  # type: ignore[index]
    assert creds.hook_by_token("hash9", "d") is None  # a hook of an app that is gone
    index.add([1], "d", today())
    assert creds.app(1, "d").seen is True and creds.app(2, "d").seen is False  # type: ignore[union-attr]
    assert [x.seen for x in creds.apps_by_repo(["github.com/acme/shop"], "d")] == [True, False]
    assert source.loads == 1  # all from one snapshot


def test_a_change_on_this_host_is_seen_by_the_next_request(tmp_path):
    index = LocalIndex(tmp_path / "i.sqlite3")
    source = FakeSource([_app(1)], hooks=[("h1", "hash1", 1)])
    creds = Credentials(source, index, dedupe_days=30, poll_every=3600)
    assert creds.hook_by_token("hash1", "d") is not None
    source.change([_app(1)], hooks=[])  # the hook deleted ...
    assert creds.hook_by_token("hash1", "d") is not None  # ... not yet told: within the poll bound
    LocalIndex(index.path).bump()  # the management API (any process) tells the host after the commit
    assert creds.hook_by_token("hash1", "d") is None
    assert source.loads == 2


def test_a_change_elsewhere_is_seen_within_the_poll_bound(tmp_path):
    source = FakeSource([_app(1)])
    creds = Credentials(source, LocalIndex(tmp_path / "i.sqlite3"), dedupe_days=30, poll_every=0.2)
    assert creds.app(1, "d") is not None
    source.change([])  # deleted through another host: only PostgreSQL's generation moved
    deadline = time.monotonic() + 5
    while creds.app(1, "d") is not None:
        assert time.monotonic() < deadline, "the change was never seen"
        time.sleep(0.05)
    polls = source.polls
    time.sleep(0.05)
    creds.app(1, "d")
    assert source.polls <= polls + 1  # polled at most once per bound, not per request


def test_known_stale_snapshot_is_never_served_and_a_failed_poll_keeps_the_view(tmp_path):
    index = LocalIndex(tmp_path / "i.sqlite3")
    source = FakeSource([_app(1)])
    creds = Credentials(source, index, dedupe_days=30, poll_every=0.0)
    assert creds.app(1, "d") is not None
    source.fail = True
    assert creds.app(1, "d") is not None  # the poll failed: nothing can have changed meanwhile
    index.bump()  # but a change was committed here: reloading is required, so the request fails
    with pytest.raises(psycopg.OperationalError):
        creds.app(1, "d")
    source.fail = False
    source.change([])
    assert creds.app(1, "d") is None


def test_threads_wait_for_a_reload_rather_than_read_the_stale_view(tmp_path):
    index = LocalIndex(tmp_path / "i.sqlite3")
    release = threading.Event()

    class SlowSource(FakeSource):
        def snapshot(self) -> Snapshot:
            if self.loads >= 1:
                release.wait(5)
            return super().snapshot()

    source = SlowSource([_app(1)])
    creds = Credentials(source, index, dedupe_days=30, poll_every=3600)
    assert creds.app(1, "d") is not None
    source.change([])
    index.bump()
    answers: list[object] = []
    threads = [threading.Thread(target=lambda: answers.append(creds.app(1, "d"))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    assert answers == []  # all wait for the reload in progress
    release.set()
    for t in threads:
        t.join(5)
    assert answers == [None] * 4 and source.loads == 2


# --------------------------------------------------------------------------- delivery notes


def _delivery(app_id: int, delivery: str, hook_id: str | None = None, verification: str = "hmac"):
    msg = m.DeliveryReceived(app_id=app_id, delivery_id=delivery, source="github", route="/x", event="push",
                             headers={}, body="{}", body_encoding="utf8", verification=verification,
                             received_at="2026-12-07T12:00:00Z", hook_id=hook_id)
    return wrap(msg, source="/shipline/ingress")


class FakeSink:
    def __init__(self, failures: int = 0) -> None:
        self.batches: list[list[tuple]] = []
        self.failures = failures

    def note_deliveries(self, rows) -> None:
        if self.failures:
            self.failures -= 1
            raise psycopg.OperationalError("server closed the connection")
        self.batches.append(list(rows))


def test_notes_are_written_in_batches_with_hook_and_token_use():
    sink = FakeSink()
    notes = DeliveryNotes(sink, flush_every=0.02)
    notes.add([_delivery(1, "a", hook_id="h1", verification="deploy_hook")])
    notes.add([_delivery(2, "b", verification="token"), _delivery(3, "b")])
    assert notes.flush(5)
    rows = [r for batch in sink.batches for r in batch]
    assert rows == [(1, "a", "2026-12-07T12:00:00Z", "h1", False), (2, "b", "2026-12-07T12:00:00Z", None, True),
                    (3, "b", "2026-12-07T12:00:00Z", None, False)]
    assert len(sink.batches) <= 2  # gathered, not one write per request


def test_notes_survive_database_errors_and_lose_nothing(caplog):
    sink = FakeSink(failures=2)
    notes = DeliveryNotes(sink, flush_every=0.01)
    notes.add([_delivery(i, f"d{i}") for i in range(50)])
    assert notes.flush(10)
    assert [r[1] for batch in sink.batches for r in batch] == [f"d{i}" for i in range(50)]
    assert "could not note 50 accepted deliveries: OperationalError; retrying" in caplog.text


def test_a_committed_change_is_not_failed_by_an_unusable_host_index(tmp_path, caplog):
    from ingress.web import announcer

    (tmp_path / "dir.sqlite3").mkdir()  # not a database: every statement fails
    (tmp_path / "dir.sqlite3.generation").mkdir()  # and no counter can be mapped
    announcer(LocalIndex(tmp_path / "dir.sqlite3"))()
    assert "credentials changed but the host index could not say so (GenerationUnavailable)" in caplog.text
