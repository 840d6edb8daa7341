"""The console's API client turns each service's JSON into its records; small helpers behave."""

from __future__ import annotations

import pytest

from console import auth
from console.client import Api, ApiError, App, Build, OutboundDelivery, Release, Reply, Timeline, _items
from console.views import image_label

pytestmark = pytest.mark.unit


class Canned:
    """A transport answering from a dict of (method, path) -> (status, doc, headers)."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def request(self, method, path, *, params=None, body=None):
        self.calls.append((method, path, params, body))
        status, doc, *headers = self.answers[(method, path)]
        return Reply(status, doc, headers[0] if headers else {})


def test_lists_bare_or_wrapped() -> None:
    assert _items([{"a": 1}, "x"]) == [{"a": 1}]
    assert _items({"subscriptions": [{"a": 1}]}, "subscriptions") == [{"a": 1}]
    assert _items({"items": [{"a": 2}]}) == [{"a": 2}]
    assert _items({"error": "nope"}) == []


def test_records_from_the_read_api_shapes() -> None:
    app = App.of({"id": 3, "name": "web", "namespace": "default", "url": None, "current_revision": None})
    assert (app.status, app.current_revision) == ("new", None)
    release = Release.of({"revision": 2, "image": "i", "commit": "c", "trigger": "rollback", "status": "failed",
                          "current": False, "failure": {"step": "health", "reason": "timeout"}})
    assert (release.step, release.reason, release.running) == ("health", "timeout", False)
    build = Build.of({"id": "3-1", "number": 1, "status": "running",
                      "commit": {"sha": "abc", "message": "m", "author": "Ann"}})
    assert (build.commit, build.message, build.author, build.running) == ("abc", "m", "Ann", True)
    sent = OutboundDelivery.of({"id": "d1", "subscription_id": "s", "event_name": "build_finish",
                                "event_type": "build.finished", "status": "pending", "attempts": 2,
                                "last_status": 500, "next_attempt_at": "2999-01-01T00:00:00Z"})
    assert (sent.event_type, sent.last_status_code, sent.moving) == ("build_finish", 500, False)


def test_timeline_groups_stages_in_causal_order() -> None:
    api = Api(Canned({("GET", "/api/v1/audit"): (200, {
        "correlation_id": "d1",
        "events": [{"type": "deployed", "app_id": 1}, {"type": "delivery.accepted", "app_id": 1},
                   {"type": "build.queued", "app_id": 1}],
        "outbound": [{"id": "o1", "event_name": "deployed", "status": "succeeded", "attempts": 1}],
    })}))
    chain = api.timeline("d1")
    assert [stage for stage, _ in chain.stages()] == ["received", "build", "deploy"]
    assert chain.app_ids == [1] and chain.outbound[0].id == "o1"
    assert isinstance(chain, Timeline)


def test_errors_and_write_positions() -> None:
    api = Api(Canned({
        ("GET", "/api/v1/apps/9"): (404, {"error": "app 9 not found"}),
        ("DELETE", "/api/v1/deploy-hooks/h"): (204, None, {"X-Request-Id": "r1", "X-Shipline-Position": "t:0:5"}),
    }))
    with pytest.raises(ApiError) as err:
        api.app(9)
    assert (err.value.status, err.value.message) == (404, "app 9 not found")
    written = api.delete_deploy_hook("h")
    assert (written.request_id, written.position) == ("r1", "t:0:5")


def test_deleted_hooks_are_not_listed() -> None:
    api = Api(Canned({("GET", "/api/v1/apps/1/deploy-hooks"): (200, [
        {"id": "a", "name": "ci", "deleted": False}, {"id": "b", "name": "old", "deleted": True}])}))
    assert [h.id for h in api.deploy_hooks(1)] == ["a"]


def test_helpers() -> None:
    assert image_label("process:/var/lib/shipline/releases/1/1-abc") == "process:…/1-abc"
    assert image_label("registry.example.com/acme/shop:v1") == "registry.example.com/acme/shop:v1"
    assert len(image_label("r" * 100)) == 48
    assert auth.safe_next("/console/apps/1") == "/console/apps/1"
    for bad in ("https://evil.example/", "//evil.example/console", "/api/v1/apps", "/console\\..", None):
        assert auth.safe_next(bad) is None
    assert auth.fingerprint("a", "k") != auth.fingerprint("b", "k")
