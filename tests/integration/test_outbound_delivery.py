"""The dispatcher on the real broker and database, delivering to a real local HTTP receiver."""

from __future__ import annotations

import hashlib
import hmac
import threading
from typing import Any

import psycopg
import pytest
import standardwebhooks

from outbound import signing
from outbound.testing import EventLog, Received, Receiver, Running, wait_until
from shipline import codec
from shipline.config import load
from shipline.messages import BuildFinished, BuildQueued, Deployed, SubscriptionUpdated
from tests.integration.test_outbound_api import inbound

pytestmark = pytest.mark.integration


def tuned(settings: Any, **env: str) -> Any:
    return load({**settings.env, **env})


def rows(settings: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.db_url) as conn:
        return conn.execute(query.replace("{s}", settings.schema("outbound")), params).fetchall()


def deployed(app_id: int, revision: int) -> Deployed:
    return Deployed(app_id=app_id, revision=revision, image=f"app{app_id}:r{revision}", commit="c" * 40,
                    instances=["i1"], duration=1.5, url="http://127.0.0.1:8000")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_signed_deliveries_verify_with_standardwebhooks_and_hex_hmac_also_during_rotation(settings, receiver):
    log = EventLog(settings)
    sid, secret = log.subscribe(7, receiver.url(), ["build_finish", "deployed"])
    with Running(settings):
        queued, finished, dep = log.emit(
            BuildQueued(app_id=7, build=14, commit="88d543e3", message="Revert test commit", author="grosskur",
                        ref="refs/heads/main", delivery_id="d-1", repo_url="https://github.com/grosskur/docker-hello"),
            BuildFinished(app_id=7, build=14, commit="88d543e3", status="succeeded", exit_code=0, image_id="4cdd98",
                          tags=["shipline.local/grosskur/docker-hello:latest"], duration=200.0, log="", log_path=""),
            deployed(7, 1),
        )
        got = wait_until(lambda: len(receiver.received()) >= 2 and receiver.received(), what="two deliveries")
        assert [r.headers["x-shipline-event"] for r in got] == ["build_finish", "deployed"]
        for req in got:
            h = req.headers
            assert h["content-type"] == "application/json"
            assert h["user-agent"].startswith("Shipline-Hookshot/")
            assert standardwebhooks.Webhook(secret).verify(req.body, h)
            expected = hmac.new(secret.encode(), req.body, hashlib.sha256).hexdigest()
            assert h["x-shipline-signature"] == f"sha256={expected}"
            assert h["webhook-id"] == h["x-shipline-delivery"]
        shipway = got[0].json()
        assert set(shipway) == {"build", "commit", "image_tags", "images", "repository"}
        assert shipway["build"]["build_num"] == 14 and shipway["build"]["status"] == "succeeded"
        assert set(shipway["build"]) == {"build_num", "created_at", "dockerfile_dir", "exit_code", "status",
                                         "finished_at", "updated_at"}
        assert shipway["commit"] == {"author": {"login": "grosskur", "name": "grosskur"},
                                     "message": "Revert test commit", "sha": "88d543e3"}
        assert shipway["image_tags"] == [{"full_name": "shipline.local/grosskur/docker-hello:latest",
                                          "id": "4cdd98", "name": "latest"}]
        assert shipway["images"] == [{"id": "4cdd98", "pushed": False}]
        assert shipway["repository"]["clone_url"] == "https://github.com/grosskur/docker-hello.git"
        assert shipway["repository"]["owner"]["login"] == "grosskur"
        assert got[0].headers["x-shipline-event-id"] == finished.id
        assert got[1].json() == codec.to_dict(dep)
        assert got[1].json()["id"] == dep.id

        # rotation: the next delivery verifies with the new secret and with the old one
        new_secret = signing.generate()
        log.emit(SubscriptionUpdated(app_id=7, subscription_id=sid, changes={
            "secret_encrypted": signing.encrypt(settings.secret_key, new_secret)}))
        log.emit(deployed(7, 2))
        third = wait_until(lambda: len(receiver.received()) >= 3 and receiver.received()[2], what="third delivery")
        assert len(third.headers["webhook-signature"].split(" ")) == 2
        assert standardwebhooks.Webhook(new_secret).verify(third.body, third.headers)
        assert standardwebhooks.Webhook(secret).verify(third.body, third.headers)
        assert third.headers["x-shipline-signature"] == "sha256=" + hmac.new(
            new_secret.encode(), third.body, hashlib.sha256).hexdigest()
        assert third.headers["x-shipline-signature-previous"] == "sha256=" + hmac.new(
            secret.encode(), third.body, hashlib.sha256).hexdigest()
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(signing.generate()).verify(third.body, third.headers)


