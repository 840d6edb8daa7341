"""Token-authenticated deploy hooks: Skipper's per-app webhook and Shipmight's deploy hooks."""

from __future__ import annotations

import base64
import json

import pytest

from ingress.crypto import token_hash
from tests.integration.test_ingress_kit import ingress, sign  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_skipper_webhook_token(ingress):  # noqa: F811
    app = ingress.register(namespace="shop-test", name="api")
    other = ingress.register(namespace="shop-test", name="worker")
    path = "/api/v1/webhook/shop-test/api"
    body = {"image": "registry.example.com/api:abc123f", "commit": "abc123f"}

    off = ingress.client.get(f"/api/v1/apps/{app['id']}/webhook", headers=ingress.admin)
    assert off.status_code == 200 and off.get_json()["enabled"] is False
    assert ingress.client.post(path, json=body, headers={"X-Shipline-Token": "shpwh_x"}).status_code == 401

    enabled = ingress.enable_webhook(app["id"])
    assert enabled["url"] == f"{ingress.settings.public_url}{path}"
    token = enabled["token"]
    other_token = ingress.enable_webhook(other["id"])["token"]

    ok = ingress.client.post(path, json=body, headers={"X-Shipline-Token": token})
    assert ok.status_code == 201, ok.get_json()
    (env,) = ingress.deliveries()
    assert (env.data.app_id, env.data.source, env.data.event, env.data.verification) == (
        app["id"], "skipper", "deploy", "token")
    assert json.loads(env.data.body) == body
    assert "X-Shipline-Token" not in env.data.headers and token not in json.dumps(env.data.headers)

    skipper_header = ingress.client.post(path, json=body, headers={"X-Skipper-Token": token})
    assert skipper_header.status_code == 201
    status = ingress.client.get(f"/api/v1/apps/{app['id']}/webhook", headers=ingress.admin).get_json()
    assert status["enabled"] is True and status["token_prefix"] == token[:12]
    assert status["created_at"] and status["last_used_at"] and status["last_used_at"] >= status["created_at"]

    assert ingress.client.post(path, json=body, headers={"X-Shipline-Token": other_token}).status_code == 401
    assert ingress.client.post(path, json=body).status_code == 401
    missing = ingress.client.post(path, json={"commit": "abc"}, headers={"X-Shipline-Token": token})
    assert missing.status_code == 400 and missing.get_json()["field"] == "image"
    assert "image" in missing.get_json()["error"]
    assert ingress.client.post(path, data="image=x", headers={"X-Shipline-Token": token,
                                                              "Content-Type": "text/plain"}).status_code == 415
    unknown = ingress.client.post("/api/v1/webhook/shop-test/nope", json=body, headers={"X-Shipline-Token": token})
    assert unknown.status_code == 404 and "nope" in unknown.get_json()["error"]

    raw = json.dumps(body).encode()
    signed = ingress.client.post(path, data=raw, headers={"Content-Type": "application/json",
                                                          "X-Hub-Signature-256": sign(app["github_secret"], raw)})
    assert signed.status_code == 201
    assert ingress.deliveries()[-1].data.verification == "hmac"  # one app: one partition, in order

    keyed = {"X-Shipline-Token": token, "Idempotency-Key": "ci-run-42"}
    assert ingress.client.post(path, json=body, headers=keyed).status_code == 201
    dup = ingress.client.post(path, json=body, headers=keyed)
    assert dup.status_code == 200 and dup.get_json()["duplicate"] is True

    regenerated = ingress.enable_webhook(app["id"])["token"]
    assert ingress.client.post(path, json=body, headers={"X-Shipline-Token": token}).status_code == 401
    assert ingress.client.post(path, json=body, headers={"X-Shipline-Token": regenerated}).status_code == 201
    disabled = ingress.client.delete(f"/api/v1/apps/{app['id']}/webhook", headers=ingress.admin)
    assert disabled.status_code == 200 and disabled.get_json()["enabled"] is False
    assert ingress.client.post(path, json=body, headers={"X-Shipline-Token": regenerated}).status_code == 401
    assert len(ingress.deliveries()) == 5

    # a body that is not UTF-8 (JSON in UTF-16) is carried byte for byte, base64-encoded
    utf16 = json.dumps(body).encode("utf-16")
    resp = ingress.client.post("/api/v1/webhook/shop-test/worker", data=utf16,
                               headers={"Content-Type": "application/json", "X-Shipline-Token": other_token})
    assert resp.status_code == 201
    (last,) = [e.data for e in ingress.deliveries() if e.data.delivery_id == resp.get_json()["delivery_id"]]
    assert last.body_encoding == "base64" and base64.b64decode(last.body) == utf16

    tokens = [e.data for e in ingress.envelopes() if e.type == "webhook_token.enable"]
    assert token_hash(token) in {t.token_hash for t in tokens}


