"""Every decision streams makes, as pure functions: no Kafka."""

from __future__ import annotations

import base64
import json

import pytest

from shipline import codec
from shipline.envelope import Envelope, derive_id, wrap
from shipline.messages import (
    AppRetired,
    BuildFinished,
    CreateDeployHook,
    CreateSubscription,
    DeleteApp,
    DeleteDeployHook,
    DeleteSubscription,
    DeliveryReceived,
    Deployed,
    DeployFailed,
    DisableWebhookToken,
    EnableWebhookToken,
    JobFinished,
    RegisterApp,
    RequestDeploy,
    SubscriptionDisabled,
    UpdateApp,
    UpdateSubscription,
)
from streams.decide import decide, step
from streams.state import RECENT_DELIVERIES, AppState, evolve, from_json, to_json

pytestmark = pytest.mark.unit

APP = 7
SHA = "0123456789abcdef0123456789abcdef01234567"


def register(**kw) -> Envelope:  # type: ignore[no-untyped-def]
    fields = dict(app_id=APP, name="web", namespace="prod", repo_url="file:///src/web", branch="main",
                  image="registry.local/web", request_id="req-reg")
    fields.update(kw)
    return wrap(RegisterApp(**fields), source="test")


def run(state: AppState, *inputs: Envelope) -> tuple[AppState, list[Envelope]]:
    outputs: list[Envelope] = []
    for env in inputs:
        state, out = step(state, env)
        outputs += out
    return state, outputs


def registered(**kw) -> AppState:  # type: ignore[no-untyped-def]
    state, _ = run(AppState(app_id=APP), register(**kw))
    return state


def push(delivery_id: str = "d1", ref: str = "refs/heads/main", sha: str = SHA, event: str = "push",
         source: str = "github", **extra) -> Envelope:  # type: ignore[no-untyped-def]
    body = {"ref": ref, "after": sha, "deleted": False,
            "head_commit": {"id": sha, "message": "fix the thing", "author": {"name": "Ada", "email": "a@x"}},
            "repository": {"clone_url": "https://github.com/o/web.git"}, **extra}
    return delivery(json.dumps(body), delivery_id=delivery_id, event=event, source=source)


def delivery(body: str, *, delivery_id: str = "d1", event: str = "deploy", source: str = "skipper",
             encoding: str = "utf8", hook_id: str | None = None) -> Envelope:
    return wrap(DeliveryReceived(app_id=APP, delivery_id=delivery_id, source=source, route="/r", event=event,
                                 headers={"X-GitHub-Event": event}, body=body, body_encoding=encoding,
                                 verification="deploy_hook" if hook_id else "hmac",
                                 received_at="2026-01-01T00:00:00Z", hook_id=hook_id), source="ingress")


def report(message, cause: str = "cmd-1", correlation: str = "d1") -> Envelope:  # type: ignore[no-untyped-def]
    return wrap(message, source="deployer", causationid=cause, correlationid=correlation)


def finished(build: int, status: str = "succeeded", tags: list[str] | None = None) -> Envelope:
    return report(BuildFinished(app_id=APP, build=build, commit=SHA, status=status, exit_code=0, image_id="sha256:abc",
                                tags=[f"web:{build}-0123456"] if tags is None else tags, duration=1.0, log="",
                                log_path="/l"))


def types(outputs: list[Envelope]) -> list[str]:
    return [o.type for o in outputs]


def accepted(outputs: list[Envelope]):  # type: ignore[no-untyped-def]
    return next(o.data for o in outputs if o.type == "delivery.accepted")


# ---------------------------------------------------------------------------- management requests


def test_register_becomes_app_registered_correlated_to_the_request() -> None:
    req = register()
    state, out = run(AppState(app_id=APP), req)
    assert types(out) == ["app.registered"]
    ev = out[0]
    assert ev.correlationid == "req-reg" and ev.causationid == req.id and ev.sequence == 1
    assert ev.id == derive_id(req.id, "app.registered", 0)
    assert ev.data.repo_url == "file:///src/web" and ev.data.branch == "main"
    assert state.config is not None and state.config["name"] == "web" and state.sequence == 1
    codec.decode(codec.encode(ev), strict=True)  # valid on the wire


