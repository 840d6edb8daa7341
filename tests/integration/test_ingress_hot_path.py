"""Webhooks are verified and deduped without a database round trip, and stay exact across workers
and hosts: two apps on one data dir are two gunicorn workers of one host; another data dir is
another host on the same database (real Kafka and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import time
import uuid

import psycopg
import pytest

from ingress.credentials import POLL_EVERY
from tests.integration.test_ingress_kit import ingress, make_harness, push_payload  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def _dh(harness, token: str, delivery: str | None = None):
    headers = {"X-Deploy-Hook-Token": token, "Idempotency-Key": delivery or str(uuid.uuid4())}
    return harness.client.post("/api/v1/dh", json={"imageTag": "1.2"}, headers=headers)


def _close(harness) -> None:
    harness.app.extensions["shipline"].extras["ingress"].notes.flush(10)
    harness.app.extensions["shipline"].producer.flush(5)
    harness.app.extensions["shipline"].pool.close()


def test_workers_of_one_host_share_dedupe_and_every_credentials_change_at_once(settings, ingress):  # noqa: F811
    other = make_harness(settings)  # a second worker: same data dir, same database
    try:
        app = ingress.register(image="ghcr.io/acme/shop", repo_url="https://github.com/acme/shop")
        hook = ingress.deploy_hook(app["id"])
        delivery = str(uuid.uuid4())
        assert _dh(other, hook["token"], delivery).status_code == 201  # the hook made on one worker works on the other
        again = _dh(ingress, hook["token"], delivery)
        assert again.status_code == 200 and again.get_json()["duplicate"] is True  # the redelivery, on the first

        assert ingress.client.delete(f"/api/v1/deploy-hooks/{hook['id']}", headers=ingress.admin).status_code == 204
        refused = _dh(other, hook["token"])  # the very next request, on the other worker
        assert refused.status_code == 404, refused.get_json()

        token = other.remember(other.client.post(f"/api/v1/apps/{app['id']}/webhook", headers=other.admin).get_json())
        hooked = ingress.client.post(f"/api/v1/webhook/acme/{app['name']}", json={"image": "ghcr.io/acme/shop:2"},
                                     headers={"X-Shipline-Token": token["token"]})
        assert hooked.status_code == 201, hooked.get_json()

        renamed = other.client.patch(f"/api/v1/apps/{app['id']}", json={"branch": "release"}, headers=other.admin)
        assert renamed.status_code == 200
        old_branch = ingress.github(f"/api/v1/webhooks/github/{app['id']}", push_payload(), app["github_secret"])
        assert old_branch.status_code == 404 and "'release'" in old_branch.get_json()["error"]

        assert other.client.delete(f"/api/v1/apps/{app['id']}", headers=other.admin).status_code == 200
        gone = ingress.github(f"/api/v1/webhooks/github/{app['id']}", push_payload(ref="refs/heads/release"),
                              app["github_secret"])
        assert gone.status_code == 404
        ids = [e.data.delivery_id for e in ingress.deliveries()]
        assert sorted(ids) == sorted([delivery, hooked.get_json()["delivery_id"]])
    finally:
        _close(other)


def test_accepted_deliveries_reach_postgres_with_hook_and_token_use(settings, ingress):  # noqa: F811
    app = ingress.register(image="ghcr.io/acme/shop")
    hook = ingress.deploy_hook(app["id"])
    token = ingress.enable_webhook(app["id"])["token"]
    deliveries = [str(uuid.uuid4()) for _ in range(30)]
    for d in deliveries:
        assert _dh(ingress, hook["token"], d).status_code == 201
    by_token = ingress.client.post(f"/api/v1/webhook/acme/{app['name']}", json={"image": "x:1"},
                                   headers={"X-Shipline-Token": token})
    assert by_token.status_code == 201
    ingress.flush_notes()
    schema = settings.schema("ingress")
    with psycopg.connect(settings.db_url) as conn:
        seen = {r[0] for r in conn.execute(f'SELECT delivery_id FROM "{schema}".seen_deliveries').fetchall()}
        used = conn.execute(f'SELECT last_used_at FROM "{schema}".deploy_hooks').fetchone()
        token_used = conn.execute(f'SELECT last_used_at FROM "{schema}".webhook_tokens').fetchone()
    assert seen == {*deliveries, by_token.get_json()["delivery_id"]}
    assert used is not None and used[0] is not None and token_used is not None and token_used[0] is not None


def test_another_host_sees_changes_within_the_poll_bound_and_fills_its_index(settings, ingress, tmp_path):  # noqa: F811
    app = ingress.register(image="ghcr.io/acme/shop")
    hook = ingress.deploy_hook(app["id"])
    delivery = str(uuid.uuid4())
    assert _dh(ingress, hook["token"], delivery).status_code == 201
    ingress.flush_notes()

    host2 = make_harness(dataclasses.replace(settings, data_dir=tmp_path / "host2"))
    try:
        again = _dh(host2, hook["token"], delivery)  # its new index was filled from PostgreSQL
        assert again.status_code == 200 and again.get_json()["duplicate"] is True

        assert host2.client.delete(f"/api/v1/deploy-hooks/{hook['id']}", headers=host2.admin).status_code == 204
        deadline = time.monotonic() + POLL_EVERY + 5
        while (answer := _dh(ingress, hook["token"])).status_code != 404:
            assert answer.status_code == 201
            assert time.monotonic() < deadline, "a change on another host was never seen"
            time.sleep(0.1)
    finally:
        _close(host2)


def test_a_recreated_store_does_not_inherit_the_host_index(settings, ingress):  # noqa: F811
    """Drop the ingress schema and start again on the same data dir: app ids start at 1 again, so
    the old index's delivery ids must not make the new app's deliveries duplicates."""
    first = ingress.register(image="ghcr.io/acme/shop")
    hook = ingress.deploy_hook(first["id"])
    assert _dh(ingress, hook["token"], "ci-run-1").status_code == 201
    ingress.flush_notes()
    with psycopg.connect(settings.db_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{settings.schema("ingress")}" CASCADE')

    restarted = make_harness(settings)
    try:
        again = restarted.remember(restarted.client.post("/api/v1/apps", json={"name": "shop2", "namespace": "acme",
                                                                               "image": "ghcr.io/acme/shop"},
                                                         headers=restarted.admin).get_json())
        assert again["id"] == first["id"]  # the same app id, another app
        new_hook = restarted.remember(restarted.client.post(f"/api/v1/apps/{again['id']}/deploy-hooks",
                                                            json={"name": "ci"}, headers=restarted.admin).get_json())
        fresh = _dh(restarted, new_hook["token"], "ci-run-1")
        assert fresh.status_code == 201, fresh.get_json()
        ingress.secrets.extend(restarted.secrets)
    finally:
        _close(restarted)
