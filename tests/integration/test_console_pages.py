"""Console pages over real data: the ingress writes to Kafka, the projector folds the events log
into PostgreSQL, and the console reads and writes only through their HTTP API.

The events that streams and the deployer would publish (an app registered, a GitHub push
accepted, builds, two deploys) are produced here onto the test's events topic, so the test needs
only the broker, the database and the projector, and runs in seconds.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shipline import messages as m
from shipline.codec import decode
from shipline.envelope import wrap
from shipline.kafka import consumer, producer, send_many_sync
from shipline.web import create_app

pytestmark = pytest.mark.integration

BUILD_LOG = "Step 1/3 : FROM shipline/busybox:latest\nStep 2/3 : COPY index.html /www/\nSuccessfully built abc123\n"


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


class EventLog:
    """Publishes events the way streams does: per-app sequence stamped, keyed by app id."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.p = producer(settings.bootstrap_servers)
        self.sequence: dict[int, int] = {}

    def publish(self, *messages: m.Message, correlation: str, time_: str | None = None) -> None:
        envs = []
        for message in messages:
            self.sequence[message.app_id] = self.sequence.get(message.app_id, 0) + 1
            envs.append(wrap(message, source="shipline/streams", correlationid=correlation,
                             sequence=self.sequence[message.app_id], time=time_))
        send_many_sync(self.p, self.settings.topics.events, envs, 30)


@pytest.fixture
def stack(settings) -> Iterator[dict[str, Any]]:
    from projections.projector import Projector

    app = create_app(settings)
    # streams is not running here, so a write's own event never comes: do not wait 5 s for it
    app.config["PROJECTIONS_AFTER_TIMEOUT"] = 0.5
    stop = threading.Event()
    projector = threading.Thread(target=Projector(settings).run, args=(stop,), daemon=True)
    projector.start()
    yield {"app": app, "log": EventLog(settings)}
    stop.set()
    projector.join(30)
    app.extensions["shipline"].pool.close()


def api(client, settings, method: str, path: str, **kwargs: Any):
    return client.open(path, method=method, headers={"Authorization": f"Bearer {settings.admin_token}"}, **kwargs)


def register(client, settings, name: str) -> dict[str, Any]:
    resp = api(client, settings, "POST", "/api/v1/apps", json={
        "name": name, "namespace": "shop", "repo_url": "https://github.com/acme/shop.git",
        "image": "registry.example.com/acme/shop", "strategy": "process", "command": "python3 serve.py"})
    assert resp.status_code == 201, resp.text
    return resp.get_json()


def deploy_story(log: EventLog, app_id: int, name: str, delivery: str) -> None:
    """Registered; a push builds #1 and deploys r1; a manual deploy makes r2; build #2 is running."""
    sha1, sha2 = "a1" * 20, "b2" * 20
    image1 = f"shipline/{name}:{sha1[:12]}"
    url = f"http://127.0.0.1:18000/{name}"
    log.publish(m.AppRegistered(app_id=app_id, name=name, namespace="shop",
                                repo_url="https://github.com/acme/shop.git", branch="main",
                                image="registry.example.com/acme/shop", kind="service", strategy="process",
                                command="python3 serve.py", port=None, health_path="/", build=None,
                                allow_unsigned=False, requested_by="admin"), correlation=str(uuid.uuid4()))
    log.publish(
        m.DeliveryAccepted(app_id=app_id, delivery_id=delivery, source="github",
                           route=f"/api/v1/webhooks/github/{app_id}", event="push", verification="hmac",
                           received_at="2025-06-01T10:00:00Z", outcome="queued", reason="push to main",
                           headers={"X-GitHub-Event": "push"}, body="{}", body_encoding="utf8"),
        m.BuildQueued(app_id=app_id, build=1, commit=sha1, message="Release v1", author="Demo Dev",
                      ref="main", delivery_id=delivery, repo_url="https://github.com/acme/shop.git"),
        m.BuildStarted(app_id=app_id, build=1, commit=sha1, log_path="/tmp/build-1.log"),
        m.BuildFinished(app_id=app_id, build=1, commit=sha1, status="succeeded", exit_code=0, image_id="sha256:1",
                        tags=[image1], duration=3.2, log=BUILD_LOG, log_path="/tmp/build-1.log"),
        m.DeployRequested(app_id=app_id, revision=1, image=image1, commit=sha1, trigger="webhook", build=1,
                          cause=delivery),
        m.DeployStarted(app_id=app_id, revision=1, log_path="/tmp/deploy-1.log"),
        m.Deployed(app_id=app_id, revision=1, image=image1, commit=sha1, instances=["127.0.0.1:20001"],
                   duration=1.5, url=url),
        correlation=delivery,
    )
    manual = str(uuid.uuid4())
    log.publish(
        m.DeployRequested(app_id=app_id, revision=2, image="registry.example.com/acme/shop:v2", commit=sha2,
                          trigger="manual", cause=manual, requested_by="admin"),
        m.DeployStarted(app_id=app_id, revision=2, log_path="/tmp/deploy-2.log"),
        m.Deployed(app_id=app_id, revision=2, image="registry.example.com/acme/shop:v2", commit=sha2,
                   instances=["127.0.0.1:20002"], duration=1.1, url=url),
        correlation=manual,
    )
    second = str(uuid.uuid4())
    log.publish(
        m.BuildQueued(app_id=app_id, build=2, commit=sha2, message="Release v3", author="Demo Dev", ref="main",
                      delivery_id=second, repo_url="https://github.com/acme/shop.git"),
        m.BuildStarted(app_id=app_id, build=2, commit=sha2, log_path="/tmp/build-2.log"),
        correlation=second,
    )