@pytest.mark.parametrize(
    ("request_message", "event_type"),
    [
        (UpdateApp(app_id=APP, changes={"branch": "prod"}, request_id="r"), "app.updated"),
        (CreateDeployHook(app_id=APP, hook_id="h1", name="ci", token_hash="x" * 64, token_prefix="shk_",
                          request_id="r"), "deploy_hook.created"),
        (DeleteDeployHook(app_id=APP, hook_id="h1", request_id="r"), "deploy_hook.deleted"),
        (EnableWebhookToken(app_id=APP, token_hash="y" * 64, token_prefix="swt_", request_id="r"),
         "webhook_token.enabled"),
        (DisableWebhookToken(app_id=APP, request_id="r"), "webhook_token.disabled"),
        (CreateSubscription(app_id=APP, subscription_id="s1", url="http://127.0.0.1/h", events=["deployed"],
                            secret_encrypted="enc", request_id="r"), "subscription.created"),
        (UpdateSubscription(app_id=APP, subscription_id="s1", changes={"url": "http://127.0.0.1/x"},
                            request_id="r"), "subscription.updated"),
        (DeleteSubscription(app_id=APP, subscription_id="s1", request_id="r"), "subscription.deleted"),
    ],
)
def test_each_request_becomes_its_past_tense_event(request_message, event_type) -> None:  # type: ignore[no-untyped-def]
    req = wrap(request_message, source="ingress")
    _, out = run(registered(), req)
    assert types(out) == [event_type]
    assert out[0].correlationid == "r" and out[0].causationid == req.id and out[0].sequence == 2
    codec.decode(codec.encode(out[0]), strict=True)


def test_update_changes_the_config_commands_carry() -> None:
    state, _ = run(registered(), wrap(UpdateApp(app_id=APP, changes={"branch": "prod", "port": 9000}), source="i"))
    assert state.config["branch"] == "prod" and state.config["port"] == 9000  # type: ignore[index]
    _, out = run(state, push(ref="refs/heads/prod"))
    build = next(o for o in out if o.type == "build.image")
    assert build.data.app["branch"] == "prod" and build.data.app["port"] == 9000


def test_requests_for_unknown_or_deleted_apps_are_rejected_with_the_request_id() -> None:
    req = wrap(UpdateApp(app_id=APP, changes={}, request_id="r9"), source="i")
    _, out = run(AppState(app_id=APP), req)
    assert types(out) == ["request.rejected"]
    assert out[0].correlationid == "r9" and out[0].data.request_id == "r9" and "not registered" in out[0].data.reason
    state, _ = run(registered(), wrap(DeleteApp(app_id=APP), source="i"))
    _, out = run(state, wrap(UpdateApp(app_id=APP, changes={}), source="i"))
    assert "deleted" in out[0].data.reason
    _, out = run(registered(), register(request_id="again"))
    assert types(out) == ["request.rejected"] and "already registered" in out[0].data.reason


def test_delete_is_app_deleted_then_a_retire_command_for_the_deployer() -> None:
    req = wrap(DeleteApp(app_id=APP, request_id="rd", requested_by="ops"), source="ingress")
    state, out = run(live(1), req)
    assert types(out) == ["app.deleted", "app.retire"]
    deleted, retire = out
    assert deleted.data.requested_by == "ops" and deleted.sequence == state.sequence and state.deleted
    assert retire.data.KIND == "command" and retire.sequence is None
    assert retire.key == deleted.key == str(APP).encode()  # same partition: after the app's earlier commands
    assert retire.causationid == deleted.id and retire.correlationid == "rd"
    assert retire.data.app["app_id"] == APP and retire.data.app["name"] == "web"
    for env in out:
        codec.decode(codec.encode(env), strict=True)
    _, again = run(state, req)
    assert again == []  # the same request twice retires once
    _, out = run(state, wrap(DeleteApp(app_id=APP, request_id="rd2"), source="ingress"))
    assert types(out) == ["request.rejected"] and "deleted" in out[0].data.reason