def test_shipmight_deploy_hooks(ingress):  # noqa: F811
    service = ingress.register(image="ghcr.io/acme/shop")
    job = ingress.register(kind="job", image="ghcr.io/acme/report")
    bare = ingress.register()
    hook = ingress.deploy_hook(service["id"], "github actions")
    job_hook = ingress.deploy_hook(job["id"])
    bare_hook = ingress.deploy_hook(bare["id"])
    assert hook["url"] == f"{ingress.settings.public_url}/api/v1/dh" and hook["token_prefix"] == hook["token"][:12]

    def dh(token, body):
        return ingress.client.post("/api/v1/dh", json=body, headers={"X-Deploy-Hook-Token": token})

    ok = dh(hook["token"], {"imageTag": "1.2.0"})
    assert ok.status_code == 201, ok.get_json()
    assert ok.get_json()["image"] == "ghcr.io/acme/shop:1.2.0"
    (env,) = ingress.deliveries()
    assert (env.data.app_id, env.data.source, env.data.event, env.data.verification, env.data.hook_id) == (
        service["id"], "shipmight", "deploy", "deploy_hook", hook["id"])
    assert "X-Deploy-Hook-Token" not in env.data.headers

    ran = dh(job_hook["token"], {"instanceEnvironmentVariables": [{"name": "EXAMPLE_VAR", "value": "example"}]})
    assert ran.status_code == 201 and ran.get_json()["variables"] == ["EXAMPLE_VAR"]
    (job_record,) = [e.data for e in ingress.deliveries() if e.data.app_id == job["id"]]
    assert job_record.event == "job" and job_record.hook_id == job_hook["id"]

    assert dh(hook["token"], {}).get_json()["field"] == "imageTag"
    assert dh(hook["token"], {"imageTag": "bad tag!"}).status_code == 400
    assert dh(hook["token"], {"imageTag": 12}).status_code == 400
    bad_env = dh(job_hook["token"], {"instanceEnvironmentVariables": [{"name": "1X", "value": "v"}]})
    assert bad_env.status_code == 400 and "name" in bad_env.get_json()["field"]
    assert dh(job_hook["token"], {"instanceEnvironmentVariables": "A=1"}).status_code == 400
    no_image = dh(bare_hook["token"], {"imageTag": "1.0"})
    assert no_image.status_code == 400 and "image" in no_image.get_json()["error"]
    assert dh("shpdh_unknown", {"imageTag": "1.0"}).status_code == 404
    assert ingress.client.post("/api/v1/dh", json={"imageTag": "1.0"}).status_code == 401
    assert ingress.client.post("/api/v1/dh", data="{", headers={"X-Deploy-Hook-Token": hook["token"],
                                                                "Content-Type": "application/json"}).status_code == 400

    deleted = ingress.client.delete(f"/api/v1/deploy-hooks/{hook['id']}", headers=ingress.admin)
    assert deleted.status_code == 204 and deleted.headers["X-Request-Id"]
    gone = dh(hook["token"], {"imageTag": "1.2.1"})
    assert gone.status_code == 404 and "deleted" in gone.get_json()["error"]
    again = ingress.client.delete(f"/api/v1/deploy-hooks/{hook['id']}", headers=ingress.admin)
    assert again.status_code == 404
    assert len(ingress.deliveries()) == 2

    created = [e.data for e in ingress.envelopes() if e.type == "deploy_hook.create"]
    assert {c.token_hash for c in created} == {token_hash(h["token"]) for h in (hook, job_hook, bare_hook)}
    assert [e.data.hook_id for e in ingress.envelopes() if e.type == "deploy_hook.delete"] == [hook["id"]]