def signed_in(app, settings):
    client = app.test_client()
    page = client.get("/console/login")
    resp = client.post("/console/login", data={"token": settings.admin_token, "csrf_token": csrf_of(page.text)})
    assert resp.status_code == 303
    return client


def inbound_requests(settings, request_type: str, timeout: float = 30) -> list[Any]:
    """The request records of one type on the inbound topic (what the console's writes became)."""
    c = consumer(settings.bootstrap_servers, f"console-check-{uuid.uuid4().hex[:6]}", [settings.topics.inbound],
                 **{"auto.offset.reset": "earliest"})
    found: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not found:
            for msg in c.consume(100, timeout=0.5):
                if msg.error():
                    continue
                env = decode(msg.value())
                if env.type == request_type:
                    found.append(env)
    finally:
        c.close()
    return found


def test_apps_history_builds_timeline_and_rollback(stack, settings) -> None:
    app, log = stack["app"], stack["log"]
    client = signed_in(app, settings)
    created = register(client, settings, "shop-web")
    app_id = created["id"]
    delivery = str(uuid.uuid4())
    deploy_story(log, app_id, "shop-web", delivery)
    wait_until("the projection to fold the story", lambda: "Release v3" in client.get(f"/console/apps/{app_id}").text)

    # apps list: current revision, status, URL, last deploy time
    apps = client.get("/console/")
    assert apps.status_code == 200
    row = re.search(rf'<tr data-app-id="{app_id}">(.*?)</tr>', apps.text, re.S)
    assert row, apps.text
    assert "shop-web" in row.group(1) and "<strong>r2</strong>" in row.group(1)
    assert "http://127.0.0.1:18000/shop-web" in row.group(1)
    assert 'data-status="live"' in row.group(1)
    assert "ago" in row.group(1) or "just now" in row.group(1)

    # app page: history newest first, Rollback on the non-current entry only, builds with status
    page = client.get(f"/console/apps/{app_id}").text
    assert re.search(r'id="current-revision">r2<', page)
    revisions = re.findall(r'<tr data-revision="(\d+)" class="(current)?"', page)
    assert revisions == [("2", "current"), ("1", "")]
    assert f'href="/console/apps/{app_id}/rollback/1"' in page
    assert f'href="/console/apps/{app_id}/rollback/2"' not in page
    assert f'href="/console/timeline/{delivery}"' in page
    assert 'data-build="1"' in page and 'data-status="succeeded"' in page
    # build #2 is running: the live fragment says so, and the page polls it
    assert 'id="in-progress"' in page and 'data-running="1"' in page
    assert f'data-live="/console/apps/{app_id}/live"' in page
    live = client.get(f"/console/apps/{app_id}/live")
    assert live.status_code == 200 and live.text.lstrip().startswith('<div id="live" data-running="1"')

    # build page with its log
    build = client.get(f"/console/apps/{app_id}/builds/1").text
    assert "Successfully built abc123" in build and "Release v1" in build

    # timeline of the push: received -> build -> deploy
    timeline = client.get(f"/console/timeline/{delivery}").text
    stages = re.findall(r'<ul class="timeline" data-stage="(\w+)"', timeline)
    assert stages[:3] == ["received", "build", "deploy"]
    for kind in ("delivery.accepted", "build.queued", "build.finished", "deploy.requested", "deployed"):
        assert f'data-type="{kind}"' in timeline

    # deliveries page: the push with its outcome, linked to its timeline
    deliveries = client.get(f"/console/apps/{app_id}/deliveries").text
    row = re.search(rf'<tr data-delivery-id="{delivery}">(.*?)</tr>', deliveries, re.S)
    assert row and 'data-status="queued"' in row.group(1) and f"/console/timeline/{delivery}" in row.group(1)

    # rollback: a confirm step, then the write goes through the API onto the log
    confirm = client.get(f"/console/apps/{app_id}/rollback/1")
    assert confirm.status_code == 200
    assert "Roll back shop-web?" in confirm.text and "Replaces</th><td>r2" in confirm.text
    assert client.get(f"/console/apps/{app_id}/rollback/99").status_code == 404
    done = client.post(f"/console/apps/{app_id}/rollback/1", data={"csrf_token": csrf_of(confirm.text)})
    assert done.status_code == 303
    assert done.headers["Location"].startswith(f"/console/apps/{app_id}?after=")
    after = client.get(done.headers["Location"])
    assert "Rollback to revision 1 requested" in after.text
    assert 'data-running="1"' in after.text  # polls fast until the new revision shows
    requests_ = wait_until("the rollback request on the log", lambda: [
        e for e in inbound_requests(settings, "deploy.request") if e.app_id == app_id])
    assert requests_[0].data.trigger == "rollback" and requests_[0].data.revision == 1