def test_a_deleted_app_gets_no_further_builds_or_deploys() -> None:
    # a deploy in flight, one waiting, and a build queued when the app is deleted
    state, _ = run(registered(), hook(1), hook(2), push("p1"))
    assert (state.in_flight, state.waiting, state.builds) == (1, 2, 1)
    state, out = run(state, wrap(DeleteApp(app_id=APP, request_id="rd"), source="ingress"))
    assert types(out) == ["app.deleted", "app.retire"]
    # the in-flight deploy ends: the waiting one is not released (the retire is queued behind it)
    state, out = run(state, report(Deployed(app_id=APP, revision=1, image="web:1", commit="c1", instances=["i"],
                                            duration=1.0, url="http://127.0.0.1:8007")))
    assert types(out) == ["deployed"]
    state, out = run(state, report(DeployFailed(app_id=APP, revision=2, step="x", reason="y")))
    assert types(out) == ["deploy.failed"]
    _, out = run(state, finished(1))  # the queued build finishes: nothing is deployed
    assert types(out) == ["build.finished"]
    state, out = run(state, push("p2", sha="e" * 40), hook(3))
    assert types(out) == ["delivery.accepted", "delivery.accepted"]
    assert all(o.data.outcome == "rejected" and "deleted" in o.data.reason for o in out)
    _, out = run(state, deploy_request(request_id="m", trigger="manual", image="web:9"))
    assert types(out) == ["request.rejected"]


def test_the_retired_report_becomes_the_app_retired_event() -> None:
    state, _ = run(live(1), wrap(DeleteApp(app_id=APP, request_id="rd"), source="ingress"))
    r = report(AppRetired(app_id=APP, stopped=["sl-x-a7-r1-1-ab12"], revision=1, url="http://127.0.0.1:8007"),
               correlation="rd")
    new, out = run(state, r)
    assert types(out) == ["app.retired"]
    ev = out[0]
    assert ev.id == derive_id(r.id, r.type, 0) and ev.sequence == state.sequence + 1 == new.sequence
    assert ev.data == r.data and ev.correlationid == "rd" and ev.causationid == r.causationid
    codec.decode(codec.encode(ev), strict=True)
    _, again = run(new, r)
    assert again == []  # a report published twice is sequenced once
    # a replayed retire reports nothing stopped: still an event, never an error
    _, out = run(new, report(AppRetired(app_id=APP, stopped=[], revision=None, url=""), cause="cmd-2"))
    assert types(out) == ["app.retired"]


def test_the_same_request_twice_is_applied_once() -> None:
    req = wrap(DeleteDeployHook(app_id=APP, hook_id="h", request_id="r1"), source="i")
    state, out = run(registered(), req, req)
    assert types(out) == ["deploy_hook.deleted"] and state.sequence == 2


# ------------------------------------------------------------------------------------ GitHub pushes


def test_push_to_the_tracked_branch_queues_a_build_and_commands_it() -> None:
    d = push()
    state, out = run(registered(), d)
    assert types(out) == ["delivery.accepted", "build.queued", "build.image"]
    acc, queued, cmd = out
    assert acc.data.outcome == "queued" and acc.data.body == d.data.body and acc.data.headers == d.data.headers
    q = queued.data
    assert (q.build, q.commit, q.message, q.author, q.ref, q.delivery_id, q.repo_url) == (
        1, SHA, "fix the thing", "Ada", "refs/heads/main", "d1", "file:///src/web")
    c = cmd.data
    assert c.build == 1 and c.commit == SHA and c.repo_url == "file:///src/web"
    assert c.app == {"app_id": APP, "name": "web", "namespace": "prod", "repo_url": "file:///src/web",
                     "branch": "main", "image": "registry.local/web", "kind": "service", "strategy": "docker",
                     "command": None, "port": None, "health_path": "/", "build": None, "allow_unsigned": False}
    assert [o.sequence for o in out] == [2, 3, None]  # commands carry no sequence
    assert all(o.correlationid == "d1" for o in out)
    assert acc.causationid == d.id and queued.causationid == d.id and cmd.causationid == queued.id
    assert len({o.id for o in out}) == 3
    assert state.builds == 1
    _, out2 = run(state, push(delivery_id="d2"))
    assert next(o for o in out2 if o.type == "build.queued").data.build == 2  # numbered per app


@pytest.mark.parametrize(
    ("delivery_env", "reason"),
    [
        (push(ref="refs/tags/v1"), "not a branch"),
        (push(deleted=True), "deleted"),
        (push(ref="refs/heads/feature"), "not tracked"),
        (push(event="issues"), "starts nothing"),
    ],
)
def test_pushes_that_start_nothing_are_recorded_as_ignored(delivery_env, reason) -> None:  # type: ignore[no-untyped-def]
    state, out = run(registered(), delivery_env)
    assert types(out) == ["delivery.accepted"]
    assert out[0].data.outcome == "ignored" and reason in out[0].data.reason
    assert state.builds == 0


