"""Outbound pieces without services: signatures, retry policy, SSRF guard, transport, payloads."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import socket
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import standardwebhooks
from cryptography.fernet import Fernet

from outbound import events, ingest, payloads, retry, signing, ssrf
from outbound.options import Options
from outbound.replay import LogJoins
from outbound.testing import Receiver
from outbound.transport import Transport
from shipline.envelope import wrap
from shipline.messages import BuildFinished, BuildQueued, DeliveryAccepted

pytestmark = pytest.mark.unit

OPTS = Options(timeout=10, schedule=(5.0, 300.0, 1800.0), rotation=86400, disable_after=5 * 86400)


# ------------------------------------------------------------------------------------ signing


def test_generated_secrets_are_standard_webhooks_secrets() -> None:
    secret = signing.generate()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
    assert signing.generate() != secret
    assert signing.validate(secret) == secret


@pytest.mark.parametrize("bad", ["short", "x" * 300, "has space 123", "a,b,c,d,e,f", "whsec_!!notbase64!!", 42, None])
def test_bad_secrets_are_refused(bad) -> None:
    with pytest.raises(ValueError):
        signing.validate(bad)


@pytest.mark.parametrize("secret", [signing.generate(), "plain-github-style-secret"])
def test_signatures_verify_with_the_official_library_and_hex_hmac(secret: str) -> None:
    body = json.dumps({"hello": "wörld"}, ensure_ascii=False).encode()
    h = signing.headers(delivery_id="6c1d0b8e-0000-4000-8000-000000000001", event="deployed", body=body,
                        secrets=[secret], timestamp=int(time.time()))
    verifier = standardwebhooks.Webhook(secret if secret.startswith("whsec_") else secret.encode())
    assert verifier.verify(body, h) == {"hello": "wörld"}
    assert h["X-Shipline-Signature"] == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert h["webhook-id"] == h["X-Shipline-Delivery"]
    assert h["User-Agent"].startswith("Shipline-Hookshot/") and h["Content-Type"] == "application/json"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verifier.verify(body + b" ", h)


def test_during_rotation_both_secrets_sign() -> None:
    old, new = signing.generate(), signing.generate()
    body = b'{"a":1}'
    h = signing.headers(delivery_id="d", event="deployed", body=body, secrets=[new, old], timestamp=int(time.time()))
    assert len(h["webhook-signature"].split(" ")) == 2
    standardwebhooks.Webhook(new).verify(body, h)
    standardwebhooks.Webhook(old).verify(body, h)
    assert h["X-Shipline-Signature-Previous"] == "sha256=" + hmac.new(old.encode(), body, hashlib.sha256).hexdigest()


def test_secrets_are_encrypted_with_the_fernet_key() -> None:
    key = Fernet.generate_key().decode()
    token = signing.encrypt(key, "whsec_abc")
    assert "whsec_abc" not in token and signing.decrypt(key, token) == "whsec_abc"
    with pytest.raises(ValueError):
        signing.decrypt(Fernet.generate_key().decode(), token)


# ------------------------------------------------------------------------------------ retry policy


def test_delays_follow_the_schedule_with_twenty_percent_jitter() -> None:
    rng = random.Random(1)
    for tries, nominal in enumerate(OPTS.schedule, start=1):
        samples = [retry.delay_for(tries, OPTS, rng) for _ in range(500)]
        assert all(0.8 * nominal <= d <= 1.2 * nominal for d in samples)
        assert min(samples) < 0.85 * nominal and max(samples) > 1.15 * nominal  # actually jittered
    assert retry.delay_for(len(OPTS.schedule) + 1, OPTS, rng) is None


def test_retry_after_is_honoured_in_seconds_and_as_a_date() -> None:
    rng = random.Random(2)
    now = time.time()
    assert retry.parse_retry_after("120", now) == 120
    when = datetime.now(UTC) + timedelta(seconds=600)
    assert 590 <= retry.parse_retry_after(format_datetime(when, usegmt=True), now) <= 601
    assert retry.parse_retry_after("soon", now) is None
    assert retry.delay_for(1, OPTS, rng, retry_after=120) == 120
    assert retry.delay_for(1, OPTS, rng, retry_after=1) <= 6  # never shorter than the schedule
    assert retry.delay_for(1, OPTS, rng, retry_after=10**9) == OPTS.max_retry_after


def decide(status, tries=1, failing_since=None, retry_after=None, now=1000.0):
    return retry.decide(status=status, retry_after=retry_after, tries=tries, failing_since=failing_since, now=now,
                        opts=OPTS, rng=random.Random(3))


def test_outcomes() -> None:
    assert isinstance(decide(200), retry.Succeeded) and isinstance(decide(204), retry.Succeeded)
    for status in (None, 301, 302, 400, 404, 429, 500, 503):
        assert isinstance(decide(status), retry.Retry), status  # 3xx is a failure, not followed
    assert isinstance(decide(410), retry.Disable)
    assert isinstance(decide(500, tries=4), retry.GaveUp)
    assert isinstance(decide(500, failing_since=1000.0 - 5 * 86400), retry.Disable)
    assert isinstance(decide(500, failing_since=1000.0 - 5 * 86400 + 1), retry.Retry)
    r = decide(503, retry_after="60")
    assert isinstance(r, retry.Retry) and r.at == 1060.0


# ------------------------------------------------------------------------------------ SSRF guard


@pytest.mark.parametrize("ip,reason", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.10", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("240.0.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("100.64.0.1", "non-global"), ("fc00::1", "private"),
    ("93.184.216.34", None), ("2606:4700::1111", None),
])
def test_addresses_are_classified(ip: str, reason: str | None) -> None:
    import ipaddress

    assert ssrf.why_forbidden(ipaddress.ip_address(ip)) == reason


def fake_resolver(table: dict[str, list[str]]):
    def resolve(host, port, type=0):  # noqa: A002
        if host not in table:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in table[host]]
    return resolve


def test_names_are_checked_after_resolution_and_pinned_to_the_checked_address() -> None:
    resolver = fake_resolver({"evil.example": ["10.0.0.5"], "mixed.example": ["93.184.216.34", "127.0.0.1"],
                              "good.example": ["93.184.216.34"], "lan.example": ["10.9.8.7"]})
    with pytest.raises(ssrf.Refused, match="private"):
        ssrf.resolve("http://evil.example/x", (), resolver)
    with pytest.raises(ssrf.Refused, match="loopback"):
        ssrf.resolve("https://mixed.example/x", (), resolver)
    with pytest.raises(ssrf.Refused, match="cannot resolve"):
        ssrf.resolve("https://missing.example/x", (), resolver)
    target = ssrf.resolve("https://good.example/hook?a=1", (), resolver)
    assert (target.ip, target.port, target.path, target.host_header) == ("93.184.216.34", 443, "/hook?a=1",
                                                                         "good.example")
    allowed = ssrf.resolve("http://lan.example:8080/", ssrf.parse_networks(["10.0.0.0/8"]), resolver)
    assert allowed.ip == "10.9.8.7" and allowed.host_header == "lan.example:8080"
    with pytest.raises(ssrf.Refused, match="loopback"):
        ssrf.resolve("http://127.0.0.1:1/", ssrf.parse_networks(["10.0.0.0/8"]))


@pytest.mark.parametrize("url", ["ftp://x/", "http:///nohost", "http://user:pw@host/", "http://h/#frag",
                                 "http://h:99999/", "x" * 3000, 5])
def test_subscription_urls_are_checked(url) -> None:
    with pytest.raises(ValueError):
        ssrf.check_url(url)


# ------------------------------------------------------------------------------------ transport


def test_transport_connects_to_the_checked_address_and_does_not_follow_redirects() -> None:
    def policy(req):
        if req.path == "/redirect":
            return 302, {"Location": "/elsewhere"}, b""
        if req.path == "/slow":
            time.sleep(1.5)
        return 200, {"Retry-After": "3"}, b"x" * 30000

    receiver = Receiver(policy)
    try:
        resolver = fake_resolver({"hooks.example.test": ["127.0.0.1"]})
        t = Transport(ssrf.parse_networks(["127.0.0.1/32"]), resolver)
        url = f"http://hooks.example.test:{receiver.port}"
        resp = t.post(url + "/ok", b"{}", {"Content-Type": "application/json"}, 10)
        assert resp.status == 200 and len(resp.body) == 20 * 1024 and resp.headers["retry-after"] == "3"
        assert receiver.received()[0].headers["host"] == f"hooks.example.test:{receiver.port}"
        again = t.post(url + "/ok", b"{}", {}, 10)
        assert again.ok
        resp = t.post(url + "/redirect", b"{}", {}, 10)
        assert resp.status == 302 and not resp.ok
        assert [r.path for r in receiver.received()] == ["/ok", "/ok", "/redirect"]
        resp = t.post(url + "/slow", b"{}", {}, 0.3)
        assert resp.status is None and resp.error == "timed out"
        refused = Transport((), resolver).post(url + "/ok", b"{}", {}, 10)
        assert refused.status is None and refused.error.startswith("refused") and "loopback" in refused.error
        t.close()
        assert t.post(url + "/ok", b"{}", {}, 10).status is None
    finally:
        receiver.close()


def test_close_cuts_a_request_in_flight() -> None:
    release = threading.Event()
    receiver = Receiver(lambda req: (release.wait(30), (200, {}, b"ok"))[1])
    try:
        t = Transport(ssrf.parse_networks(["127.0.0.1/32"]))
        result = []
        worker = threading.Thread(target=lambda: result.append(t.post(receiver.url(), b"{}", {}, 30)))
        worker.start()
        deadline = time.monotonic() + 30
        while not receiver.received() and time.monotonic() < deadline:
            time.sleep(0.01)
        t.close()
        worker.join(10)
        assert not worker.is_alive() and result[0].status is None
    finally:
        release.set()
        receiver.close()


# ------------------------------------------------------------------------------------ events, payloads


def test_event_filters() -> None:
    assert events.matches(["*"], "deployed")
    assert events.matches(["build_finish"], "build.finished") and events.matches(["build.finished"], "build.finished")
    assert not events.matches(["deployed"], "build.finished")
    for internal in ("subscription.created", "delivery.accepted", "deploy_hook.created", "webhook_token.enabled"):
        assert not events.matches(["*"], internal)
    assert events.wire_name("build.finished") == "build_finish" and events.wire_name("deployed") == "deployed"
    assert events.normalise(["deployed", "deployed", "build_finish"]) == ["deployed", "build_finish"]
    for bad in ([], ["nope"], ["subscription.created"], [1]):
        with pytest.raises(ValueError):
            events.normalise(bad)


def test_build_finish_joins_the_queued_build_the_app_and_the_github_push() -> None:
    push_body = json.dumps({
        "repository": {"id": 27844253, "name": "docker-hello", "clone_url": "https://github.com/grosskur/docker-hello.git",
                       "owner": {"id": 40483, "login": "grosskur"}},
        "head_commit": {"author": {"name": "Alan Grosskurth", "username": "grosskur"}},
    })
    repository, author = payloads.github_push(push_body, "utf8", {"Content-Type": "application/json"})
    form = "payload=" + __import__("urllib.parse").parse.quote(push_body)
    assert payloads.github_push(form, "utf8", {"content-type": "application/x-www-form-urlencoded"}) == (
        repository, author)
    assert payloads.github_push(base64.b64encode(b"not json").decode(), "base64", {}) is None
    env = wrap(BuildFinished(app_id=3, build=14, commit="88d543e", status="succeeded", exit_code=0,
                             image_id="4cdd98", tags=["registry:5000/grosskur/docker-hello:latest", "img"],
                             duration=1.0, log="", log_path=""), source="t", time="2014-12-18T10:47:42.123456Z")
    doc = payloads.build_finish(env, {
        "build": {"message": "Revert test commit", "author": "grosskur", "repo_url": "https://github.com/grosskur/docker-hello",
                  "queued_at": "2014-12-18T10:44:22.5Z"},
        "app": {"name": "hello", "namespace": "ns", "build": {"dockerfile": "docker/app/Dockerfile"}},
        "push": {"repository": repository, "author": author},
    })
    assert doc == {
        "build": {"build_num": 14, "created_at": "2014-12-18T10:44:22+00:00", "dockerfile_dir": "/docker/app",
                  "exit_code": 0, "status": "succeeded", "finished_at": "2014-12-18T10:47:42+00:00",
                  "updated_at": "2014-12-18T10:47:42+00:00"},
        "commit": {"author": {"login": "grosskur", "name": "Alan Grosskurth"}, "message": "Revert test commit",
                   "sha": "88d543e"},
        "image_tags": [{"full_name": "registry:5000/grosskur/docker-hello:latest", "id": "4cdd98", "name": "latest"},
                       {"full_name": "img", "id": "4cdd98", "name": "latest"}],
        "images": [{"id": "4cdd98", "pushed": False}],
        "repository": {"clone_url": "https://github.com/grosskur/docker-hello.git", "id": 27844253,
                       "name": "docker-hello", "owner": {"id": 40483, "login": "grosskur"}},
    }
    bare = payloads.build_finish(env, {})
    assert bare["repository"] == {"clone_url": None, "id": None, "name": None, "owner": {"id": None, "login": None}}
    assert bare["build"]["dockerfile_dir"] == "/" and bare["commit"]["message"] is None
    # the push was pruned (SHIPLINE_OUTBOUND_KEEP_DAYS) but the build row and the app are still there
    no_push = payloads.build_finish(env, {
        "build": {"message": "Revert test commit", "author": "grosskur", "repo_url": "https://github.com/grosskur/docker-hello",
                  "queued_at": "2014-12-18T10:44:22.5Z"},
        "app": {"name": "hello", "namespace": "ns"},
        "push": None,
    })
    assert no_push["commit"] == {"author": {"login": "grosskur", "name": "grosskur"}, "message": "Revert test commit",
                                 "sha": "88d543e"}
    assert no_push["repository"] == {"clone_url": "https://github.com/grosskur/docker-hello.git", "id": None,
                                     "name": "docker-hello", "owner": {"id": None, "login": "grosskur"}}
    # both pruned: what Store.build_context returns then
    gone = payloads.build_finish(env, {"build": None, "app": None, "push": None})
    assert gone == bare and gone["build"]["created_at"] == "2014-12-18T10:47:42+00:00"


# ------------------------------------------------------------------------------------ retention


class PruneStore:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[float] = []
        self.fail = fail
        self.pruned = threading.Event()

    def prune(self, days: float, batch: int = 10_000) -> dict[str, int]:
        self.calls.append(days)
        if len(self.calls) >= 3:
            self.pruned.set()
        if self.fail:
            raise OSError("server closed the connection")
        return {"pushes": 2, "builds": 0}


def test_the_pruner_runs_soon_after_start_then_periodically_survives_errors_and_stops(caplog) -> None:
    from outbound.options import from_settings
    from outbound.retention import Pruner
    from shipline.config import load

    opts = from_settings(load({"SHIPLINE_OUTBOUND_KEEP_DAYS": "7"}))
    assert (opts.keep_days, opts.prune_every, opts.prune_first) == (7.0, 3600.0, 60.0)

    stop = threading.Event()
    store = PruneStore()
    pruner = Pruner(store, days=opts.keep_days, stop=stop, every=0.01, first=0.0)
    caplog.set_level("INFO", logger="outbound.retention")
    thread = threading.Thread(target=pruner.run, daemon=True)
    thread.start()
    assert store.pruned.wait(5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and set(store.calls) == {7.0}
    assert "forgot 2 pushes seen more than 7 days ago" in caplog.text

    failing = PruneStore(fail=True)
    stop = threading.Event()
    thread = threading.Thread(target=Pruner(failing, days=1, stop=stop, every=0.01, first=0.0).run, daemon=True)
    thread.start()
    assert failing.pruned.wait(5)  # a failure does not end the thread: the next period tries again
    assert thread.is_alive()
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert "could not forget old pushes and builds: OSError" in caplog.text

    stop = threading.Event()
    idle = PruneStore()
    slow = Pruner(idle, days=30, stop=stop, every=0.01, first=3600.0)
    thread = threading.Thread(target=slow.run, daemon=True)
    thread.start()
    stop.set()  # not due yet: stopping does not prune on the way out
    thread.join(5)
    assert not thread.is_alive() and idle.calls == []


# ------------------------------------------------------------------------------------ replay joins


def _accepted(delivery_id: str, **over: object) -> DeliveryAccepted:
    body = json.dumps({"repository": {"id": 42, "name": "shop", "owner": {"id": 7, "login": "acme"}},
                       "head_commit": {"author": {"name": "Ada", "username": "ada"}}})
    fields: dict[str, object] = dict(
        app_id=5, delivery_id=delivery_id, source="github", route="/github", event="push", verification="signed",
        received_at="2026-01-01T00:00:00Z", outcome="queued", reason="", headers={"Content-Type": "application/json"},
        body=body, body_encoding="utf8")
    fields.update(over)
    return DeliveryAccepted(**fields)  # type: ignore[arg-type]


def _build_queued(build: int, delivery_id: str) -> BuildQueued:
    return BuildQueued(app_id=5, build=build, commit="c" * 40, message=f"build {build}", author="ada",
                       ref="refs/heads/main", delivery_id=delivery_id, repo_url="https://github.com/acme/shop")


def _build_finished(build: int) -> BuildFinished:
    return BuildFinished(app_id=5, build=build, commit="c" * 40, status="succeeded", exit_code=0, image_id="img",
                         tags=[], duration=1.0, log="", log_path="")


def test_a_replay_joins_the_push_and_build_queued_it_read_and_forgets_them_when_the_build_finished() -> None:
    joins = LogJoins()
    push, queued = wrap(_accepted("d-1"), source="t"), wrap(_build_queued(1, "d-1"), source="t")
    assert joins.see(push) == (None, None) and joins.see(queued) == (None, None)
    assert joins.see(wrap(_build_finished(2), source="t")) == (None, None)  # not read: the store's rows
    build, pushed = joins.see(wrap(_build_finished(1), source="t"))
    # the rows the live path saves, from the same functions
    assert build == ingest.queued_build(queued) and build["queued_at"] == queued.time
    found = ingest.pushed(push)
    assert found is not None and pushed == {"repository": found[1], "author": found[2]}
    assert pushed["author"] == {"login": "ada", "name": "Ada"}
    assert not joins.pushes and not joins.builds  # handled: forgotten
    assert joins.see(wrap(_build_finished(1), source="t")) == (None, None)

    # only what the live path keeps: queued GitHub pushes with a readable body; the first one wins
    for other in (_accepted("x", outcome="ignored"), _accepted("y", source="shipyard"), _accepted("z", body="{")):
        joins.see(wrap(other, source="t"))
    assert not joins.pushes
    joins.see(wrap(_build_queued(3, "d-3"), source="t"))
    joins.see(wrap(replace(_build_queued(3, "d-3"), message="again"), source="t"))
    assert joins.builds[3]["message"] == "build 3"


def test_replay_joins_keep_at_most_limit_entries_and_forget_the_oldest() -> None:
    joins = LogJoins(limit=3)
    for n in range(1, 6):  # five pushes queue five builds, none finishes yet
        joins.see(wrap(_accepted(f"d-{n}"), source="t"))
        joins.see(wrap(_build_queued(n, f"d-{n}"), source="t"))
    assert list(joins.builds) == [3, 4, 5] and list(joins.pushes) == ["d-3", "d-4", "d-5"]
    assert joins.dropped == 4  # two builds and two pushes
    assert joins.see(wrap(_build_finished(1), source="t")) == (None, None)  # forgotten: the store's rows
    build, push = joins.see(wrap(_build_finished(4), source="t"))
    assert build is not None and build["message"] == "build 4" and push is not None
    assert list(joins.builds) == [3, 5] and list(joins.pushes) == ["d-3", "d-5"]
    for n in range(6, 10_006):  # a huge log of builds that never finish stays within the limit
        joins.see(wrap(_build_queued(n, f"d-{n}"), source="t"))
        assert len(joins.builds) <= 3
    assert list(joins.builds) == [10_003, 10_004, 10_005]
