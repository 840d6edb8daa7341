"""The outbound API on the public app: subscriptions as requests, the attempt log, manual actions."""

from __future__ import annotations

import argparse
import base64
import threading
import time
from typing import Any

import pytest

from outbound import cli, signing
from outbound.testing import EventLog, Received, Receiver, Running, wait_until
from shipline import codec, kafka
from shipline.config import load
from shipline.messages import (
    Deployed,
    SubscriptionCreated,
    SubscriptionDeleted,
    SubscriptionUpdated,
)
from shipline.web import create_app

pytestmark = pytest.mark.integration


def tuned(settings: Any, **env: str) -> Any:
    return load({**settings.env, **env})


@pytest.fixture
def web(settings):
    app = create_app(settings)
    app.testing = True
    client = app.test_client()
    headers = {"Authorization": f"Bearer {settings.admin_token}"}

    def call(method: str, path: str, body: Any = None, auth: bool = True) -> Any:
        return client.open(path, method=method, json=body, headers=headers if auth else {})

    yield call
    ctx = app.extensions["shipline"]
    ctx.pool.close()


def inbound(settings: Any, count: int, timeout: float = 30, types: frozenset[str] | None = None) -> list[Any]:
    """The first ``count`` records on inbound (of ``types``, when given) as (raw, envelope)."""
    consumer = kafka.consumer(settings.bootstrap_servers, f"{settings.topic_prefix}-test-inbound-{time.monotonic_ns()}",
                              [settings.topics.inbound])
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                env = codec.decode(msg.value())
                if types is None or env.type in types:
                    found.append((msg.value(), env))
    finally:
        consumer.close()
    return found


def deployed(app_id: int, revision: int) -> Deployed:
    return Deployed(app_id=app_id, revision=revision, image="img", commit="abc", instances=[], duration=0.1, url="")