def test_ping_and_shipyard_route() -> None:
    _, out = run(registered(), push(event="ping"))
    assert types(out) == ["delivery.accepted"] and out[0].data.outcome == "ping"
    _, out = run(registered(), push(source="shipyard"))
    assert types(out) == ["delivery.accepted", "build.queued", "build.image"]


def test_a_delivery_seen_before_yields_only_delivery_duplicate() -> None:
    state, _ = run(registered(), push("dup"))
    state2, out = run(state, push("dup"))
    assert types(out) == ["delivery.duplicate"] and out[0].data.delivery_id == "dup"
    assert state2.builds == 1 and state2.sequence == state.sequence + 1


def test_recent_delivery_ids_are_bounded() -> None:
    state = registered()
    state = AppState(**{**state.__dict__, "deliveries": tuple(f"x{i}" for i in range(RECENT_DELIVERIES))})
    state, _ = run(state, push("newest"))
    assert len(state.deliveries) == RECENT_DELIVERIES and state.deliveries[-1] == "newest"
    assert "x0" not in state.deliveries


def test_deliveries_for_an_unknown_app_and_bad_bodies_are_rejected_not_raised() -> None:
    _, out = run(AppState(app_id=APP), push())
    assert types(out) == ["delivery.accepted"] and out[0].data.outcome == "rejected"
    _, out = run(registered(), delivery("{not json", event="push", source="github"))
    assert out[0].data.outcome == "rejected" and "not JSON" in out[0].data.reason
    _, out = run(registered(), delivery("{}", source="carrier-pigeon"))
    assert out[0].data.outcome == "rejected" and "unknown delivery source" in out[0].data.reason


# ----------------------------------------------------------------------------------- image hooks


def test_skipper_hook_requests_a_deploy_and_releases_it() -> None:
    d = delivery(json.dumps({"image": "registry.local/web:v2", "commit": SHA}))
    state, out = run(registered(), d)
    assert types(out) == ["delivery.accepted", "deploy.requested", "deploy.release"]
    req, rel = out[1].data, out[2].data
    assert (req.revision, req.image, req.commit, req.trigger, req.cause) == (1, "registry.local/web:v2", SHA,
                                                                               "webhook", "d1")
    assert (rel.revision, rel.image, rel.commit) == (1, "registry.local/web:v2", SHA) and rel.app["app_id"] == APP
    assert out[2].causationid == out[1].id
    assert state.in_flight == 1 and state.revision == 1
    _, out = run(registered(), delivery(json.dumps({"commit": SHA})))
    assert out[0].data.outcome == "rejected" and "image" in out[0].data.reason


def test_shipmight_service_hook_tags_the_app_repository() -> None:
    body = base64.b64encode(json.dumps({"imageTag": "1.4"}).encode()).decode()
    _, out = run(registered(), delivery(body, source="shipmight", encoding="base64", hook_id="h1"))
    assert types(out) == ["delivery.accepted", "deploy.requested", "deploy.release"]
    assert out[0].data.hook_id == "h1"  # the audit copy names the hook (its "last used")
    assert out[1].data.image == "registry.local/web:1.4" and out[2].data.image == "registry.local/web:1.4"


def test_shipmight_job_hook_runs_the_job_with_the_instance_variables() -> None:
    body = json.dumps({"instanceEnvironmentVariables": [{"name": "A", "value": "1"}, {"name": "B", "value": "x"}]})
    state, out = run(registered(kind="job", image="registry.local/batch:3"),
                     delivery(body, source="shipmight", event="job"))
    assert types(out) == ["delivery.accepted", "job.requested", "job.run"]
    assert out[1].data.job == 1 and out[1].data.env == {"A": "1", "B": "x"} and out[1].data.cause == "d1"
    assert out[2].data.image == "registry.local/batch:3" and out[2].data.env == {"A": "1", "B": "x"}
    assert state.jobs == 1
    bad = json.dumps({"instanceEnvironmentVariables": [{"name": 3}]})
    _, out = run(state, delivery(bad, source="shipmight", event="job", delivery_id="d2"))
    assert out[0].data.outcome == "rejected"


# ------------------------------------------------------------------------------- builds -> deploys


