"""The dedupe table forgets delivery ids after SHIPLINE_DEDUPE_DAYS; younger ones stay duplicates."""

from __future__ import annotations

import threading
import uuid

import psycopg
import pytest

from ingress.local_index import LocalIndex, today
from ingress.retention import Pruner
from tests.integration.test_ingress_kit import ingress, push_payload  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_old_delivery_ids_are_forgotten_and_young_ones_stay_duplicates(ingress):  # noqa: F811
    app = ingress.register(repo_url="https://github.com/acme/shop")
    path, secret = f"/api/v1/webhooks/github/{app['id']}", app["github_secret"]
    old, young = str(uuid.uuid4()), str(uuid.uuid4())
    payload = push_payload()
    assert ingress.github(path, payload, secret, delivery=old).status_code == 201
    assert ingress.github(path, payload, secret, delivery=young).status_code == 201
    ingress.flush_notes()
    schema = ingress.settings.schema("ingress")
    index = LocalIndex.of(ingress.settings)
    index._conn().execute("UPDATE seen SET day = day - 31 WHERE delivery_id = ?", (old,))
    with psycopg.connect(ingress.settings.db_url, autocommit=True) as conn:
        conn.execute(f'UPDATE "{schema}".seen_deliveries SET received_at = now() - interval \'31 days\''
                     " WHERE delivery_id = %s", (old,))

    store = ingress.app.extensions["shipline"].extras["ingress"].store
    assert store.prune(30, batch=1) == 1  # batches of one: the loop ends on a short batch
    assert store.prune(30) == 0
    assert index.prune(today() - 30) == 1 and index.prune(today() - 30) == 0

    again_old = ingress.github(path, payload, secret, delivery=old)
    assert again_old.status_code == 201, again_old.get_json()  # forgotten: published again
    again_young = ingress.github(path, payload, secret, delivery=young)
    assert again_young.status_code == 200 and again_young.get_json()["duplicate"] is True
    ids = [e.data.delivery_id for e in ingress.deliveries()]
    assert sorted(ids) == sorted([old, young, old])  # streams records the second `old` as a duplicate


class CountingStore:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[float] = []
        self.fail = fail
        self.done = threading.Event()

    def prune(self, days: float, batch: int = 10_000) -> int:
        self.calls.append(days)
        self.done.set()
        if self.fail:
            raise psycopg.OperationalError("server closed the connection")
        return 3


def test_pruner_runs_at_most_once_per_period_and_survives_errors(caplog):
    store = CountingStore()
    pruner = Pruner(store, days=7, every=3600)
    assert pruner.poke() is True
    assert pruner.thread is not None
    pruner.thread.join(5)
    assert store.calls == [7]
    assert pruner.poke() is False and store.calls == [7]  # not due again for an hour

    failing = CountingStore(fail=True)
    eager = Pruner(failing, days=1, every=0)
    assert eager.poke() is True
    assert eager.thread is not None
    eager.thread.join(5)
    assert "could not forget old delivery ids: OperationalError" in caplog.text
    assert eager.poke() is True  # due again at once: the failure did not stop it
    assert eager.thread is not None
    eager.thread.join(5)
    assert failing.calls == [1, 1]
