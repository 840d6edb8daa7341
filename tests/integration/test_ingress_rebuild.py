"""The credentials store is a cache of the inbound log: rebuilt from it, it is identical."""

from __future__ import annotations

import dataclasses

import pytest

from ingress.rebuild import read_inbound, rebuild_store
from shipline.db import make_pool
from tests.integration.test_ingress_kit import Harness, ingress, push_payload  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_rebuild_store_from_the_inbound_topic(settings, ingress):  # noqa: F811
    a = ingress.register(name="shop", repo_url="https://github.com/acme/shop", image="ghcr.io/acme/shop")
    b = ingress.register(name="jobs", kind="job", allow_unsigned=True)
    c = ingress.register(name="gone")
    admin = ingress.admin
    assert ingress.client.patch(f"/api/v1/apps/{a['id']}", json={"branch": "release", "name": "store",
                                                                 "repo_url": "https://github.com/acme/store"},
                                headers=admin).status_code == 200
    assert ingress.client.delete(f"/api/v1/apps/{c['id']}", headers=admin).status_code == 200
    kept_hook = ingress.deploy_hook(a["id"], "kept")
    dropped_hook = ingress.deploy_hook(a["id"], "dropped")
    assert ingress.client.delete(f"/api/v1/deploy-hooks/{dropped_hook['id']}", headers=admin).status_code == 204
    ingress.enable_webhook(b["id"])
    token = ingress.enable_webhook(a["id"])["token"]
    assert ingress.client.post("/api/v1/webhook/acme/store", json={"image": "ghcr.io/acme/shop:9"},
                               headers={"X-Shipline-Token": token}).status_code == 201
    assert ingress.client.post("/api/v1/dh", json={"imageTag": "9"},
                               headers={"X-Deploy-Hook-Token": kept_hook["token"]}).status_code == 201
    push = push_payload("https://github.com/acme/store", "refs/heads/release")
    pushed = ingress.github(f"/api/v1/webhooks/github/{a['id']}", push, a["github_secret"])
    assert pushed.status_code == 201
    assert ingress.client.delete(f"/api/v1/apps/{b['id']}/webhook", headers=admin).status_code == 200

    live = ingress.store_dump()
    pool = ingress.app.extensions["shipline"].pool
    # lose the store entirely, then fold the log back into it
    with pool.connection() as conn:
        conn.execute(f'DROP SCHEMA "{settings.schema("ingress")}" CASCADE')
    applied = rebuild_store(pool, settings, read_inbound(settings))
    assert applied == len(ingress.envelopes())
    assert ingress.store_dump() == live

    # a fresh schema beside the live one gets the same rows
    other = dataclasses.replace(settings, db_schema=settings.db_schema + "_copy")
    with make_pool(settings.db_url) as copy_pool:
        rebuild_store(copy_pool, other, read_inbound(settings))
    assert Harness(settings=other, app=None, client=None).store_dump() == live

    # the rebuilt store keeps working: tokens, hooks, secrets, dedupe and the app id sequence
    assert ingress.client.post("/api/v1/webhook/acme/store", json={"image": "x:1"},
                               headers={"X-Shipline-Token": token}).status_code == 201
    assert ingress.client.post("/api/v1/dh", json={"imageTag": "1"},
                               headers={"X-Deploy-Hook-Token": dropped_hook["token"]}).status_code == 404
    redelivered = ingress.github(f"/api/v1/webhooks/github/{a['id']}", push, a["github_secret"],
                                 delivery=pushed.get_json()["delivery_id"])
    assert redelivered.status_code == 200 and redelivered.get_json()["duplicate"] is True
    assert ingress.register(name="after")["id"] > c["id"]