def test_successful_build_of_the_latest_push_is_deployed() -> None:
    state, _ = run(registered(), push("d1"))
    state, out = run(state, finished(1))
    assert types(out) == ["build.finished", "deploy.requested", "deploy.release"]
    sequenced, req, rel = out
    assert sequenced.sequence == state.sequence - 1 and sequenced.data.build == 1
    assert req.data.trigger == "webhook" and req.data.image == "web:1-0123456" and req.data.build == 1
    assert req.correlationid == "d1" and req.causationid == sequenced.id
    assert rel.data.revision == 1


def test_image_id_is_used_when_a_build_has_no_tags() -> None:
    state, _ = run(registered(), push("d1"))
    _, out = run(state, finished(1, tags=[]))
    assert out[1].data.image == "sha256:abc"


def test_failed_or_superseded_builds_deploy_nothing() -> None:
    state, _ = run(registered(), push("d1"), push("d2", sha="f" * 40))
    _, out = run(state, finished(1))  # build 2 was queued after it: superseded
    assert types(out) == ["build.finished"]
    _, out = run(state, finished(2, status="failed"))
    assert types(out) == ["build.finished"]


def test_reports_are_reemitted_with_a_derived_id_and_the_next_sequence() -> None:
    state = registered()
    for message in (JobFinished(app_id=APP, job=1, exit_code=0, log="ok", duration=0.1),
                    SubscriptionDisabled(app_id=APP, subscription_id="s", reason="410")):
        r = report(message)
        new, out = run(state, r)
        assert len(out) == 1
        ev = out[0]
        assert ev.id == derive_id(r.id, r.type, 0) and ev.id != r.id
        assert ev.sequence == state.sequence + 1 and ev.data == r.data
        assert ev.causationid == r.causationid and ev.correlationid == r.correlationid
        state = new
    _, again = run(state, r)
    assert again == []  # the same report twice is sequenced once


# ------------------------------------------------------------------------------------ latest wins


def hook(n: int) -> Envelope:
    return delivery(json.dumps({"image": f"web:{n}", "commit": f"c{n}"}), delivery_id=f"h{n}")


def test_latest_wins_one_in_flight_newer_waits_older_waiting_is_superseded() -> None:
    state, out = run(registered(), hook(1))
    assert "deploy.release" in types(out) and state.in_flight == 1
    state, out = run(state, hook(2))
    assert types(out) == ["delivery.accepted", "deploy.requested"]  # waits for revision 1
    assert (state.in_flight, state.waiting) == (1, 2)
    state, out = run(state, hook(3))
    assert types(out) == ["delivery.accepted", "deploy.requested", "deploy.superseded"]
    assert (out[2].data.revision, out[2].data.superseded_by) == (2, 3)
    state, out = run(state, hook(4))
    assert (out[2].data.revision, out[2].data.superseded_by) == (3, 4)
    assert (state.in_flight, state.waiting) == (1, 4)
    deployed = report(Deployed(app_id=APP, revision=1, image="web:1", commit="", instances=["i"], duration=1.0,
                               url="http://127.0.0.1:8000"))
    state, out = run(state, deployed)
    assert types(out) == ["deployed", "deploy.release"]
    assert out[1].data.revision == 4 and out[1].data.image == "web:4" and out[1].causationid == out[0].id
    assert (state.in_flight, state.waiting, state.live) == (4, None, 1)
    failed = report(DeployFailed(app_id=APP, revision=4, step="health", reason="timeout"))
    state, out = run(state, failed)
    assert types(out) == ["deploy.failed"] and state.in_flight is None and state.live == 1
    state, out = run(state, hook(5))
    assert "deploy.release" in types(out)  # nothing in flight: released at once


def test_a_failed_in_flight_deploy_releases_the_waiting_one() -> None:
    state, _ = run(registered(), hook(1), hook(2))
    state, out = run(state, report(DeployFailed(app_id=APP, revision=1, step="start", reason="boom")))
    assert types(out) == ["deploy.failed", "deploy.release"] and out[1].data.revision == 2


# ------------------------------------------------------------------------- manual, rollback, promotion


def live(*revisions: int) -> AppState:
    state = registered()
    for n in revisions:
        state, _ = run(state, hook(n))
        state, _ = run(state, report(Deployed(app_id=APP, revision=state.revision, image=f"web:{n}", commit=f"c{n}",
                                              instances=[], duration=1.0, url="")))
    return state


