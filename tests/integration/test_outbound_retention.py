"""The dispatcher forgets pushes and builds after SHIPLINE_OUTBOUND_KEEP_DAYS; build payloads survive it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound.schema import MIGRATIONS
from outbound.store import Store
from outbound.testing import EventLog, Receiver, Running, wait_until
from shipline.db import make_pool, migrate
from shipline.messages import BuildFinished, BuildQueued, DeliveryAccepted

pytestmark = pytest.mark.integration

BUILD = {"commit": "c" * 40, "message": "m", "author": "a", "ref": "refs/heads/main",
         "repo_url": "https://github.com/acme/shop", "queued_at": "2026-01-01T00:00:00Z"}


@pytest.fixture
def store(database_url: str, pg_schema: str) -> Iterator[Store]:
    schema = f"{pg_schema}_outbound"
    pool = make_pool(database_url, schema=schema, name="test-outbound")
    migrate(pool, schema, MIGRATIONS)
    yield Store(pool, schema)
    pool.close()


def _age(store: Store, table: str, where: str, params: tuple[Any, ...], days: float) -> None:
    with store.pool.connection() as conn:
        cur = conn.execute(store.q(f"UPDATE {{s}}.{table} SET seen_at = now() - make_interval(days => %s)"
                                   f" WHERE {where}"), (days, *params))
        assert cur.rowcount >= 1


def _column(store: Store, query: str) -> list[Any]:
    with store.pool.connection() as conn:
        return sorted(r[0] for r in conn.execute(store.q(query)).fetchall())


def test_prune_deletes_rows_older_than_the_keep_period_in_batches_and_keeps_younger_ones(store):
    with store.pool.connection() as conn:
        for i in range(5):
            store.save_push(conn, f"d-{i}", 1, {"id": i}, {"login": f"u{i}"})
            store.save_build(conn, 1, i, {**BUILD, "delivery_id": f"d-{i}"})
    _age(store, "pushes", "delivery_id = ANY(%s)", (["d-0", "d-1", "d-2"],), 31)
    _age(store, "builds", "build = ANY(%s)", ([0, 1],), 31)
    _age(store, "builds", "build = %s", (2,), 29)  # within the keep period: stays

    assert store.prune(30, batch=2) == {"pushes": 3, "builds": 2}  # 3 pushes: a full batch, then a short one
    assert _column(store, "SELECT delivery_id FROM {s}.pushes") == ["d-3", "d-4"]
    assert _column(store, "SELECT build FROM {s}.builds") == [2, 3, 4]
    assert store.prune(30) == {"pushes": 0, "builds": 0}

    with store.pool.connection() as conn:  # what a build_finish joins once its push is gone
        ctx = store.build_context(conn, 1, 2)
        assert ctx["build"]["delivery_id"] == "d-2" and ctx["push"] is None
        assert store.build_context(conn, 1, 0) == {"build": None, "app": None, "push": None}


def test_builds_that_predate_the_seen_at_column_are_kept_a_full_period_after_the_upgrade(database_url, pg_schema):
    schema = f"{pg_schema}_outbound"
    pool = make_pool(database_url, schema=schema, name="test-outbound")
    try:
        migrate(pool, schema, MIGRATIONS[:1])
        with pool.connection() as conn:
            conn.execute(f"INSERT INTO {schema}.builds (app_id, build, commit, message, author, ref, repo_url,"
                         " delivery_id, queued_at) VALUES (1, 1, 'c', 'm', 'a', 'r', 'u', 'd', '2020-01-01T00:00:00Z')")
        assert migrate(pool, schema, MIGRATIONS) == [2]
        store = Store(pool, schema)
        assert store.prune(30) == {"pushes": 0, "builds": 0}
        with pool.connection() as conn:
            row = conn.execute(f"SELECT now() - seen_at < interval '1 minute' FROM {schema}.builds").fetchone()
        assert row == (True,)
    finally:
        pool.close()


def _push(app_id: int, delivery_id: str) -> DeliveryAccepted:
    body = json.dumps({
        "repository": {"id": 42, "name": "shop", "clone_url": "https://github.com/acme/shop.git",
                       "owner": {"id": 7, "login": "acme"}},
        "head_commit": {"author": {"name": "Ada Lovelace", "username": "ada"}},
    })
    return DeliveryAccepted(app_id=app_id, delivery_id=delivery_id, source="github", route="/github", event="push",
                            verification="signed", received_at="2026-01-01T00:00:00Z", outcome="queued", reason="",
                            headers={"Content-Type": "application/json"}, body=body, body_encoding="utf8")


def _queued(app_id: int, build: int, delivery_id: str) -> BuildQueued:
    return BuildQueued(app_id=app_id, build=build, commit="c" * 40, message=f"build {build}", author="ada",
                       ref="refs/heads/main", delivery_id=delivery_id, repo_url="https://github.com/acme/shop")


def _finished(app_id: int, build: int) -> BuildFinished:
    return BuildFinished(app_id=app_id, build=build, commit="c" * 40, status="succeeded", exit_code=0,
                         image_id="img", tags=["acme/shop:latest"], duration=1.0, log="", log_path="")


def test_the_dispatcher_prunes_periodically_and_a_build_finishing_after_it_still_gets_a_payload(settings):
    receiver = Receiver()
    log = EventLog(settings)
    schema = settings.schema("outbound")

    def rows(query: str) -> list[Any]:
        with psycopg.connect(settings.db_url) as conn:
            return sorted(r[0] for r in conn.execute(query.replace("{s}", schema)).fetchall())

    try:
        log.subscribe(5, receiver.url(), ["build_finish"])
        with Running(settings, prune_first=0.0, prune_every=0.2) as dispatcher:
            assert dispatcher.pruner.days == 30  # SHIPLINE_OUTBOUND_KEEP_DAYS' default
            log.emit(_push(5, "old"), _queued(5, 1, "old"), _push(5, "new"), _queued(5, 2, "new"))
            wait_until(lambda: rows("SELECT build FROM {s}.builds") == [1, 2], what="both builds cached")
            assert rows("SELECT delivery_id FROM {s}.pushes") == ["new", "old"]
            with psycopg.connect(settings.db_url) as conn:
                conn.execute(f"UPDATE {schema}.pushes SET seen_at = now() - interval '31 days'"
                             " WHERE delivery_id = 'old'")
                conn.execute(f"UPDATE {schema}.builds SET seen_at = now() - interval '31 days' WHERE build = 1")
            wait_until(lambda: rows("SELECT build FROM {s}.builds") == [2], timeout=20, what="old build pruned")
            wait_until(lambda: rows("SELECT delivery_id FROM {s}.pushes") == ["new"], timeout=20,
                       what="old push pruned")

            log.emit(_finished(5, 1), _finished(5, 2))
            got = wait_until(lambda: len(receiver.received()) >= 2 and receiver.received(), what="two build_finish")
        old, new = (r.json() for r in got)
        assert new["build"]["build_num"] == 2 and new["commit"]["message"] == "build 2"
        assert new["commit"]["author"] == {"login": "ada", "name": "Ada Lovelace"}
        assert new["repository"] == {"clone_url": "https://github.com/acme/shop.git", "id": 42, "name": "shop",
                                     "owner": {"id": 7, "login": "acme"}}
        # pruned: still a valid build_finish, with what is gone null and the rest from the event itself
        assert old["build"]["build_num"] == 1 and old["build"]["status"] == "succeeded"
        assert old["commit"] == {"author": {"login": None, "name": None}, "message": None, "sha": "c" * 40}
        assert old["repository"] == {"clone_url": None, "id": None, "name": None, "owner": {"id": None, "login": None}}
        assert old["images"] == [{"id": "img", "pushed": False}]
        assert rows("SELECT build FROM {s}.builds") == [2]  # a finish does not bring the pruned rows back
    finally:
        receiver.close()


def test_a_replay_joins_the_push_and_build_queued_it_reads_in_the_log_once_their_rows_are_pruned(settings):
    receiver = Receiver()
    log = EventLog(settings)
    schema = settings.schema("outbound")
    try:
        log.subscribe(6, receiver.url("/live"), ["build_finish"])
        with Running(settings) as dispatcher:
            log.emit(_push(6, "d-1"), _queued(6, 1, "d-1"), _finished(6, 1))
            (live,) = wait_until(lambda: receiver.received("/live"), what="the live build_finish")
            with psycopg.connect(settings.db_url) as conn:  # the dispatcher's hourly prune, 31 days on
                conn.execute(f"UPDATE {schema}.pushes SET seen_at = now() - interval '31 days'")
                conn.execute(f"UPDATE {schema}.builds SET seen_at = now() - interval '31 days'")
            assert dispatcher.store.prune(30) == {"pushes": 1, "builds": 1}
            with dispatcher.store.pool.connection() as conn:
                assert dispatcher.store.build_context(conn, 6, 1) == {"build": None, "app": None, "push": None}

            sid, _ = log.subscribe(6, receiver.url("/replay"), ["build_finish"])
            wait_until(lambda: dispatcher.store.subscription(sid), what="the replay's subscriber")
            dispatcher.store.request_replay("00000000-0000-4000-8000-000000000006", sid, None, 1)
            dispatcher.replayer.wake()
            (replayed,) = wait_until(lambda: receiver.received("/replay"), what="the replayed build_finish")
            job = wait_until(lambda: (r := dispatcher.store.replay("00000000-0000-4000-8000-000000000006"))
                             and r["status"] == "done" and r, what="the replay done")
        assert job["queued"] == 1
        original = live.json()
        assert original["commit"] == {"author": {"login": "ada", "name": "Ada Lovelace"}, "message": "build 1",
                                      "sha": "c" * 40}
        assert original["repository"] == {"clone_url": "https://github.com/acme/shop.git", "id": 42, "name": "shop",
                                          "owner": {"id": 7, "login": "acme"}}
        again = replayed.json()
        assert again["commit"] == original["commit"] and again["repository"] == original["repository"]
        assert again == original and replayed.body == live.body
        assert replayed.delivery != live.delivery  # another subscription: another delivery id, same event
    finally:
        receiver.close()


def test_joins_a_caller_took_from_the_log_stand_in_for_rows_and_the_store_fills_in_the_rest(store):
    with store.pool.connection() as conn:
        store.save_push(conn, "d-1", 1, {"id": 42}, {"login": "ada"})
        store.save_build(conn, 1, 1, {**BUILD, "delivery_id": "d-1"})
        store.upsert_app(conn, 1, {"name": "shop"})
        from_log = {**BUILD, "message": "from the log", "delivery_id": "d-1"}
        # the build.queued read in the log, its push only in the store (the replay started between them)
        ctx = store.build_context(conn, 1, 1, known_build=from_log)
        assert ctx["build"] is from_log and ctx["push"] == {"repository": {"id": 42}, "author": {"login": "ada"}}
        assert ctx["app"]["name"] == "shop"
        push = {"repository": {"id": 43}, "author": {"login": "bob"}}
        assert store.build_context(conn, 1, 1, known_build=from_log, known_push=push)["push"] is push
        # nothing read in the log (the replay started after both): the store's rows, as live
        assert store.build_context(conn, 1, 1)["build"]["message"] == "m"