def test_subscription_writes_are_requests_with_the_secret_encrypted_and_reads_come_from_the_tables(settings, web):
    assert web("POST", "/api/v1/apps/5/subscriptions", {"url": "http://127.0.0.1:9/x"}, auth=False).status_code == 401
    for bad, why in [
        ({"url": "ftp://example.com/"}, "http"),
        ({"url": "http://127.0.0.1:9/", "events": ["nope"]}, "unknown"),
        ({"url": "http://127.0.0.1:9/", "events": ["subscription.created"]}, "internal"),
        ({"url": "http://127.0.0.1:9/", "events": "deployed"}, "list"),
        ({"url": "http://10.1.2.3/"}, "private"),
        ({"url": "http://169.254.169.254/latest"}, "link-local"),
        ({"url": "http://127.0.0.1:9/", "secret": "short"}, "secret"),
        ({"url": "http://127.0.0.1:9/", "color": "red"}, "unknown field"),
    ]:
        resp = web("POST", "/api/v1/apps/5/subscriptions", bad)
        assert resp.status_code == 400, bad
        assert why in resp.get_json()["error"], (bad, resp.get_json())
    resp = web("POST", "/api/v1/apps/5/subscriptions",
               {"url": "http://127.0.0.1:9/x", "events": ["build_finish", "deployed"], "description": "ci"})
    assert resp.status_code == 201
    created = resp.get_json()
    secret = created["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert resp.headers["Location"] == f"/api/v1/subscriptions/{created['id']}"
    ((raw, env),) = inbound(settings, 1)
    assert env.type == "subscription.create" and env.data.subscription_id == created["id"]
    assert secret.encode() not in raw and secret[6:].encode() not in raw
    assert signing.decrypt(settings.secret_key, env.data.secret_encrypted) == secret

    log = EventLog(settings)  # as streams would: the request becomes an event
    log.emit(SubscriptionCreated(app_id=5, subscription_id=created["id"], url=env.data.url, events=env.data.events,
                                 secret_encrypted=env.data.secret_encrypted, description=env.data.description))
    with Running(settings):
        sid = created["id"]
        shown = wait_until(lambda: (r := web("GET", f"/api/v1/subscriptions/{sid}")).status_code == 200
                           and r.get_json(), what="the subscription in the table")
        assert shown["events"] == ["build_finish", "deployed"] and shown["status"] == "enabled"
        assert "secret" not in shown and "secret_encrypted" not in shown
        listed = web("GET", "/api/v1/apps/5/subscriptions").get_json()["subscriptions"]
        assert [s["id"] for s in listed] == [sid]

        assert web("PATCH", f"/api/v1/subscriptions/{sid}", {"colour": 1}).status_code == 400
        assert web("PATCH", f"/api/v1/subscriptions/{sid}", {"events": []}).status_code == 400
        assert web("PATCH", f"/api/v1/subscriptions/{sid}", {}).status_code == 400
        rotated = web("PATCH", f"/api/v1/subscriptions/{sid}", {"rotate_secret": True})
        assert rotated.status_code == 202
        new_secret = rotated.get_json()["secret"]
        assert new_secret != secret and new_secret.startswith("whsec_")
        _, (raw, update) = inbound(settings, 2)
        assert update.type == "subscription.update" and new_secret.encode() not in raw
        changes = update.data.changes
        assert signing.decrypt(settings.secret_key, changes["secret_encrypted"]) == new_secret
        log.emit(SubscriptionUpdated(app_id=5, subscription_id=sid, changes=changes))
        shown = wait_until(lambda: (r := web("GET", f"/api/v1/subscriptions/{sid}").get_json())
                           ["previous_secret_expires_at"] and r, what="the rotation applied")
        assert shown["previous_secret_expires_at"] == changes["previous_secret_expires_at"]

        assert web("DELETE", f"/api/v1/subscriptions/{sid}").status_code == 202
        _, _, (_, deletion) = inbound(settings, 3)
        assert deletion.type == "subscription.delete"
        log.emit(SubscriptionDeleted(app_id=5, subscription_id=sid))
        wait_until(lambda: web("GET", f"/api/v1/subscriptions/{sid}").status_code == 404, what="deleted")
    assert web("GET", "/api/v1/subscriptions/nope").status_code == 404
    assert web("GET", "/api/v1/outbound/deliveries/not-a-uuid/attempts").status_code == 404


def test_redeliver_bulk_recover_and_replay_to_a_new_subscriber(settings, web):
    mode = {"/a": 200}
    lock = threading.Lock()

    def policy(req: Received) -> tuple[int, dict[str, str], bytes]:
        with lock:
            return mode.get(req.path, 200), {}, b"answer"

    receiver = Receiver(policy)
    s = tuned(settings, SHIPLINE_RETRY_SCHEDULE="0.05")
    log = EventLog(s)
    try:
        a, _ = log.subscribe(51, receiver.url("/a"), ["deployed"])
        with Running(s):
            envs = log.emit(*[deployed(51, r) for r in (1, 2, 3)])
            wait_until(lambda: len(receiver.received("/a")) == 3, what="three deliveries")
            done_q = f"/api/v1/subscriptions/{a}/deliveries?status=succeeded"
            listed = wait_until(lambda: (d := web("GET", done_q).get_json()["deliveries"]) and len(d) == 3 and d,
                                what="three succeeded")
            first = next(d for d in listed if d["event_id"] == envs[0].id)
            tries = web("GET", f"/api/v1/deliveries/{first['id']}/attempts").get_json()["attempts"]
            assert [(t["status_code"], t["outcome"], t["response_body"]) for t in tries] == [
                (200, "succeeded", "answer")]

            # redeliver one: the same delivery id goes out again and the log shows a second attempt
            assert web("POST", f"/api/v1/deliveries/{first['id']}/redeliver").status_code == 202
            wait_until(lambda: len(receiver.received("/a")) == 4, what="the redelivery")
            assert receiver.received("/a")[-1].delivery == first["id"]
            wait_until(lambda: len(web("GET", f"/api/v1/outbound/deliveries/{first['id']}/attempts")
                                   .get_json()["attempts"]) == 2, what="two attempts logged")
            assert web("POST", "/api/v1/outbound/deliveries/00000000-0000-0000-0000-000000000000/redeliver"
                       ).status_code == 404

            # bulk recover: failures since T go again, older ones stay failed
            with lock:
                mode["/a"] = 500
            (old,) = log.emit(deployed(51, 4))
            failed = f"/api/v1/subscriptions/{a}/deliveries?status=failed"
            wait_until(lambda: len(web("GET", failed).get_json()["deliveries"]) == 1, what="event 4 given up")
            since = time.time()
            time.sleep(0.01)
            (recent,) = log.emit(deployed(51, 5))
            wait_until(lambda: len(web("GET", failed).get_json()["deliveries"]) == 2, what="event 5 given up")
            with lock:
                mode["/a"] = 200
            resp = web("POST", f"/api/v1/subscriptions/{a}/recover", {"since": since})
            assert resp.status_code == 202 and resp.get_json()["recovered"] == 1
            wait_until(lambda: [r for r in receiver.received("/a") if r.status == 200
                                and r.json()["id"] == recent.id], what="event 5 recovered")
            still = web("GET", failed).get_json()["deliveries"]
            assert [d["event_id"] for d in still] == [old.id]
            assert web("POST", f"/api/v1/subscriptions/{a}/recover", {}).status_code == 400

            # replay to a new subscriber: every event of the app, original ids, nobody else touched
            b, _ = log.subscribe(51, receiver.url("/b"), ["deployed"])
            wait_until(lambda: web("GET", f"/api/v1/subscriptions/{b}").status_code == 200, what="subscriber b")
            before = len(receiver.received("/a"))
            assert web("POST", f"/api/v1/subscriptions/{b}/replay", {}).status_code == 400
            assert web("POST", f"/api/v1/subscriptions/{b}/replay",
                       {"since_sequence": 1, "since_time": "2020-01-01T00:00:00Z"}).status_code == 400
            resp = web("POST", f"/api/v1/subscriptions/{b}/replay", {"since_sequence": 1})
            assert resp.status_code == 202
            job = resp.headers["Location"]
            done = wait_until(lambda: (r := web("GET", job).get_json())["status"] == "done" and r, what="replay")
            assert done["queued"] == 5
            wait_until(lambda: len(receiver.received("/b")) == 5, what="five replayed deliveries")
            replayed = [r.json()["id"] for r in receiver.received("/b")]
            all_ids = [e.id for e in envs] + [old.id, recent.id]
            assert replayed == all_ids, "original event ids, in order"
            # a replay from a time: only events at or after it
            c, _ = log.subscribe(51, receiver.url("/c"), ["deployed"])
            wait_until(lambda: web("GET", f"/api/v1/subscriptions/{c}").status_code == 200, what="subscriber c")
            resp = web("POST", f"/api/v1/subscriptions/{c}/replay", {"since_time": envs[2].time})
            wait_until(lambda: web("GET", resp.headers["Location"]).get_json()["status"] == "done", what="replay")
            wait_until(lambda: len(receiver.received("/c")) == 3, what="three replayed from a time")
            assert [r.json()["id"] for r in receiver.received("/c")] == [envs[2].id, old.id, recent.id]
            theirs = web("GET", f"/api/v1/subscriptions/{a}/deliveries").get_json()["deliveries"]
            assert len(theirs) == 5 and {d["origin"] for d in theirs} == {"live"}, "other subscribers untouched"
            assert len(receiver.received("/a")) == before
    finally:
        receiver.close()


def test_cli_talks_to_the_api(settings, monkeypatch, capsys):
    from werkzeug.serving import make_server

    app = create_app(settings)
    server = make_server(settings.http_host, settings.http_port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for key, value in settings.env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(argv)
        code = args.func(args)
        return code, capsys.readouterr().out

    try:
        code, out = run("subscriptions", "create", "61", "http://127.0.0.1:9/hook", "--events", "deployed,build_finish")
        assert code == 0 and '"secret": "whsec_' in out
        code, out = run("subscriptions", "list", "61")
        assert code == 0 and '"subscriptions"' in out
        code, out = run("deliveries", "redeliver", "00000000-0000-0000-0000-000000000000")
        assert code == 1 and "no such delivery" in out
        code, out = run("replay", "missing", "--since-sequence", "1")
        assert code == 1 and "no such subscription" in out
        code, out = run("subscriptions", "rotate", "missing")
        assert code == 1
        ((_, env),) = inbound(settings, 1)
        assert env.data.app_id == 61 and env.data.events == ["deployed", "build_finish"]
    finally:
        server.shutdown()
        app.extensions["shipline"].pool.close()
