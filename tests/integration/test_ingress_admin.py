"""The management API: every write is a request record acknowledged by Kafka before the answer."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from shipline import messages as m
from tests.integration.test_ingress_kit import ingress, push_payload  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_register_update_delete_app(ingress):  # noqa: F811
    first = ingress.register(name="shop", namespace="acme", repo_url="https://github.com/acme/shop",
                             build={"dockerfile": "Dockerfile", "test_command": "pytest -q"}, port=8000)
    second = ingress.register(name="shop", namespace="other")
    assert second["id"] > first["id"] > 0
    assert set(first) == {"id", "name", "namespace", "github_webhook_url", "github_secret", "request_id", "position"}
    assert first["github_webhook_url"] == f"{ingress.settings.public_url}/api/v1/webhooks/github/{first['id']}"

    by_id = {e.id: e for e in ingress.envelopes()}
    env = by_id[first["request_id"]]
    registered: m.RegisterApp = env.data  # type: ignore[assignment]
    assert env.correlationid == first["request_id"] and env.key == str(first["id"]).encode()
    assert (registered.app_id, registered.name, registered.branch, registered.port) == (
        first["id"], "shop", "main", 8000)
    assert registered.build == {"dockerfile": "Dockerfile", "test_command": "pytest -q"}
    # the secret travels only encrypted with SHIPLINE_SECRET_KEY
    fernet = Fernet(ingress.settings.secret_key.encode())
    assert fernet.decrypt(registered.secret_encrypted.encode()).decode() == first["github_secret"]
    topic, partition, offset = first["position"].rsplit(":", 2)
    assert topic == ingress.settings.topics.inbound and int(partition) >= 0 and int(offset) >= 0

    taken = ingress.client.post("/api/v1/apps", json={"name": "shop", "namespace": "acme"}, headers=ingress.admin)
    assert taken.status_code == 409
    for body, field in [({"namespace": "acme"}, "name"), ({"name": "a b", "namespace": "x"}, "name"),
                        ({"name": "a", "namespace": "x", "kind": "cron"}, "kind"),
                        ({"name": "a", "namespace": "x", "port": 70000}, "port"),
                        ({"name": "a", "namespace": "x", "build": {"dockerfil": "x"}}, "build.dockerfil"),
                        ({"name": "a", "namespace": "x", "colour": "red"}, "colour")]:
        resp = ingress.client.post("/api/v1/apps", json=body, headers=ingress.admin)
        assert resp.status_code == 400 and resp.get_json()["field"] == field, (body, resp.get_json())
    assert ingress.client.post("/api/v1/apps", json={"name": "a", "namespace": "x"}).status_code == 401
    assert ingress.client.post("/api/v1/apps", json={"name": "a", "namespace": "x"},
                               headers={"Authorization": "Bearer nope"}).status_code == 401

    patched = ingress.client.patch(f"/api/v1/apps/{first['id']}", json={"branch": "release", "port": None},
                                   headers=ingress.admin)
    assert patched.status_code == 200, patched.get_json()
    update = {e.id: e for e in ingress.envelopes()}[patched.get_json()["request_id"]].data
    assert isinstance(update, m.UpdateApp) and update.changes == {"branch": "release", "port": None}
    secret, path = first["github_secret"], f"/api/v1/webhooks/github/{first['id']}"
    assert ingress.github(path, push_payload(ref="refs/heads/release"), secret).status_code == 201
    assert ingress.github(path, push_payload(ref="refs/heads/main"), secret).status_code == 404
    assert ingress.client.patch(f"/api/v1/apps/{first['id']}", json={}, headers=ingress.admin).status_code == 400
    rename = ingress.client.patch(f"/api/v1/apps/{first['id']}", json={"namespace": "other"}, headers=ingress.admin)
    assert rename.status_code == 409
    assert ingress.client.patch("/api/v1/apps/424242", json={"branch": "x"}, headers=ingress.admin).status_code == 404

    deleted = ingress.client.delete(f"/api/v1/apps/{first['id']}", headers=ingress.admin)
    assert deleted.status_code == 200 and deleted.get_json()["deleted"] is True
    assert ingress.github(path, push_payload(ref="refs/heads/release"), secret).status_code == 404
    assert ingress.client.delete(f"/api/v1/apps/{first['id']}", headers=ingress.admin).status_code == 404
    reused = ingress.client.post("/api/v1/apps", json={"name": "shop", "namespace": "acme"}, headers=ingress.admin)
    assert reused.status_code == 201  # the name is free again once the app is deleted
    ingress.remember(reused.get_json())

    types = [e.type for e in ingress.envelopes() if e.type != "delivery.received"]
    assert sorted(types) == sorted(["app.register"] * 3 + ["app.update", "app.delete"])


def test_deploy_and_rollback_requests(ingress):  # noqa: F811
    app = ingress.register(image="ghcr.io/acme/shop")
    base = f"/api/v1/apps/{app['id']}"
    deploy = ingress.client.post(f"{base}/deploy", json={"image": "ghcr.io/acme/shop:2.0"}, headers=ingress.admin)
    assert deploy.status_code == 202 and set(deploy.get_json()) == {"request_id", "position"}
    commit = ingress.client.post(f"{base}/deploy", json={"commit": "0123abc"}, headers=ingress.admin)
    rollback = ingress.client.post(f"{base}/rollback", headers=ingress.admin)
    to_rev = ingress.client.post(f"{base}/rollback", json={"revision": 3}, headers=ingress.admin)
    assert {commit.status_code, rollback.status_code, to_rev.status_code} == {202}

    by_id = {e.id: e for e in ingress.envelopes()}
    requests = [by_id[r.get_json()["request_id"]].data for r in (deploy, commit, rollback, to_rev)]
    assert [(r.trigger, r.image, r.commit, r.revision) for r in requests] == [
        ("manual", "ghcr.io/acme/shop:2.0", None, None), ("manual", None, "0123abc", None),
        ("rollback", None, None, None), ("rollback", None, None, 3)]
    assert all(isinstance(r, m.RequestDeploy) and r.app_id == app["id"] for r in requests)
    assert [r.request_id for r in requests] == [x.get_json()["request_id"] for x in (deploy, commit, rollback, to_rev)]
    from ingress.rebuild import read_topic

    positions = {f"{ingress.settings.topics.inbound}:{p}:{o}" for p, o, _ in
                 read_topic(ingress.settings.bootstrap_servers, ingress.settings.topics.inbound)}
    assert deploy.get_json()["position"] in positions

    assert ingress.client.post(f"{base}/deploy", json={}, headers=ingress.admin).status_code == 400
    assert ingress.client.post(f"{base}/rollback", json={"revision": 0}, headers=ingress.admin).status_code == 400
    assert ingress.client.post(f"{base}/rollback", json={"revision": True}, headers=ingress.admin).status_code == 400
    assert ingress.client.post("/api/v1/apps/777777/rollback", headers=ingress.admin).status_code == 404
    assert ingress.client.post(f"{base}/deploy", json={"image": "x"}).status_code == 401


def test_ingress_registers_no_reads_of_the_apps_collection(ingress):  # noqa: F811
    """GET /api/v1/apps and /api/v1/apps/<id> belong to the projections read side."""
    ours = [r for r in ingress.app.url_map.iter_rules() if r.endpoint.startswith("ingress_")]
    assert ours
    for rule in ours:
        if rule.rule in ("/api/v1/apps", "/api/v1/apps/<app_id>"):
            assert "GET" not in rule.methods, rule
