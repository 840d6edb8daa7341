"""The live projector on the real broker and database: every table, duplicates, poison records."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from projections.schema import checksum
from shipline import codec
from shipline import messages as m
from shipline.envelope import derive_id, wrap
from tests.integration.test_projections_kit import (
    Story,
    iso,
    produce,
    produce_raw,
    projector,
    read_topic,
    rows,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


def full_story() -> Story:
    """Two apps through every event type the projector folds."""
    s = Story()
    s.register(1, "shop", request_id="req-register-1")
    s.emit(m.WebhookTokenEnabled(app_id=1, token_hash="h" * 64, token_prefix="whk_abcd"), correlation="req-wh")
    s.emit(m.DeployHookCreated(app_id=1, hook_id="hook-1", name="ci", token_hash="d" * 64, token_prefix="dh_1234"),
           correlation="req-hook")
    # push 1: build 1 succeeds, revision 1 deployed
    s.push_to_deploy(1, 1, 1, "gh-delivery-1", author="ada")
    # push 2: build 2 fails, nothing deployed
    accepted = s.delivery(1, "gh-delivery-2", author="grace")
    s.build(1, 2, "c0ffee" * 6 + "abcd", cause=accepted, ok=False)
    # the same delivery again
    s.emit(m.DeliveryDuplicate(app_id=1, delivery_id="gh-delivery-2", received_at=iso(s.at())),
           correlation="gh-delivery-2")
    # a token-hook delivery marks the webhook as used
    s.delivery(1, "tok-delivery-1", verification="token", source="skipper", event="deploy", outcome="ignored")
    # manual deploy 2 superseded by 3, 3 deployed (1 replaced)
    s.deploy(1, 2, "registry.example.com/x:two", "2" * 40, trigger="manual", correlation="req-deploy-2",
             requested_by="linus", outcome="requested")
    s.deploy(1, 3, "registry.example.com/x:three", "3" * 40, trigger="manual", correlation="req-deploy-3",
             requested_by="linus", outcome="requested")
    s.emit(m.DeploySuperseded(app_id=1, revision=2, superseded_by=3), correlation="req-deploy-3")
    started = s.emit(m.DeployStarted(app_id=1, revision=3, log_path="deploys/3.log"), correlation="req-deploy-3")
    s.emit(m.Deployed(app_id=1, revision=3, image="registry.example.com/x:three", commit="3" * 40,
                      instances=["i-3a", "i-3b"], duration=4.5, url="http://127.0.0.1:8000/shop/"), cause=started)
    # rollback to 1 as revision 4 fails its health check: 3 stays current
    s.deploy(1, 4, "registry.example.com/x:one", "1" * 40, trigger="rollback", correlation="req-rollback",
             requested_by="linus", outcome="failed")
    # a deploy-hook delivery (Shipmight's route) marks the hook as used
    s.emit(m.DeliveryAccepted(app_id=1, delivery_id="dh-delivery-1", source="shipmight", route="/api/v1/dh",
                              event="job", verification="deploy_hook", received_at="2026-02-03T04:05:06.000007Z",
                              outcome="queued", reason="", headers={}, body="{}", body_encoding="utf8",
                              hook_id="hook-1"), correlation="dh-delivery-1")
    job = s.emit(m.JobRequested(app_id=1, job=1, image="registry.example.com/x:three", env={"TASK": "migrate"},
                                cause="hook-1"), correlation="dh-delivery-1")
    s.emit(m.JobFinished(app_id=1, job=1, exit_code=0, log="migrated", duration=1.5), cause=job)
    s.emit(m.SubscriptionCreated(app_id=1, subscription_id="sub-1", url="https://hooks.example.com/a",
                                 events=["deployed"], secret_encrypted="gAAAA-not-kept", description="chat"),
           correlation="req-sub")
    s.emit(m.SubscriptionUpdated(app_id=1, subscription_id="sub-1", changes={"url": "https://hooks.example.com/b"}),
           correlation="req-sub-2")
    s.emit(m.SubscriptionDisabled(app_id=1, subscription_id="sub-1", reason="410 Gone"), correlation="sub-1")
    s.emit(m.SubscriptionCreated(app_id=1, subscription_id="sub-2", url="https://hooks.example.com/c",
                                 events=["*"], secret_encrypted="gAAAA-x", description=""), correlation="req-sub-3")
    s.emit(m.SubscriptionDeleted(app_id=1, subscription_id="sub-2"), correlation="req-sub-4")
    s.emit(m.DeployHookDeleted(app_id=1, hook_id="hook-1"), correlation="req-hook-del")
    s.emit(m.AppUpdated(app_id=1, changes={"branch": "release", "port": 9090, "labels": {"team": "x"}},
                        requested_by="admin"), correlation="req-update")
    s.emit(m.WebhookTokenDisabled(app_id=1), correlation="req-wh-off")
    s.emit(m.RequestRejected(app_id=1, request_type="deploy.request", request_id="req-bad", reason="no revision 9"),
           correlation="req-bad")
    s.register(2, "blog")
    s.push_to_deploy(2, 1, 1, "gh-delivery-3")
    # a deploy still waiting its turn when the app is deleted: it never runs
    s.emit(m.DeployRequested(app_id=2, revision=2, image="registry.example.com/blog:2", commit="c2",
                             trigger="manual", build=None, cause="req-deploy-2"), correlation="req-deploy-2")
    deleted = s.emit(m.AppDeleted(app_id=2, requested_by="admin"), correlation="req-delete-2")
    s.emit(m.AppRetired(app_id=2, stopped=["sl-x-a2-r1-1-ab12"], revision=1, url="http://127.0.0.1:8002"),
           cause=deleted)
    return s


def test_projector_folds_every_table(settings) -> None:
    story = full_story()
    produce(settings, story.envs)
    with projector(settings):
        wait_caught_up(settings)

    apps = {r["app_id"]: r for r in rows(settings, "SELECT * FROM {s}.apps")}
    shop, blog = apps[1], apps[2]
    assert (shop["name"], shop["namespace"], shop["branch"], shop["port"]) == ("shop", "acme", "release", 9090)
    assert shop["extra"] == {"labels": {"team": "x"}}
    assert shop["current_revision"] == 3 and shop["url"] == "http://127.0.0.1:8000/shop/"
    assert shop["deleted"] is False and shop["created_by"] == "admin"
    assert shop["webhook_enabled"] is False and shop["webhook_token_hash"] is None
    assert shop["webhook_last_used_at"] is not None  # the token delivery, while it was enabled
    assert blog["deleted"] is True and blog["current_revision"] is None and blog["deleted_at"] is not None
    assert blog["url"] is None  # deleted and retired: it serves nothing

    hooks = rows(settings, "SELECT * FROM {s}.deploy_hooks")
    assert len(hooks) == 1
    assert hooks[0]["token_hash"] == "d" * 64 and hooks[0]["token_prefix"] == "dh_1234"
    assert hooks[0]["deleted"] is True
    assert iso(hooks[0]["last_used_at"]) == "2026-02-03T04:05:06.000007Z"

    builds = {(r["app_id"], r["number"]): r for r in rows(settings, "SELECT * FROM {s}.builds")}
    ok, failed = builds[(1, 1)], builds[(1, 2)]
    assert ok["status"] == "succeeded" and ok["exit_code"] == 0 and ok["commit_author"] == "Ada Lovelace"
    assert ok["commit_message"] == "change 1" and ok["image"].startswith("registry.example.com/x:")
    assert ok["queued_at"] < ok["started_at"] < ok["finished_at"] and ok["duration"] == 12.5
    assert "building" in ok["log"] and ok["delivery_id"] == "gh-delivery-1" and ok["correlation_id"] == "gh-delivery-1"
    assert failed["status"] == "failed" and failed["exit_code"] == 2 and failed["image"] is None
    assert failed["log"] == "error: tests failed"

    rel = {(r["app_id"], r["revision"]): r for r in rows(settings, "SELECT * FROM {s}.releases")}
    assert rel[(1, 1)]["status"] == "replaced" and rel[(1, 1)]["current"] is False
    assert rel[(1, 1)]["trigger"] == "webhook" and rel[(1, 1)]["build"] == 1
    assert rel[(1, 1)]["live_until"] == rel[(1, 3)]["live_from"]
    assert rel[(1, 2)]["status"] == "superseded" and rel[(1, 2)]["superseded_by"] == 3
    assert rel[(1, 3)]["status"] == "deployed" and rel[(1, 3)]["current"] is True
    assert rel[(1, 3)]["requested_by"] == "linus" and rel[(1, 3)]["instances"] == ["i-3a", "i-3b"]
    assert rel[(1, 3)]["started_at"] is not None and rel[(1, 3)]["finished_at"] is not None
    assert rel[(1, 4)]["status"] == "failed" and rel[(1, 4)]["failed_step"] == "health"
    assert rel[(1, 4)]["trigger"] == "rollback" and rel[(1, 4)]["current"] is False
    assert rel[(2, 1)]["current"] is False and rel[(2, 1)]["live_until"] is not None  # app deleted
    assert rel[(2, 2)]["status"] == "cancelled" and rel[(2, 2)]["finished_at"] is not None  # never ran

    dels = {r["delivery_id"]: r for r in rows(settings, "SELECT * FROM {s}.deliveries")}
    assert set(dels) == {"gh-delivery-1", "gh-delivery-2", "gh-delivery-3", "tok-delivery-1", "dh-delivery-1"}
    assert dels["gh-delivery-2"]["duplicates"] == 1 and dels["gh-delivery-2"]["last_duplicate_at"] is not None
    assert dels["gh-delivery-1"]["outcome"] == "queued" and dels["gh-delivery-1"]["verification"] == "hmac"
    assert json.loads(dels["gh-delivery-1"]["body"])["pusher"]["name"] == "ada"
    assert dels["gh-delivery-1"]["headers"]["X-GitHub-Event"] == "push"
    assert dels["tok-delivery-1"]["outcome"] == "ignored" and dels["tok-delivery-1"]["reason"] == "not a push"

    (job,) = rows(settings, "SELECT * FROM {s}.jobs")
    assert (job["status"], job["exit_code"], job["env"]) == ("succeeded", 0, {"TASK": "migrate"})
    assert job["log"] == "migrated" and job["finished_at"] > job["requested_at"]

    subs = {r["subscription_id"]: r for r in rows(settings, "SELECT * FROM {s}.subscriptions")}
    assert subs["sub-1"]["url"] == "https://hooks.example.com/b" and subs["sub-1"]["status"] == "disabled"
    assert subs["sub-1"]["disabled_reason"] == "410 Gone" and subs["sub-2"]["status"] == "deleted"
    assert "secret" not in json.dumps([dict(r, created_at=None, updated_at=None) for r in subs.values()])

    audit = rows(settings, "SELECT * FROM {s}.audit ORDER BY app_id, sequence")
    assert len(audit) == len(story.envs)
    by_id = {a["event_id"]: a for a in audit}
    for env in story.envs:
        a = by_id[env.id]
        assert (a["type"], a["app_id"], a["sequence"], a["correlation_id"], a["causation_id"]) == (
            env.type, env.app_id, env.sequence, env.correlationid, env.causationid)
        assert iso(a["time"]) == env.time
        assert a["data"] == json.loads(codec.encode(env))["data"]
        assert a["topic"] == settings.topics.events
    assert [by_id[e.id]["type"] for e in story.envs[-2:]] == ["app.deleted", "app.retired"]
    assert any(a["type"] == "request.rejected" for a in audit)  # audit-only types are kept too

    offsets = rows(settings, "SELECT * FROM {s}.offsets")
    assert sum(o["offset"] for o in offsets) == len(story.envs)


def test_resent_records_change_nothing(settings) -> None:
    story = full_story()
    produce(settings, story.envs)
    with projector(settings):
        wait_caught_up(settings)
        with psycopg.connect(settings.db_url, autocommit=True) as conn:
            before = checksum(conn, settings.schema("projections"), offsets=False)
        # at-least-once upstream: the very same records again, at new offsets
        produce(settings, story.envs)
        produce(settings, story.envs[:10])
        wait_caught_up(settings)
        with psycopg.connect(settings.db_url, autocommit=True) as conn:
            after = checksum(conn, settings.schema("projections"), offsets=False)
    assert after == before
    offsets = rows(settings, "SELECT * FROM {s}.offsets")
    assert sum(o["offset"] for o in offsets) == 2 * len(story.envs) + 10


def test_poison_records_are_dead_lettered_and_the_projector_keeps_going(settings) -> None:
    s = Story()
    s.register(7, "api")
    produce(settings, s.envs)
    not_json = b"{not json"
    unknown = json.dumps({"specversion": "1.0", "id": "x1", "source": "evil", "type": "app.exploded",
                          "time": "2025-03-01T09:00:00Z", "subject": "7", "data": {"app_id": 7},
                          "correlationid": "x1", "causationid": "x1"}).encode()
    # decodes fine but cannot be stored: a build number beyond PostgreSQL's integer
    too_big = wrap(m.BuildQueued(app_id=7, build=2**40, commit="c", message="", author="", ref="main",
                                 delivery_id="d", repo_url=""), source="test", id=derive_id("too-big"), sequence=2)
    produce_raw(settings, [(b"7", not_json), (b"7", unknown), (b"7", codec.encode(too_big))])
    after = Story(tag="after")
    after.seq[7] = 2
    after.push_to_deploy(7, 1, 1, "gh-after")
    produce(settings, after.envs)

    with projector(settings):
        wait_caught_up(settings)

    dead = read_topic(settings, settings.topics.deadletter)
    assert sorted(msg.value() for msg in dead) == sorted([not_json, unknown, codec.encode(too_big)])
    reasons = {msg.value(): dict(msg.headers())["x-shipline-reason"].decode() for msg in dead}
    assert "not JSON" in reasons[not_json]
    assert "unknown type 'app.exploded'" in reasons[unknown]
    assert "build.queued" in reasons[codec.encode(too_big)] and "cannot apply" in reasons[codec.encode(too_big)]
    assert all(dict(msg.headers())["x-shipline-consumer"] == b"projector" for msg in dead)
    # everything else was folded, in the same batch as the poison
    assert rows(settings, "SELECT current_revision FROM {s}.apps WHERE app_id = 7") == [{"current_revision": 1}]
    assert rows(settings, "SELECT number FROM {s}.builds") == [{"number": 1}]
    types = [r["type"] for r in rows(settings, "SELECT type FROM {s}.audit ORDER BY sequence")]
    assert "app.exploded" not in types and len(types) == 1 + len(after.envs)


def test_a_dropped_schema_is_recreated_and_folded_again_from_the_log(settings) -> None:
    story = full_story()
    produce(settings, story.envs)
    schema = settings.schema("projections")
    with projector(settings):
        wait_caught_up(settings)
        with psycopg.connect(settings.db_url, autocommit=True) as conn:
            before = checksum(conn, schema)
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
            deadline = time.monotonic() + 60
            while True:
                try:
                    if checksum(conn, schema) == before:
                        break
                except psycopg.errors.UndefinedTable:
                    pass
                assert time.monotonic() < deadline, "the projector did not rebuild the dropped tables"
                time.sleep(0.2)