def test_hooks_token_shown_once_then_deleted(stack, settings) -> None:
    app, log = stack["app"], stack["log"]
    client = signed_in(app, settings)
    created = register(client, settings, "shop-api")
    app_id = created["id"]
    deploy_story(log, app_id, "shop-api", str(uuid.uuid4()))
    wait_until("the app to be projected", lambda: client.get(f"/console/apps/{app_id}/hooks").status_code == 200)
    hooks = client.get(f"/console/apps/{app_id}/hooks").text
    assert f"{settings.public_url}/api/v1/webhooks/github/{app_id}" in hooks
    assert "No deploy hooks." in hooks and 'data-status="disabled"' in hooks

    # create: the token is shown once, with a copy button and the curl example
    resp = client.post(f"/console/apps/{app_id}/hooks", data={"name": "gitlab-ci", "csrf_token": csrf_of(hooks)})
    assert resp.status_code == 303
    shown = client.get(resp.headers["Location"]).text
    token = re.search(r'<code class="token" id="token-value">([^<]+)</code>', shown).group(1)
    assert 'data-copy="#token-value"' in shown
    assert f"curl -X POST {settings.public_url}/api/v1/dh" in shown
    assert f'-H "X-Deploy-Hook-Token: {token}"' in shown
    assert token not in client.get(f"/console/apps/{app_id}/hooks").text  # gone on reload
    cookie = client.get_cookie("session")
    assert cookie is None or token not in cookie.value

    # the token shown is the real one: the deploy-hook route accepts it
    dh = app.test_client().post("/api/v1/dh", json={"imageTag": "v7"}, headers={"X-Deploy-Hook-Token": token})
    assert dh.status_code == 201, dh.text

    # the hook appears in the list once streams publishes deploy_hook.created (emulated here)
    requested = wait_until("the create request", lambda: [
        e for e in inbound_requests(settings, "deploy_hook.create") if e.app_id == app_id])
    hook_id = requested[0].data.hook_id
    log.publish(m.DeployHookCreated(app_id=app_id, hook_id=hook_id, name="gitlab-ci",
                                    token_hash=requested[0].data.token_hash,
                                    token_prefix=requested[0].data.token_prefix), correlation=requested[0].id)
    page = wait_until("the hook in the list", lambda: (
        t := client.get(f"/console/apps/{app_id}/hooks").text) and f'data-hook-id="{hook_id}"' in t and t)
    assert "gitlab-ci" in page and requested[0].data.token_prefix in page

    # delete: the very next request with that token is refused
    resp = client.post(f"/console/apps/{app_id}/hooks/{hook_id}/delete", data={"csrf_token": csrf_of(page)})
    assert resp.status_code == 303
    assert "Deploy hook deleted" in client.get(resp.headers["Location"]).text
    refused = app.test_client().post("/api/v1/dh", json={"imageTag": "v8"}, headers={"X-Deploy-Hook-Token": token})
    assert refused.status_code == 404

    # the per-app token webhook: enable (token once), regenerate, disable
    page = client.get(f"/console/apps/{app_id}/hooks").text
    resp = client.post(f"/console/apps/{app_id}/webhook/enable", data={"csrf_token": csrf_of(page)})
    shown = client.get(resp.headers["Location"]).text
    first = re.search(r'<code class="token" id="token-value">([^<]+)</code>', shown).group(1)
    assert f"{settings.public_url}/api/v1/webhook/shop/shop-api" in shown
    assert f'-H "X-Shipline-Token: {first}"' in shown
    assert 'data-status="enabled"' in shown and "Regenerate token" in shown
    resp = client.post(f"/console/apps/{app_id}/webhook/enable", data={"csrf_token": csrf_of(shown)})
    shown = client.get(resp.headers["Location"]).text
    second = re.search(r'<code class="token" id="token-value">([^<]+)</code>', shown).group(1)
    assert second != first
    resp = client.post(f"/console/apps/{app_id}/webhook/disable", data={"csrf_token": csrf_of(shown)})
    page = client.get(resp.headers["Location"]).text
    assert "Token webhook disabled." in page and 'data-status="disabled"' in page
    status = api(app.test_client(), settings, "GET", f"/api/v1/apps/{app_id}/webhook").get_json()
    assert status["enabled"] is False


