"""Durable before 2xx: Kafka down means 503 and nothing half-accepted; size limits; no 5xx."""

from __future__ import annotations

import dataclasses
import logging
import uuid

import pytest

from shipline.kafka import producer
from tests.integration.test_ingress_kit import ingress, make_harness, push_payload  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_kafka_unreachable_answers_503_and_accepts_nothing(settings, ingress):  # noqa: F811
    app = ingress.register(repo_url="https://github.com/acme/shop", image="ghcr.io/acme/shop")
    path, secret = f"/api/v1/webhooks/github/{app['id']}", app["github_secret"]
    dead = make_harness(settings, producer=producer("127.0.0.1:1", **{"message.timeout.ms": 1500, "log_level": 0}))
    delivery = str(uuid.uuid4())
    payload = push_payload()

    refused = dead.github(path, payload, secret, delivery=delivery)
    assert refused.status_code == 503, refused.get_json()
    assert int(refused.headers["Retry-After"]) > 0 and "retry" in refused.get_json()["error"]
    registered = dead.client.post("/api/v1/apps", json={"name": "ghost", "namespace": "acme"}, headers=dead.admin)
    assert registered.status_code == 503 and registered.headers["Retry-After"]
    hook = dead.client.post(f"/api/v1/apps/{app['id']}/deploy-hooks", json={"name": "ci"}, headers=dead.admin)
    assert hook.status_code == 503
    assert "ghost" not in ingress.store_dump() and "deploy_hooks: []" in ingress.store_dump()
    assert ingress.deliveries() == []

    # the sender retries: accepted, not mistaken for a duplicate, exactly one record
    retried = ingress.github(path, payload, secret, delivery=delivery)
    assert retried.status_code == 201
    assert [e.data.delivery_id for e in ingress.deliveries()] == [delivery]
    dead.app.extensions["shipline"].pool.close()


def test_body_limits_answer_413_in_json(settings, ingress):  # noqa: F811
    small = make_harness(dataclasses.replace(settings, max_body=4096))
    app = ingress.register()
    big = b'{"ref": "' + b"x" * 5000 + b'"}'
    resp = small.client.post(f"/api/v1/webhooks/github/{app['id']}", data=big,
                             headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and "error" in resp.get_json()
    resp = small.client.post("/api/v1/apps", data=big, headers={**small.admin, "Content-Type": "application/json"})
    assert resp.status_code == 413
    # within SHIPLINE_MAX_BODY but over the log's record size limit: 413, not a retry-forever 503
    hook = ingress.deploy_hook(ingress.register(image="ghcr.io/acme/x")["id"])
    huge = b'{"imageTag": "1.0", "padding": "' + b"p" * 2_000_000 + b'"}'
    resp = ingress.client.post("/api/v1/dh", data=huge, headers={"X-Deploy-Hook-Token": hook["token"],
                                                                 "Content-Type": "application/json"})
    assert resp.status_code in (201, 413), resp.get_json()
    assert "error" in resp.get_json() or resp.get_json()["status"] == "triggered"
    small.app.extensions["shipline"].pool.close()


def test_no_input_produces_a_5xx(ingress):  # noqa: F811
    app = ingress.register(image="ghcr.io/acme/x")
    token = ingress.enable_webhook(app["id"])["token"]
    hook = ingress.deploy_hook(app["id"])["token"]
    odd_bodies = [b"", b"null", b"[]", b"[1,2]", b'"text"', b"1e999999", b'{"ref": 12}', b'{"ref": null}',
                  b'{"image": ["x"]}', b'{"image": ""}', b'{"imageTag": null}', b"\xff\xfe\x00",
                  b'{"repository": {"html_url": 5}}', b'{"repository": "x", "ref": "refs/heads/main"}',
                  b'{"instanceEnvironmentVariables": [null]}', b'{"name": {"a": 1}}', b'{"revision": 1e308}']
    routes = [
        ("POST", f"/api/v1/webhooks/github/{app['id']}", {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=0"}),
        ("POST", "/api/webhook", {"X-GitHub-Event": "push", "X-Hub-Signature-256": "zzz"}),
        ("POST", f"/api/v1/webhook/acme/{app['name']}", {"X-Shipline-Token": token}),
        ("POST", "/api/v1/dh", {"X-Deploy-Hook-Token": hook}),
        ("POST", "/api/v1/apps", ingress.admin),
        ("PATCH", f"/api/v1/apps/{app['id']}", ingress.admin),
        ("POST", f"/api/v1/apps/{app['id']}/deploy-hooks", ingress.admin),
        ("POST", f"/api/v1/apps/{app['id']}/rollback", ingress.admin),
        ("POST", f"/api/v1/apps/{app['id']}/deploy", ingress.admin),
        ("DELETE", "/api/v1/deploy-hooks/%00%ff", ingress.admin),
        ("POST", "/api/v1/webhooks/github/-1", {}),
        ("POST", "/api/v1/webhook/%2F%2F/..", {"X-Skipper-Token": "\u00e9"}),
    ]
    for method, path, headers in routes:
        for body in odd_bodies:
            for ctype in ("application/json", "text/plain", None):
                h = dict(headers, **({"Content-Type": ctype} if ctype else {}))
                resp = ingress.client.open(path, method=method, data=body, headers=h)
                assert resp.status_code < 500, (method, path, body, ctype, resp.get_json())
                if resp.status_code >= 400:
                    assert isinstance(resp.get_json()["error"], str)
    too_long = ingress.client.post("/api/v1/dh", json={"imageTag": "1"},
                                   headers={"X-Deploy-Hook-Token": hook, "Idempotency-Key": "k" * 500})
    assert too_long.status_code == 400


def test_the_secret_scan_catches_a_leak(ingress, caplog):  # noqa: F811
    app = ingress.register()
    logging.getLogger("ingress.test").warning("oops %s", app["github_secret"])
    with pytest.raises(AssertionError, match="logs"):
        ingress.scan_for_secrets(caplog.text)
    caplog.clear()
