"""GitHub webhooks into Kafka: the per-app route (SkyPort) and the by-repository route (Shipyard)."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest

from shipline.messages import DeliveryReceived
from tests.integration.test_ingress_kit import (
    body_of,
    github_headers,
    ingress,  # noqa: F401 - fixture
    make_harness,
    ping_payload,
    push_payload,
    sign,
)

pytestmark = pytest.mark.integration


def test_per_app_route_push_ping_events_and_rejections(ingress):  # noqa: F811
    app = ingress.register(repo_url="https://github.com/acme/shop", branch="main")
    secret, path = app["github_secret"], f"/api/v1/webhooks/github/{app['id']}"
    assert app["github_webhook_url"] == f"{ingress.settings.public_url}{path}"

    ping = ingress.github(path, ping_payload(), secret, event="ping")
    assert ping.status_code == 200 and ping.get_json()["status"] == "ping"
    assert ingress.deliveries() == []  # ping: nothing queued

    payload = push_payload(message="Fix the checkout total ✓")
    raw = body_of(payload)
    delivery = str(uuid.uuid4())
    pushed = ingress.github(path, payload, secret, delivery=delivery, body=raw)
    assert pushed.status_code == 201, pushed.get_json()
    assert pushed.get_json() == {"status": "queued", "delivery_id": delivery, "app_ids": [app["id"]]}
    (env,) = ingress.deliveries()
    record: DeliveryReceived = env.data  # type: ignore[assignment]
    assert env.key == str(app["id"]).encode() and record.app_id == app["id"]
    assert (record.delivery_id, record.source, record.event, record.verification) == (
        delivery, "github", "push", "hmac")
    assert record.route == path and record.body_encoding == "utf8"
    assert record.body.encode() == raw  # the exact raw body: the signature re-verifies
    assert record.headers["X-Hub-Signature-256"] == sign(secret, record.body.encode())
    assert record.headers["X-GitHub-Delivery"] == delivery and record.headers["X-GitHub-Event"] == "push"
    assert record.headers["User-Agent"].startswith("GitHub-Hookshot/")
    assert env.correlationid == delivery

    again = ingress.github(path, payload, secret, delivery=delivery, body=raw)
    assert again.status_code == 200 and again.get_json()["duplicate"] is True
    assert len(ingress.deliveries()) == 1  # a redelivery produces nothing

    issues = ingress.github(path, {"action": "opened", "issue": {"number": 1}}, secret, event="issues")
    assert issues.status_code == 202 and issues.get_json()["status"] == "ignored"
    assert [e.data.event for e in ingress.deliveries()] == ["push", "issues"]  # recorded as ignored

    tag = ingress.github(path, push_payload(ref="refs/tags/v1.2.0"), secret)
    assert tag.status_code == 202 and "tag push" in tag.get_json()["reason"]
    deletion = ingress.github(path, push_payload(deleted=True), secret)
    assert deletion.status_code == 202 and "deletion" in deletion.get_json()["reason"]
    other = ingress.github(path, push_payload(ref="refs/heads/feature/x"), secret)
    assert other.status_code == 404 and "'feature/x'" in other.get_json()["error"]
    assert "'main'" in other.get_json()["error"]
    assert len(ingress.deliveries()) == 2  # tag push, deletion and other branch start nothing

    wrong = ingress.github(path, payload, "not-the-secret")
    assert wrong.status_code == 401 and "does not match" in wrong.get_json()["error"]
    missing = ingress.github(path, payload, None)
    assert missing.status_code == 401 and "missing X-Hub-Signature-256" in missing.get_json()["error"]
    tampered = ingress.client.post(path, data=raw.replace(b"checkout", b"checkoux"),
                                   headers=github_headers(raw, secret))
    assert tampered.status_code == 401
    unknown = ingress.github("/api/v1/webhooks/github/999999", payload, secret)
    assert unknown.status_code == 404 and "999999" in unknown.get_json()["error"]
    huge = ingress.github("/api/v1/webhooks/github/99999999999999999999999", payload, secret)
    assert huge.status_code == 404

    not_json = b"payload=%7B%7D"
    form = github_headers(not_json, secret) | {"Content-Type": "application/x-www-form-urlencoded"}
    assert ingress.client.post(path, data=not_json, headers=form).status_code == 415
    broken = b'{"ref": "refs/heads/main",'
    resp = ingress.client.post(path, data=broken, headers=github_headers(broken, secret))
    assert resp.status_code == 400 and "JSON" in resp.get_json()["error"]
    no_ref = b'{"repository": {}}'
    resp = ingress.client.post(path, data=no_ref, headers=github_headers(no_ref, secret))
    assert resp.status_code == 400 and resp.get_json()["field"] == "ref"
    assert len(ingress.deliveries()) == 2


def test_unsigned_deliveries_only_for_apps_that_allow_them(ingress):  # noqa: F811
    strict = ingress.register(repo_url="https://github.com/acme/strict")
    lax = ingress.register(repo_url="https://github.com/acme/lax", allow_unsigned=True)
    payload = push_payload("https://github.com/acme/lax")

    unsigned = ingress.github(f"/api/v1/webhooks/github/{lax['id']}", payload, None)
    assert unsigned.status_code == 201, unsigned.get_json()
    (env,) = ingress.deliveries()
    assert env.data.verification == "unsigned" and env.data.app_id == lax["id"]
    # allow_unsigned allows a missing signature, never a wrong one
    wrong = ingress.github(f"/api/v1/webhooks/github/{lax['id']}", payload, "guess")
    assert wrong.status_code == 401
    refused = ingress.github(f"/api/v1/webhooks/github/{strict['id']}", push_payload(), None)
    assert refused.status_code == 401
    via_repo = ingress.github("/api/webhook", payload, None)
    assert via_repo.status_code == 201 and via_repo.get_json()["app_ids"] == [lax["id"]]
    assert ingress.github("/api/webhook", push_payload("https://github.com/acme/strict"), None).status_code == 401
    assert len(ingress.deliveries()) == 2


def test_shipyard_route_matches_every_app_by_normalised_repo_url_and_branch(settings, caplog, capfd):
    global_secret = "global-" + uuid.uuid4().hex
    h = make_harness(dataclasses.replace(settings, github_webhook_secret=global_secret))
    h.secrets.append(global_secret)
    a = h.register(repo_url="https://GitHub.com/acme/shop.git/", branch="main")
    b = h.register(repo_url="git@github.com:acme/shop.git", branch="refs/heads/main")
    c = h.register(repo_url="https://github.com/acme/shop", branch="dev")
    d = h.register(repo_url="https://github.com/acme/other", branch="main")
    url = "https://github.com/acme/shop"

    ping = h.github("/api/webhook", ping_payload(url), global_secret, event="ping")
    assert ping.status_code == 200

    delivery = str(uuid.uuid4())
    both = h.github("/api/webhook", push_payload(url), global_secret, delivery=delivery)
    assert both.status_code == 201, both.get_json()
    assert sorted(both.get_json()["app_ids"]) == sorted([a["id"], b["id"]])
    records = h.deliveries()
    assert sorted(e.data.app_id for e in records) == sorted([a["id"], b["id"]])
    assert {e.key for e in records} == {str(a["id"]).encode(), str(b["id"]).encode()}
    assert {e.data.delivery_id for e in records} == {delivery} and {e.data.source for e in records} == {"shipyard"}
    assert h.github("/api/webhook", push_payload(url), global_secret, delivery=delivery).get_json()["duplicate"]

    dev = h.github("/api/webhook", push_payload(url, "refs/heads/dev"), global_secret)
    assert dev.status_code == 201 and dev.get_json()["app_ids"] == [c["id"]]
    # an app's own secret verifies the delivery for that app only
    own = h.github("/api/webhook", push_payload(url), a["github_secret"])
    assert own.status_code == 201 and own.get_json()["app_ids"] == [a["id"]]

    branch = h.github("/api/webhook", push_payload(url, "refs/heads/feature"), global_secret)
    assert branch.status_code == 404
    assert "'feature'" in branch.get_json()["error"] and url in branch.get_json()["error"]
    repo = h.github("/api/webhook", push_payload("https://github.com/acme/nothing"), global_secret)
    assert repo.status_code == 404 and "acme/nothing" in repo.get_json()["error"]
    assert h.github("/api/webhook", push_payload(url), None).status_code == 401
    assert h.github("/api/webhook", push_payload(url), d["github_secret"]).status_code == 401
    assert h.github("/api/webhook", push_payload(url), "wrong").status_code == 401
    assert len(h.deliveries()) == 4

    out, err = capfd.readouterr()
    h.scan_for_secrets(caplog.text + out + err)


def test_shipyard_route_without_global_secret_names_the_unmatched_repository(ingress):  # noqa: F811
    app = ingress.register(repo_url="https://github.com/acme/shop")
    missing = ingress.github("/api/webhook", push_payload("https://github.com/acme/unknown"), app["github_secret"])
    assert missing.status_code == 404 and "acme/unknown" in missing.get_json()["error"]
    body = json.dumps({"zen": "x"}).encode()
    no_repo = ingress.client.post("/api/webhook", data=body, headers=github_headers(body, None, "ping"))
    assert no_repo.status_code == 401