def deploy_request(**kw) -> Envelope:  # type: ignore[no-untyped-def]
    return wrap(RequestDeploy(app_id=APP, **kw), source="ingress")


def test_manual_deploy_of_an_image() -> None:
    req = deploy_request(request_id="rq1", trigger="manual", image="web:hotfix", commit="abc", requested_by="ops")
    state, out = run(live(1), req)
    assert types(out) == ["deploy.requested", "deploy.release"]
    d = out[0].data
    assert (d.revision, d.image, d.commit, d.trigger, d.cause, d.requested_by) == (2, "web:hotfix", "abc", "manual",
                                                                                     "rq1", "ops")
    assert all(o.correlationid == "rq1" for o in out)


def test_rollback_to_the_previous_live_revision_and_to_revision_n() -> None:
    state = live(1, 2, 3)
    _, out = run(state, deploy_request(request_id="rb", trigger="rollback"))
    assert out[0].data.trigger == "rollback" and out[0].data.image == "web:2" and out[0].data.revision == 4
    assert out[1].data.image == "web:2"
    _, out = run(state, deploy_request(request_id="rb1", trigger="rollback", revision=1))
    assert out[0].data.image == "web:1" and out[0].data.commit == "c1"
    _, out = run(state, deploy_request(request_id="rb9", trigger="rollback", revision=9))
    assert types(out) == ["request.rejected"] and out[0].correlationid == "rb9"
    _, out = run(live(1), deploy_request(request_id="rb0", trigger="rollback"))
    assert types(out) == ["request.rejected"] and "no earlier revision" in out[0].data.reason


def test_promotion_and_redeploy_without_an_image() -> None:
    _, out = run(live(1), deploy_request(request_id="p", trigger="promotion", image="registry.local/web:rc"))
    assert out[0].data.trigger == "promotion" and out[0].data.image == "registry.local/web:rc"
    _, out = run(live(1, 2), deploy_request(request_id="m", trigger="manual"))
    assert out[0].data.image == "web:2"  # the live one again
    _, out = run(registered(), deploy_request(request_id="m0", trigger="manual"))
    assert types(out) == ["request.rejected"]


# -------------------------------------------------------------------------- sequence, replay, state


def test_sequence_is_gap_free_across_every_kind_of_input() -> None:
    state, out = run(AppState(app_id=APP), register(), push("a"), push("a"), hook(1), hook(2), hook(3),
                     finished(1), report(Deployed(app_id=APP, revision=1, image="web:1", commit="", instances=[],
                                                  duration=1.0, url="")),
                     deploy_request(request_id="x", trigger="rollback", revision=1))
    seqs = [o.sequence for o in out if o.data.KIND == "event"]
    assert seqs == list(range(1, len(seqs) + 1)) and state.sequence == len(seqs)
    assert all(o.sequence is None for o in out if o.data.KIND == "command")
    assert len({o.id for o in out}) == len(out)


def test_deciding_again_from_the_same_state_yields_identical_records() -> None:
    state = live(1)
    d = push("again")
    _, first = step(state, d, 10)
    _, second = step(state, d, 10)
    assert [codec.encode(o) for o in first] == [codec.encode(o) for o in second]


def test_a_record_the_saved_state_already_applied_is_skipped() -> None:
    state, out = step(registered(), push("p1"), 41)
    assert out and state.positions == {"inbound": 41}
    same, again = step(state, push("p1"), 41)
    assert again == [] and same == state
    after, reported = step(state, finished(1), 42)  # reports share the input topic
    assert reported and after.positions == {"inbound": 42}


def test_state_round_trips_through_our_json() -> None:
    state = live(1, 2)
    state, _ = run(state, hook(3), hook(4), push("p"))
    state, _ = step(state, push("q"), 99)
    assert from_json(to_json(state)) == state
    assert json.loads(to_json(state))["v"] == 1


def test_evolve_ignores_events_that_change_nothing_but_the_sequence() -> None:
    state = registered()
    ev = report(JobFinished(app_id=APP, job=1, exit_code=0, log="", duration=0.0)).with_sequence(5)
    assert evolve(state, ev) == AppState(**{**state.__dict__, "sequence": 5})


def test_decide_refuses_types_streams_does_not_consume() -> None:
    cmd = wrap(DeleteApp(app_id=APP), source="x")
    object.__setattr__(cmd, "type", "build.image")
    with pytest.raises(ValueError):
        decide(registered(), cmd)