def test_an_api_refusal_is_shown_not_a_crash(stack, settings) -> None:
    app = stack["app"]
    client = signed_in(app, settings)
    page = client.get("/console/")
    resp = client.post("/console/apps/987654/hooks", data={"name": "ci", "csrf_token": csrf_of(page.text)})
    assert resp.status_code == 303
    follow = client.get(resp.headers["Location"])
    assert follow.status_code == 404  # the hooks page of an app that does not exist
    assert "not found" in follow.text or "no app" in follow.text
    resp = client.post("/console/apps/987654/rollback/1", data={"csrf_token": csrf_of(page.text)})
    assert resp.status_code == 404 and "text/html" in resp.headers["Content-Type"]


class Receiver:
    """A subscriber endpoint that answers 200 with a short body and records what it got."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.got: list[dict[str, str]] = []
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                got.append(dict(self.headers))
                body = b"thanks from the receiver"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def test_outbound_attempts_and_redeliver(stack, settings) -> None:
    from outbound.dispatcher import Dispatcher

    app, log = stack["app"], stack["log"]
    stop = threading.Event()
    dispatcher = threading.Thread(target=Dispatcher(settings).run, args=(stop,), daemon=True)
    dispatcher.start()
    receiver = Receiver()
    try:
        client = signed_in(app, settings)
        app_id = register(client, settings, "shop-hooks")["id"]
        resp = api(client, settings, "POST", f"/api/v1/apps/{app_id}/subscriptions",
                   json={"url": receiver.url, "events": ["deployed"], "description": "ops receiver"})
        assert resp.status_code == 201, resp.text
        # streams would turn the request into subscription.created: emulate it from the request record
        request = wait_until("the subscription request", lambda: [
            e for e in inbound_requests(settings, "subscription.create") if e.app_id == app_id])[0].data
        deploy_story(log, app_id, "shop-hooks", str(uuid.uuid4()))
        # deploy_story published r1/r2 before the subscription existed; this deploy is after it
        log.publish(m.SubscriptionCreated(app_id=app_id, subscription_id=request.subscription_id, url=request.url,
                                          events=request.events, secret_encrypted=request.secret_encrypted,
                                          description=request.description), correlation=str(uuid.uuid4()))
        cause = str(uuid.uuid4())
        log.publish(m.DeployRequested(app_id=app_id, revision=3, image="registry.example.com/acme/shop:v3",
                                      commit="c3" * 20, trigger="manual", cause=cause),
                    m.Deployed(app_id=app_id, revision=3, image="registry.example.com/acme/shop:v3",
                               commit="c3" * 20, instances=[], duration=0.5, url="http://127.0.0.1:18000/"),
                    correlation=cause)
        wait_until("the first delivery", lambda: receiver.got, 60)

        def outbound_row() -> str | None:
            page = client.get(f"/console/apps/{app_id}/deliveries").text
            found = re.search(r'<tr data-outbound-id="([^"]+)" data-attempts="(\d+)">(.*?)</tr>', page, re.S)
            return found if found and found.group(2) != "0" else None

        found = wait_until("the attempt in the console", outbound_row)
        page = client.get(f"/console/apps/{app_id}/deliveries").text
        assert receiver.url in page and "ops receiver" in page
        delivery_id, row = found.group(1), found.group(3)
        assert "deployed" in row and 'data-status="succeeded"' in row
        assert 'data-status="200"' in row and " ms" in row and "thanks from the receiver" in row
        assert 'class="redeliver"' in row

        resp = client.post(f"/console/outbound/{delivery_id}/redeliver",
                           data={"csrf_token": csrf_of(page), "app_id": str(app_id)})
        assert resp.status_code == 303
        assert resp.headers["Location"] == f"/console/apps/{app_id}/deliveries#outbound"
        assert "Redelivery of" in client.get(resp.headers["Location"]).text
        wait_until("the second attempt in the console", lambda: f'data-outbound-id="{delivery_id}" data-attempts="2"'
                   in client.get(f"/console/apps/{app_id}/deliveries/outbound").text)
        assert len(receiver.got) == 2
        assert receiver.got[0]["X-Shipline-Delivery"] == receiver.got[1]["X-Shipline-Delivery"]

        # the deploy's timeline ends with what was sent to the subscriber
        timeline = client.get(f"/console/timeline/{cause}").text
        assert 'data-stage="sent"' in timeline and delivery_id in timeline
    finally:
        stop.set()
        dispatcher.join(30)
        receiver.server.shutdown()
