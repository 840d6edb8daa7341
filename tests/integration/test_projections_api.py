"""The read API over tables the real projector folded from the real log: apps, history with
pagination and point in time, builds with logs, hooks, deliveries, the audit chain (with the
outbound dispatcher's rows) and read-your-writes."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest

from shipline import messages as m
from shipline.web import create_app
from tests.integration.test_projections_kit import Story, iso, produce, projector, wait_caught_up

pytestmark = pytest.mark.integration


def history_story() -> tuple[Story, dict[str, Any]]:
    s = Story()
    s.register(1, "shop")
    s.emit(m.DeployHookCreated(app_id=1, hook_id="hook-1", name="ci", token_hash="f" * 64, token_prefix="dh_9f"),
           correlation="req-hook")
    marks: dict[str, Any] = {"registered": s.at()}
    d1 = s.push_to_deploy(1, 1, 1, "gh-1", author="ada")
    d2 = s.push_to_deploy(1, 2, 2, "gh-2", author="grace")
    d3 = s.deploy(1, 3, "registry.example.com/x:hotfix", "3" * 40, trigger="manual", correlation="req-3",
                  requested_by="linus")
    s.deploy(1, 4, "registry.example.com/x:one", "1" * 40, trigger="rollback", correlation="req-4",
             requested_by="linus", outcome="failed")
    s.delivery(1, "gh-5", outcome="ignored", event="issues")
    s.register(2, "gone")
    s.emit(m.AppDeleted(app_id=2, requested_by="admin"), correlation="req-del")
    marks.update({"deployed": [datetime.fromisoformat(d.time) for d in (d1, d2, d3)]})
    return s, marks


@contextlib.contextmanager
def api(settings) -> Iterator[Any]:
    app = create_app(settings)
    try:
        yield app
    finally:
        app.extensions["shipline"].pool.close()
        app.extensions["shipline"].producer.flush(5)


@pytest.fixture
def folded(settings) -> Iterator[tuple[Any, Any, dict[str, Any], Story]]:
    story, marks = history_story()
    produce(settings, story.envs)
    with projector(settings), api(settings) as app:
        wait_caught_up(settings)
        client = app.test_client()
        yield app, client, marks, story


def get(client, settings, path: str, **kwargs: Any) -> Any:
    headers = {"Authorization": f"Bearer {settings.admin_token}", **kwargs.pop("headers", {})}
    return client.get(path, headers=headers, **kwargs)


def test_apps_history_builds_hooks(folded, settings) -> None:
    app, client, marks, story = folded
    assert client.get("/api/v1/apps").status_code == 401
    assert get(client, settings, "/api/v1/apps", headers={"Authorization": "Bearer nope"}).status_code == 401

    apps = get(client, settings, "/api/v1/apps").get_json()
    assert [a["id"] for a in apps] == [1]
    assert [a["id"] for a in get(client, settings, "/api/v1/apps?include_deleted=1").get_json()] == [1, 2]
    shop = get(client, settings, "/api/v1/apps/1").get_json()
    assert shop["name"] == "shop" and shop["current_revision"] == 3
    assert shop["url"] == "http://127.0.0.1:8000/app1/"
    assert get(client, settings, "/api/v1/apps/99").status_code == 404
    assert get(client, settings, f"/api/v1/apps/{2**70}").status_code == 404

    resp = get(client, settings, "/api/v1/apps/1/history")
    hist = resp.get_json()
    assert [h["revision"] for h in hist] == [4, 3, 2, 1]
    assert {"revision", "image", "commit", "trigger", "created_at", "status", "current"} <= set(hist[0])
    assert [(h["trigger"], h["status"], h["current"]) for h in hist] == [
        ("rollback", "failed", False), ("manual", "deployed", True), ("webhook", "replaced", False),
        ("webhook", "replaced", False)]
    assert hist[0]["failure"] == {"step": "health", "reason": "no answer"}
    page1 = get(client, settings, "/api/v1/apps/1/history?limit=2")
    assert [h["revision"] for h in page1.get_json()] == [4, 3]
    assert page1.headers["X-Shipline-Next-Before"] == "3" and 'rel="next"' in page1.headers["Link"]
    page2 = get(client, settings, "/api/v1/apps/1/history?limit=2&before=3")
    assert [h["revision"] for h in page2.get_json()] == [2, 1]
    for bad in ("limit=0", "limit=abc", "limit=5000", "before=x", "at=yesterday"):
        r = get(client, settings, f"/api/v1/apps/1/history?{bad}")
        assert r.status_code == 400 and "error" in r.get_json(), bad

    builds = get(client, settings, "/api/v1/apps/1/builds").get_json()
    assert [b["number"] for b in builds] == [2, 1] and "log" not in builds[0]
    assert builds[1]["commit"]["author"] == "Ada Lovelace" and builds[1]["status"] == "succeeded"
    for path in ("/api/v1/builds/1/1", "/api/v1/builds/1-1", "/api/v1/apps/1/builds/1"):
        one = get(client, settings, path).get_json()
        assert one["id"] == "1-1" and one["log"].startswith("Step 1/3") and one["exit_code"] == 0, path
    for path in ("/api/v1/builds/1-99", "/api/v1/builds/nope", f"/api/v1/builds/1/{2**40}"):
        assert get(client, settings, path).status_code == 404, path

    hooks = get(client, settings, "/api/v1/apps/1/deploy-hooks").get_json()
    assert hooks == [{"id": "hook-1", "name": "ci", "token_prefix": "dh_9f", "created_at": hooks[0]["created_at"],
                      "last_used_at": None, "deleted": False, "deleted_at": None}]

    # the ingress keeps its writes on the same paths
    assert client.post("/api/v1/apps", json={}, headers={"Authorization": f"Bearer {settings.admin_token}"}
                       ).status_code == 400


def test_point_in_time_names_the_release_and_its_cause(folded, settings) -> None:
    app, client, marks, story = folded
    x1, x2, x3 = marks["deployed"]

    def at(t: datetime) -> dict[str, Any]:
        resp = get(client, settings, "/api/v1/apps/1/history", query_string={"at": iso(t)})
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()

    assert at(marks["registered"])["release"] is None
    first = at(x1 + timedelta(milliseconds=1))
    assert first["release"]["revision"] == 1
    cause = first["caused_by"]
    assert cause["trigger"] == "webhook" and cause["person"] == "ada"
    assert cause["delivery"]["delivery_id"] == "gh-1" and cause["delivery"]["source"] == "github"
    assert cause["build"]["number"] == 1 and cause["request_id"] is None
    assert at(x1)["release"]["revision"] == 1  # live from the instant it was deployed
    assert at(x2 - timedelta(microseconds=1))["release"]["revision"] == 1
    second = at(x2 + timedelta(seconds=1))
    assert second["release"]["revision"] == 2 and second["caused_by"]["person"] == "grace"
    third = at(x3 + timedelta(days=1))
    assert third["release"]["revision"] == 3
    assert third["caused_by"] == {"trigger": "manual", "person": "linus", "requested_by": "linus",
                                  "request_id": "req-3", "correlation_id": "req-3", "delivery": None, "build": None}
    # an offset time (a "+" that arrives as a space in a query string is understood)
    local = (x2 + timedelta(seconds=1)).astimezone(timezone(timedelta(hours=1))).isoformat()
    assert "+01:00" in local
    plus = get(client, settings, "/api/v1/apps/1/history?at=" + local.replace("+", " "))
    assert plus.get_json()["release"]["revision"] == 2


def test_deliveries_and_the_audit_chain(folded, settings) -> None:
    app, client, marks, story = folded
    dels = get(client, settings, "/api/v1/deliveries?app_id=1").get_json()
    assert [d["delivery_id"] for d in dels] == ["gh-5", "gh-2", "gh-1"]
    assert dels[0]["outcome"] == "ignored" and dels[0]["caused"] == {"builds": [], "releases": [], "jobs": []}
    assert dels[2]["outcome"] == "queued" and dels[2]["caused"] == {"builds": [1], "releases": [1], "jobs": []}
    assert "body" not in dels[0]
    assert [d["delivery_id"] for d in get(client, settings, "/api/v1/deliveries?outcome=queued").get_json()] == [
        "gh-2", "gh-1"]
    page = get(client, settings, "/api/v1/deliveries?limit=1")
    assert page.headers["X-Shipline-Next-Before"] == dels[0]["received_at"]
    (one,) = get(client, settings, "/api/v1/deliveries/gh-1").get_json()
    assert '"pusher"' in one["body"] and one["body_encoding"] == "utf8"
    assert get(client, settings, "/api/v1/deliveries/nope").status_code == 404

    chain_envs = [e for e in story.envs if e.correlationid == "gh-1"]
    deployed = chain_envs[-1]
    # the outbound dispatcher's log (another service's table) joins by event id
    outbound_id = uuid.uuid4()
    with psycopg.connect(settings.db_url, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {settings.schema('outbound')}.deliveries (id, subscription_id, app_id, event_id, event_type,"
            " event_name, event_time, payload, next_attempt_at, status, attempts, last_status)"
            " VALUES (%s, 'sub-1', 1, %s, 'deployed', 'deployed', now(), 'x', now(), 'succeeded', 1, 200)",
            (outbound_id, deployed.id),
        )
    for query in ("correlation_id=gh-1", "delivery_id=gh-1"):
        chain = get(client, settings, f"/api/v1/audit?{query}").get_json()
        assert chain["correlation_id"] == "gh-1"
        assert [e["type"] for e in chain["events"]] == [
            "delivery.accepted", "build.queued", "build.started", "build.finished", "deploy.requested",
            "deploy.started", "deployed"]
        assert [e["id"] for e in chain["events"]] == [e.id for e in chain_envs]
        for parent, child in zip(chain["events"], chain["events"][1:], strict=False):
            assert child["causation_id"] == parent["id"]  # received -> build -> deploy, link by link
        assert [d["delivery_id"] for d in chain["deliveries"]] == ["gh-1"]
        assert [b["number"] for b in chain["builds"]] == [1]
        assert [r["revision"] for r in chain["releases"]] == [1]
        (out,) = chain["outbound"]
        assert out["id"] == str(outbound_id) and out["event_id"] == deployed.id and out["status"] == "succeeded"
        assert "payload" not in out
    recent = get(client, settings, "/api/v1/audit?app_id=1&limit=3").get_json()
    assert [e["sequence"] for e in recent] == [story.seq[1], story.seq[1] - 1, story.seq[1] - 2]
    assert get(client, settings, "/api/v1/audit").status_code == 400


def test_reads_wait_for_the_write_they_follow(folded, settings) -> None:
    app, client, marks, story = folded
    request_id = f"req-{uuid.uuid4()}"
    later = Story(start=story.at(), tag="later")
    later.seq.update(story.seq)
    later.emit(m.AppUpdated(app_id=1, changes={"name": "shop-renamed"}, requested_by="admin"), correlation=request_id)

    def write_soon() -> None:
        time.sleep(0.3)
        produce(settings, later.envs)

    writer = threading.Thread(target=write_soon)
    writer.start()
    resp = get(client, settings, f"/api/v1/apps/1?after={request_id}")
    writer.join()
    assert resp.status_code == 200 and "X-Shipline-Stale" not in resp.headers
    assert resp.get_json()["name"] == "shop-renamed"
    resp = get(client, settings, "/api/v1/apps/1/history", headers={"X-Shipline-After": request_id})
    assert resp.status_code == 200 and "X-Shipline-Stale" not in resp.headers

    app.config["PROJECTIONS_AFTER_TIMEOUT"] = 0.3
    started = time.monotonic()
    resp = get(client, settings, "/api/v1/apps", headers={"X-Shipline-After": "req-never-written"})
    assert resp.status_code == 200 and resp.headers["X-Shipline-Stale"] == "true"
    assert time.monotonic() - started >= 0.3