def _attempts(settings: Any, sid: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for did, started, dur, status, outcome, nxt, delay in rows(
        settings,
        "SELECT delivery_id::text, extract(epoch FROM started_at)::float8, duration_ms, status_code, outcome,"
        " extract(epoch FROM next_attempt_at)::float8, delay FROM {s}.attempts WHERE subscription_id = %s ORDER BY id",
        sid,
    ):
        out.setdefault(did, []).append({"started": started, "duration": dur / 1000, "status": status,
                                        "outcome": outcome, "next": nxt, "delay": delay})
    return out


def test_retry_schedule_with_jitter_is_followed_and_retry_after_is_honoured(settings):
    schedule = (1.0, 2.0, 4.0)
    fails: dict[str, int] = {}

    def policy(req: Received) -> tuple[int, dict[str, str], bytes]:
        n = fails.get(req.delivery, 0)
        fails[req.delivery] = n + 1
        if req.path == "/later" and n == 0:
            return 503, {"Retry-After": "1"}, b"busy"
        if req.path == "/flaky" and n < 3:
            return 500, {}, b"x" * 30000  # the logged body is cut at 20 KB
        return 200, {}, b"ok"

    receiver = Receiver(policy)
    try:
        s = tuned(settings, SHIPLINE_RETRY_SCHEDULE="1,2,4", SHIPLINE_RETRY_SCALE="0.05")
        log = EventLog(s)
        flaky, _ = log.subscribe(1, receiver.url("/flaky"), ["deployed"])
        later, _ = log.subscribe(2, receiver.url("/later"), ["deployed"])
        with Running(s):
            log.emit(*[deployed(1, r) for r in range(1, 6)], deployed(2, 1))
            wait_until(lambda: len(receiver.received("/flaky")) >= 20 and len(receiver.received("/later")) >= 2,
                       what="every retry")
            wait_until(lambda: rows(s, "SELECT count(*) FROM {s}.deliveries WHERE status = 'succeeded'")[0][0] == 6,
                       what="six deliveries recorded as succeeded")
        delays = []
        for attempts in _attempts(s, flaky).values():
            assert [a["outcome"] for a in attempts] == ["retry", "retry", "retry", "succeeded"]
            assert [a["status"] for a in attempts] == [500, 500, 500, 200]
            for i, (prev, nxt) in enumerate(zip(attempts, attempts[1:], strict=False)):
                nominal = schedule[i] * 0.05
                assert 0.8 * nominal - 1e-6 <= prev["delay"] <= 1.2 * nominal + 1e-6
                failed_at = prev["started"] + prev["duration"]
                assert failed_at + prev["delay"] - 0.002 <= prev["next"] <= failed_at + prev["delay"] + 10
                assert nxt["started"] >= prev["next"] - 0.002, "an attempt went out before its time"
                delays.append(prev["delay"] / nominal)
        assert len({round(d, 4) for d in delays}) > 3, "delays are jittered, not the bare schedule"
        body = rows(s, "SELECT response_body FROM {s}.attempts WHERE status_code = 500 LIMIT 1")[0][0]
        assert len(body) == 20 * 1024
        (attempts,) = _attempts(s, later).values()
        assert [a["status"] for a in attempts] == [503, 200]
        assert attempts[0]["delay"] >= 1.0
        assert attempts[1]["started"] - attempts[0]["started"] >= 1.0
        first, second = receiver.received("/later")
        assert second.at - first.at >= 1.0
        assert first.delivery == second.delivery
    finally:
        receiver.close()


def _reports(settings: Any, count: int) -> list[Any]:
    """The dispatcher's reports, read from streams' input topic (where requests are too)."""
    return [env for _, env in inbound(settings, count, timeout=60, types=frozenset({"subscription.disabled"}))]


def _subscription(settings: Any, sid: str) -> tuple[Any, ...]:
    """(enabled, disabled_reason, disable_reported); (True, None, True) until the row exists."""
    found = rows(settings, "SELECT enabled, disabled_reason, disable_reported FROM {s}.subscriptions"
                 " WHERE id = %s", sid)
    return found[0] if found else (True, None, True)


def test_410_disables_the_subscription_and_reports_it(settings):
    receiver = Receiver(lambda req: (410, {}, b"gone") if req.path == "/gone" else (200, {}, b"ok"))
    try:
        log = EventLog(settings)
        gone, _ = log.subscribe(3, receiver.url("/gone"), ["deployed"])
        other, _ = log.subscribe(3, receiver.url("/other"), ["deployed"])
        with Running(settings):
            log.emit(deployed(3, 1))
            wait_until(lambda: not _subscription(settings, gone)[0], what="subscription disabled")
            log.emit(deployed(3, 2), deployed(3, 3))
            wait_until(lambda: len(receiver.received("/other")) == 3, what="the other subscription's deliveries")
            (report,) = _reports(settings, 1)
            assert report.type == "subscription.disabled" and report.sequence is None
            assert report.data.subscription_id == gone and "410" in report.data.reason
            wait_until(lambda: _subscription(settings, gone)[2], what="disable marked reported")
        assert len(receiver.received("/gone")) == 1, "nothing is sent to a disabled subscription"
        statuses = rows(settings, "SELECT status, count(*) FROM {s}.deliveries WHERE subscription_id = %s"
                        " GROUP BY 1", gone)
        assert dict(statuses) == {"failed": 3}
    finally:
        receiver.close()


def test_a_subscription_failing_for_the_whole_window_is_disabled(settings):
    receiver = Receiver(lambda req: (500, {}, b"down"))
    try:
        s = tuned(settings, SHIPLINE_RETRY_SCHEDULE=",".join(["0.2"] * 40), SHIPLINE_OUTBOUND_DISABLE_AFTER="1.5")
        log = EventLog(s)
        sid, _ = log.subscribe(4, receiver.url(), ["deployed"])
        with Running(s):
            log.emit(deployed(4, 1), deployed(4, 2))
            wait_until(lambda: not _subscription(s, sid)[0], what="auto-disable")
            (report,) = _reports(s, 1)
            assert report.data.subscription_id == sid and "failing without a success since" in report.data.reason
        first = receiver.received()[0].at
        last = receiver.received()[-1].at
        assert last - first >= 1.5 * 0.95, "disabled only once the window has passed"
        assert len(receiver.received()) >= 3
        assert dict(rows(s, "SELECT status, count(*) FROM {s}.deliveries GROUP BY 1")) == {"failed": 2}
    finally:
        receiver.close()


def test_order_per_app_holds_under_random_failures(settings):
    import random

    rng = random.Random(7)
    lock = threading.Lock()

    def policy(req: Received) -> tuple[int, dict[str, str], bytes]:
        with lock:
            fail = rng.random() < 0.5
        return (500, {}, b"no") if fail else (200, {}, b"ok")

    receiver = Receiver(policy)
    try:
        s = tuned(settings, SHIPLINE_RETRY_SCHEDULE=",".join(["0.01"] * 30))
        log = EventLog(s)
        apps = [11, 12, 13]
        for app in apps:
            log.subscribe(app, receiver.url(f"/app{app}"), ["deployed"])
        with Running(s):
            for r in range(1, 11):
                log.emit(*[deployed(app, r) for app in apps])
            wait_until(lambda: sum(1 for q in receiver.received() if q.status == 200) >= 30, what="30 successes")
        for app in apps:
            reqs = receiver.received(f"/app{app}")
            revisions = [q.json()["data"]["revision"] for q in reqs]
            succeeded = [q.json()["data"]["revision"] for q in reqs if q.status == 200]
            assert succeeded == list(range(1, 11))
            assert revisions == sorted(revisions), "event n+1 is never sent before event n succeeded"
            for i, q in enumerate(reqs):
                if q.status == 200:
                    assert revisions[i] not in revisions[i + 1:], "a delivery was sent after its success"
            by_rev: dict[int, list[Received]] = {}
            for q in reqs:
                by_rev.setdefault(q.json()["data"]["revision"], []).append(q)
            for rev in range(1, 10):
                ok = [q for q in by_rev[rev] if q.status == 200][0]
                assert min(q.at for q in by_rev[rev + 1]) >= ok.done_at
    finally:
        receiver.close()


def test_a_hanging_endpoint_delays_nobody_else(settings):
    release = threading.Event()
    active = {"now": 0, "max": 0}
    lock = threading.Lock()

    def policy(req: Received) -> tuple[int, dict[str, str], bytes]:
        if req.path != "/hang":
            return 200, {}, b"ok"
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        release.wait(120)
        with lock:
            active["now"] -= 1
        return 200, {}, b"late"

    receiver = Receiver(policy)
    try:
        s = tuned(settings, SHIPLINE_OUTBOUND_TIMEOUT="120")
        log = EventLog(s)
        apps = list(range(21, 27))
        for app in apps:
            log.subscribe(app, receiver.url("/hang"), ["deployed"])
            log.subscribe(app, receiver.url("/fine"), ["deployed"])
        with Running(s, workers=6, per_endpoint=2):
            for r in range(1, 4):
                log.emit(*[deployed(app, r) for app in apps])
            # every healthy delivery arrives while the hanging endpoint still holds its requests
            wait_until(lambda: len(receiver.received("/fine")) == 3 * len(apps), what="healthy deliveries")
            assert not release.is_set() and 1 <= active["now"] <= 2
            release.set()
            wait_until(lambda: sum(1 for q in receiver.received("/hang") if q.status == 200) == 3 * len(apps),
                       what="the hanging endpoint's deliveries once it answers")
        assert active["max"] <= 2, "never more than per_endpoint requests to one subscription"
    finally:
        release.set()
        receiver.close()


def test_ssrf_guard_refuses_loopback_without_allow_and_connects_to_the_checked_address(settings):
    receiver = Receiver()
    try:
        s = tuned(settings, SHIPLINE_OUTBOUND_ALLOW="10.0.0.0/8", SHIPLINE_RETRY_SCHEDULE="60")
        log = EventLog(s)
        sid, _ = log.subscribe(31, receiver.url(), ["deployed"])
        with Running(s):
            log.emit(deployed(31, 1))
            errors = wait_until(lambda: rows(s, "SELECT error FROM {s}.attempts WHERE subscription_id = %s", sid),
                                what="a refused attempt")
        assert "loopback" in errors[0][0] and errors[0][0].startswith("refused")
        assert receiver.received() == []
    finally:
        receiver.close()
