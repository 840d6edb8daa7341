"""The CLI against a live app server (the public Flask app on a real port): writes go through the
real ingress to Kafka; a small stand-in for streams turns those requests into events (streams is
another service with its own tests), the real projector folds them, and the CLI reads them back."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from projections import cli
from shipline import codec, kafka
from shipline import messages as m
from shipline.envelope import derive_id, wrap
from tests.integration.test_projections_kit import Story, produce, projector, serve, wait_caught_up

pytestmark = pytest.mark.integration


class StandInStreams(threading.Thread):
    """Turns management requests on ``inbound`` into the events streams would decide, with
    correlationid = request_id (what read-your-writes keys on) and the per-app sequence."""

    def __init__(self, settings) -> None:
        super().__init__(daemon=True, name="stand-in-streams")
        self.settings = settings
        self.stop = threading.Event()
        self.seq: dict[int, int] = {}
        self.releases: dict[int, list[tuple[int, str]]] = {}

    def run(self) -> None:
        consumer = kafka.consumer(self.settings.bootstrap_servers, f"{self.settings.topic_prefix}-standin",
                                  [self.settings.topics.inbound])
        producer = kafka.producer(self.settings.bootstrap_servers)
        try:
            while not self.stop.is_set():
                for msg in consumer.consume(100, timeout=0.2):
                    if msg.error():
                        continue
                    req = codec.decode(msg.value())
                    events = self.decide(req.data)
                    envs = []
                    for i, event in enumerate(events):
                        self.seq[event.app_id] = self.seq.get(event.app_id, 0) + 1
                        envs.append(wrap(event, source="stand-in-streams", id=derive_id(req.id, i),
                                         correlationid=req.correlationid, causationid=req.id,
                                         sequence=self.seq[event.app_id]))
                    if envs:
                        kafka.send_many_sync(producer, self.settings.topics.events, envs)
        finally:
            consumer.close()

    def decide(self, r: m.Message) -> list[m.Message]:
        if isinstance(r, m.RegisterApp):
            return [m.AppRegistered(app_id=r.app_id, name=r.name, namespace=r.namespace, repo_url=r.repo_url,
                                    branch=r.branch, image=r.image, kind=r.kind, strategy=r.strategy,
                                    command=r.command, port=r.port, health_path=r.health_path, build=r.build,
                                    allow_unsigned=r.allow_unsigned, requested_by=r.requested_by)]
        if isinstance(r, m.EnableWebhookToken):
            return [m.WebhookTokenEnabled(app_id=r.app_id, token_hash=r.token_hash, token_prefix=r.token_prefix)]
        if isinstance(r, m.DisableWebhookToken):
            return [m.WebhookTokenDisabled(app_id=r.app_id)]
        if isinstance(r, m.RequestDeploy):
            done = self.releases.setdefault(r.app_id, [])
            if r.trigger == "rollback":
                target = r.revision or (done[-2][0] if len(done) > 1 else None)
                images = dict(done)
                if target not in images:
                    return [m.RequestRejected(app_id=r.app_id, request_type="deploy.request",
                                              request_id=r.request_id, reason="nothing to roll back to")]
                image = images[target]
            else:
                image = r.image or ""
            revision = len(done) + 1
            done.append((revision, image))
            return [
                m.DeployRequested(app_id=r.app_id, revision=revision, image=image, commit=r.commit or "",
                                  trigger=r.trigger, cause=r.request_id, requested_by=r.requested_by),
                m.DeployStarted(app_id=r.app_id, revision=revision, log_path=""),
                m.Deployed(app_id=r.app_id, revision=revision, image=image, commit=r.commit or "",
                           instances=["i-1"], duration=1.0, url=f"http://127.0.0.1:8000/{r.app_id}/"),
            ]
        return []


@pytest.fixture
def stack(settings) -> Iterator[StandInStreams]:
    streams = StandInStreams(settings)
    streams.start()
    with contextlib.ExitStack() as stack:
        stack.enter_context(projector(settings))
        stack.enter_context(serve(settings))
        yield streams
    streams.stop.set()
    streams.join(10)


def run(capsys, settings, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv), settings=settings)
    out, err = capsys.readouterr()
    return code, out, err


def register(settings, name: str) -> dict[str, Any]:
    resp = requests.post(f"{settings.public_url}/api/v1/apps", json={"name": name, "namespace": "acme",
                                                                     "image": f"registry.example.com/{name}"},
                         headers={"Authorization": f"Bearer {settings.admin_token}"}, timeout=30)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_app_commands_against_a_live_server(stack, settings, capsys) -> None:
    shop = register(settings, "shop")
    # read your writes: the listing waits for the registration's request id
    apps = requests.get(f"{settings.public_url}/api/v1/apps", params={"after": shop["request_id"]},
                        headers={"Authorization": f"Bearer {settings.admin_token}"}, timeout=30)
    assert "X-Shipline-Stale" not in apps.headers and [a["name"] for a in apps.json()] == ["shop"]

    code, out, _ = run(capsys, settings, "app", "list")
    assert code == 0 and "shop" in out and "acme" in out and out.splitlines()[0].split()[:3] == ["ID", "NAME",
                                                                                                "NAMESPACE"]

    code, out, _ = run(capsys, settings, "app", "deploy", "shop", "--image", "registry.example.com/shop:v1")
    assert code == 0 and "✔ Deploying shop revision #1 (registry.example.com/shop:v1)" in out, out

    code, out, err = run(capsys, settings, "app", "rollback", "shop")
    assert code == 1 and "refused: nothing to roll back to" in err  # one release only: streams says no
    code, out, _ = run(capsys, settings, "app", "deploy", str(shop["id"]), "--image", "registry.example.com/shop:v2")
    assert code == 0 and "revision #2" in out, out

    code, out, _ = run(capsys, settings, "app", "rollback", "acme/shop")
    assert code == 0 and "✔ Rolled back shop to revision #3 (registry.example.com/shop:v1)" in out, out
    code, out, _ = run(capsys, settings, "app", "rollback", "shop", "--revision", "2")
    assert code == 0 and "revision #4 (registry.example.com/shop:v2)" in out, out

    code, out, _ = run(capsys, settings, "app", "history", "shop")
    lines = out.splitlines()
    assert lines[0].split() == ["#", "IMAGE", "COMMIT", "TRIGGER", "STATUS", "WHEN"]
    assert [line.split()[0] for line in lines[1:]] == ["4", "3", "2", "1"]
    assert lines[1].split()[3] == "rollback" and lines[1].endswith("(current)")
    assert "manual" in lines[3] and "replaced" in lines[3] and "(current)" not in lines[3]
    code, out, _ = run(capsys, settings, "app", "history", "shop", "--json")
    assert [r["revision"] for r in json.loads(out)] == [4, 3, 2, 1]
    code, out, _ = run(capsys, settings, "app", "history", "shop", "--at", "2000-01-01T00:00:00Z")
    assert code == 0 and "Nothing of shop was live" in out

    code, out, _ = run(capsys, settings, "app", "webhook", "enable", "shop")
    assert code == 0 and "✔ Webhook enabled for shop" in out
    assert f"Webhook URL: {settings.public_url}/api/v1/webhook/acme/shop" in out and "Secret token: " in out
    code, out, _ = run(capsys, settings, "app", "webhook", "status", "shop", "--json")
    assert json.loads(out)["enabled"] is True
    code, out, _ = run(capsys, settings, "app", "webhook", "disable", "shop")
    assert code == 0 and "✔ Webhook disabled for shop" in out

    code, out, err = run(capsys, settings, "app", "history", "nosuchapp")
    assert code == 1 and "no app named 'nosuchapp'" in err
    code, out, err = run(capsys, settings, "app", "history", "4242")
    assert code == 1 and "404" in err


def test_deliveries_audit_and_rebuild_commands(stack, settings, capsys) -> None:
    s = Story()
    s.register(1, "shop")
    s.push_to_deploy(1, 1, 1, "gh-cli-1", author="ada")
    s.delivery(1, "gh-cli-2", outcome="ignored", event="issues")
    produce(settings, s.envs)
    wait_caught_up(settings)

    code, out, _ = run(capsys, settings, "deliveries")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["WHEN", "SOURCE", "DELIVERY", "APP", "EVENT", "VERIFIED", "OUTCOME",
                                              "CAUSED"]
    assert "gh-cli-2" in lines[1] and "ignored" in lines[1]
    assert "gh-cli-1" in lines[2] and "build #1, release #1" in lines[2]
    code, out, _ = run(capsys, settings, "deliveries", "--app", "shop", "--outcome", "queued", "--json")
    assert [d["delivery_id"] for d in json.loads(out)] == ["gh-cli-1"]

    code, out, _ = run(capsys, settings, "audit", "gh-cli-1")
    assert code == 0 and "Delivery gh-cli-1 for app 1: github push, hmac" in out
    types = [line.split()[1] for line in out.splitlines()[3:]]
    assert types == ["delivery.accepted", "build.queued", "build.started", "build.finished", "deploy.requested",
                     "deploy.started", "deployed"]
    code, out, _ = run(capsys, settings, "audit", "gh-cli-1", "--json")
    assert len(json.loads(out)["events"]) == 7

    code, out, err = run(capsys, settings, "projections", "rebuild", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["swapped"] is True and doc["events"] == doc["applied"] == len(s.envs)
    assert "rebuild [" in err and "100%" in err  # the progress bar
    code, out, _ = run(capsys, settings, "deliveries", "--json")
    assert len(json.loads(out)) == 2  # served from the rebuilt tables
