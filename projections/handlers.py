"""Fold functions: one ``apply(writer, envelope)`` per event type, in ``HANDLERS``.

Each function turns one event into writes on the projection tables and nothing else: no reads,
no clock, no ids of its own, so replaying the log gives the same rows. Each writes only rows of
its event's app (what lets ``projections.writer.Layered`` batch many apps' statements into one).
Statements are ``Rows`` over ``v``, the unnested parameters (see ``projections.writer``).
Tables are named unqualified; the caller's ``search_path`` picks the schema (the live one, or
the fresh one a rebuild fills). Upserts keep a fold total over logs that start midway.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import orjson
from psycopg.types.json import Jsonb

from projections.writer import Rows, Writer
from shipline import messages as m
from shipline.envelope import Envelope

Handler = Callable[[Writer, Envelope], None]
HANDLERS: dict[str, Handler] = {}

# UpdateApp.changes keys that have a column; any other key is kept in apps.extra
APP_COLUMNS = (
    "name", "namespace", "repo_url", "branch", "image", "kind", "strategy", "command", "port",
    "health_path", "build", "allow_unsigned",
)
JSON_COLUMNS = {"build"}


def handles(message_type: type[m.Message]) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[message_type.TYPE] = fn
        return fn

    return register


def _json(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


# ------------------------------------------------------------------------------------- apps

APP_REGISTERED = Rows(
    "INSERT INTO apps (app_id, name, namespace, repo_url, branch, image, kind, strategy, command, port,"
    " health_path, build, allow_unsigned, created_by, created_at, updated_at)"
    " SELECT app_id, name, namespace, repo_url, branch, image, kind, strategy, command, port, health_path, build,"
    " allow_unsigned, created_by, at, at FROM {rows}"
    " ON CONFLICT (app_id) DO UPDATE SET name = excluded.name, namespace = excluded.namespace,"
    " repo_url = excluded.repo_url, branch = excluded.branch, image = excluded.image, kind = excluded.kind,"
    " strategy = excluded.strategy, command = excluded.command, port = excluded.port,"
    " health_path = excluded.health_path, build = excluded.build, allow_unsigned = excluded.allow_unsigned,"
    " created_by = excluded.created_by, created_at = excluded.created_at, updated_at = excluded.updated_at,"
    " deleted = false, deleted_at = NULL",
    app_id="int8", name="text", namespace="text", repo_url="text", branch="text", image="text", kind="text",
    strategy="text", command="text", port="int4", health_path="text", build="jsonb", allow_unsigned="bool",
    created_by="text", at="timestamptz",
)


@handles(m.AppRegistered)
def app_registered(w: Writer, env: Envelope) -> None:
    d: m.AppRegistered = env.data  # type: ignore[assignment]
    w.rows(
        APP_REGISTERED, app_id=d.app_id, name=d.name, namespace=d.namespace, repo_url=d.repo_url, branch=d.branch,
        image=d.image, kind=d.kind, strategy=d.strategy, command=d.command, port=d.port, health_path=d.health_path,
        build=_json(d.build), allow_unsigned=d.allow_unsigned, created_by=d.requested_by, at=env.time,
    )


@handles(m.AppUpdated)
def app_updated(w: Writer, env: Envelope) -> None:
    """Which columns change depends on the event, so this one statement is not batched."""
    d: m.AppUpdated = env.data  # type: ignore[assignment]
    known = [k for k in APP_COLUMNS if k in d.changes]
    extra = {k: v for k, v in d.changes.items() if k not in APP_COLUMNS}
    sets = "".join(f", {k} = %s" for k in known)  # column names come from APP_COLUMNS only
    values = [_json(d.changes[k]) if k in JSON_COLUMNS else d.changes[k] for k in known]
    w.execute(
        f"UPDATE apps SET updated_at = %s, extra = extra || %s{sets} WHERE app_id = %s",
        (env.time, Jsonb(extra), *values, d.app_id),
    )


RELEASE_NOT_LIVE = Rows(
    "UPDATE releases r SET current = false, live_until = v.at FROM {rows} WHERE r.app_id = v.app_id AND r.current",
    app_id="int8", at="timestamptz",
)
APP_DELETED = Rows(
    "UPDATE apps a SET deleted = true, deleted_at = v.at, updated_at = v.at, current_revision = NULL, url = NULL"
    " FROM {rows} WHERE a.app_id = v.app_id",
    app_id="int8", at="timestamptz",
)
APP_NOT_SERVING = Rows(
    "UPDATE apps a SET current_revision = NULL, url = NULL, updated_at = v.at FROM {rows} WHERE a.app_id = v.app_id",
    app_id="int8", at="timestamptz",
)


@handles(m.AppDeleted)
def app_deleted(w: Writer, env: Envelope) -> None:
    """A deleted app serves nothing: no current release, no URL (the deployer retires it next)."""
    w.rows(RELEASE_NOT_LIVE, app_id=env.app_id, at=env.time)
    w.rows(APP_DELETED, app_id=env.app_id, at=env.time)


RELEASES_CANCELLED = Rows(
    "UPDATE releases r SET status = 'cancelled', finished_at = v.at, failure_reason = 'the app was deleted'"
    " FROM {rows} WHERE r.app_id = v.app_id AND r.status = 'requested'",
    app_id="int8", at="timestamptz",
)


@handles(m.AppRetired)
def app_retired(w: Writer, env: Envelope) -> None:
    """The deployer took the app down. Again no current release and no URL: a deploy that was in
    flight when the app was deleted may have finished (``deployed``) between the two events. A
    deploy still waiting its turn (latest wins) will never run: it is cancelled. (The deployer
    carries out an app's commands in order, so every deploy sent before the retire has reported
    by now.)"""
    w.rows(RELEASE_NOT_LIVE, app_id=env.app_id, at=env.time)
    w.rows(APP_NOT_SERVING, app_id=env.app_id, at=env.time)
    w.rows(RELEASES_CANCELLED, app_id=env.app_id, at=env.time)


WEBHOOK_ENABLED = Rows(
    "UPDATE apps a SET webhook_enabled = true, webhook_token_hash = v.token_hash,"
    " webhook_token_prefix = v.token_prefix, webhook_enabled_at = v.at, webhook_last_used_at = NULL"
    " FROM {rows} WHERE a.app_id = v.app_id",
    app_id="int8", token_hash="text", token_prefix="text", at="timestamptz",
)
WEBHOOK_DISABLED = Rows(
    "UPDATE apps a SET webhook_enabled = false, webhook_token_hash = NULL, webhook_token_prefix = NULL"
    " FROM {rows} WHERE a.app_id = v.app_id",
    app_id="int8",
)


@handles(m.WebhookTokenEnabled)
def webhook_token_enabled(w: Writer, env: Envelope) -> None:
    d: m.WebhookTokenEnabled = env.data  # type: ignore[assignment]
    w.rows(WEBHOOK_ENABLED, app_id=d.app_id, token_hash=d.token_hash, token_prefix=d.token_prefix, at=env.time)


@handles(m.WebhookTokenDisabled)
def webhook_token_disabled(w: Writer, env: Envelope) -> None:
    w.rows(WEBHOOK_DISABLED, app_id=env.app_id)


HOOK_CREATED = Rows(
    "INSERT INTO deploy_hooks (hook_id, app_id, name, token_hash, token_prefix, created_at)"
    " SELECT hook_id, app_id, name, token_hash, token_prefix, at FROM {rows} ON CONFLICT (hook_id) DO NOTHING",
    hook_id="text", app_id="int8", name="text", token_hash="text", token_prefix="text", at="timestamptz",
)
HOOK_DELETED = Rows(
    "UPDATE deploy_hooks h SET deleted = true, deleted_at = v.at FROM {rows}"
    " WHERE h.hook_id = v.hook_id AND h.app_id = v.app_id AND NOT h.deleted",
    hook_id="text", app_id="int8", at="timestamptz",
)


@handles(m.DeployHookCreated)
def deploy_hook_created(w: Writer, env: Envelope) -> None:
    d: m.DeployHookCreated = env.data  # type: ignore[assignment]
    w.rows(HOOK_CREATED, hook_id=d.hook_id, app_id=d.app_id, name=d.name, token_hash=d.token_hash,
           token_prefix=d.token_prefix, at=env.time)


@handles(m.DeployHookDeleted)
def deploy_hook_deleted(w: Writer, env: Envelope) -> None:
    d: m.DeployHookDeleted = env.data  # type: ignore[assignment]
    w.rows(HOOK_DELETED, hook_id=d.hook_id, app_id=d.app_id, at=env.time)


# ------------------------------------------------------------------------------- deliveries


def _storable_body(body: str, encoding: str) -> tuple[str, str]:
    """PostgreSQL text cannot hold NUL; such a body is kept exactly, as base64."""
    if "\x00" in body and encoding == "utf8":
        return base64.b64encode(body.encode()).decode(), "base64"
    return body, encoding


HOOK_USED = Rows(
    "UPDATE deploy_hooks h SET last_used_at = GREATEST(h.last_used_at, v.at) FROM {rows} WHERE h.hook_id = v.hook_id",
    hook_id="text", at="timestamptz",
)
DELIVERY_ACCEPTED = Rows(
    "INSERT INTO deliveries (delivery_id, app_id, source, route, event, verification, received_at, outcome,"
    " reason, headers, body, body_encoding, event_id, correlation_id)"
    " SELECT delivery_id, app_id, source, route, event, verification, received_at, outcome, reason, headers, body,"
    " body_encoding, event_id, correlation_id FROM {rows} ON CONFLICT (delivery_id, app_id) DO NOTHING",
    delivery_id="text", app_id="int8", source="text", route="text", event="text", verification="text",
    received_at="timestamptz", outcome="text", reason="text", headers="jsonb", body="text", body_encoding="text",
    event_id="text", correlation_id="text",
)
WEBHOOK_USED = Rows(
    "UPDATE apps a SET webhook_last_used_at = v.at FROM {rows} WHERE a.app_id = v.app_id AND a.webhook_enabled",
    app_id="int8", at="timestamptz",
)
DELIVERY_DUPLICATE = Rows(
    "UPDATE deliveries d SET duplicates = d.duplicates + 1, last_duplicate_at = v.at FROM {rows}"
    " WHERE d.delivery_id = v.delivery_id AND d.app_id = v.app_id",
    delivery_id="text", app_id="int8", at="timestamptz",
)


@handles(m.DeliveryAccepted)
def delivery_accepted(w: Writer, env: Envelope) -> None:
    d: m.DeliveryAccepted = env.data  # type: ignore[assignment]
    body, encoding = _storable_body(d.body, d.body_encoding)
    w.rows(
        DELIVERY_ACCEPTED, delivery_id=d.delivery_id, app_id=d.app_id, source=d.source, route=d.route,
        event=d.event, verification=d.verification, received_at=d.received_at, outcome=d.outcome, reason=d.reason,
        headers=Jsonb(d.headers), body=body, body_encoding=encoding, event_id=env.id,
        correlation_id=env.correlationid,
    )
    if d.verification == "token":
        w.rows(WEBHOOK_USED, app_id=d.app_id, at=d.received_at)
    if d.hook_id:
        w.rows(HOOK_USED, hook_id=d.hook_id, at=d.received_at)


@handles(m.DeliveryDuplicate)
def delivery_duplicate(w: Writer, env: Envelope) -> None:
    d: m.DeliveryDuplicate = env.data  # type: ignore[assignment]
    w.rows(DELIVERY_DUPLICATE, delivery_id=d.delivery_id, app_id=d.app_id, at=d.received_at)


# ----------------------------------------------------------------------------------- builds

BUILD_QUEUED = Rows(
    "INSERT INTO builds (app_id, number, status, commit_sha, commit_message, commit_author, ref, repo_url,"
    " delivery_id, queued_at, correlation_id)"
    " SELECT app_id, number, 'queued', commit_sha, commit_message, commit_author, ref, repo_url, delivery_id, at,"
    " correlation_id FROM {rows}"
    " ON CONFLICT (app_id, number) DO UPDATE SET commit_sha = excluded.commit_sha,"
    " commit_message = excluded.commit_message, commit_author = excluded.commit_author, ref = excluded.ref,"
    " repo_url = excluded.repo_url, delivery_id = excluded.delivery_id, queued_at = excluded.queued_at,"
    " correlation_id = excluded.correlation_id",
    app_id="int8", number="int4", commit_sha="text", commit_message="text", commit_author="text", ref="text",
    repo_url="text", delivery_id="text", at="timestamptz", correlation_id="text",
)
BUILD_STARTED = Rows(
    "INSERT INTO builds (app_id, number, status, commit_sha, started_at, log_path, correlation_id)"
    " SELECT app_id, number, 'running', commit_sha, at, log_path, correlation_id FROM {rows}"
    " ON CONFLICT (app_id, number) DO UPDATE SET status = 'running', started_at = excluded.started_at,"
    " log_path = excluded.log_path",
    app_id="int8", number="int4", commit_sha="text", at="timestamptz", log_path="text", correlation_id="text",
)
BUILD_FINISHED = Rows(
    "INSERT INTO builds (app_id, number, status, commit_sha, finished_at, duration, exit_code, image, image_id,"
    " tags, log, log_path, correlation_id)"
    " SELECT app_id, number, status, commit_sha, at, duration, exit_code, image, image_id, tags, log, log_path,"
    " correlation_id FROM {rows}"
    " ON CONFLICT (app_id, number) DO UPDATE SET status = excluded.status, finished_at = excluded.finished_at,"
    " duration = excluded.duration, exit_code = excluded.exit_code, image = excluded.image,"
    " image_id = excluded.image_id, tags = excluded.tags, log = excluded.log, log_path = excluded.log_path",
    app_id="int8", number="int4", status="text", commit_sha="text", at="timestamptz", duration="float8",
    exit_code="int4", image="text", image_id="text", tags="jsonb", log="text", log_path="text",
    correlation_id="text",
)


@handles(m.BuildQueued)
def build_queued(w: Writer, env: Envelope) -> None:
    d: m.BuildQueued = env.data  # type: ignore[assignment]
    w.rows(
        BUILD_QUEUED, app_id=d.app_id, number=d.build, commit_sha=d.commit, commit_message=d.message,
        commit_author=d.author, ref=d.ref, repo_url=d.repo_url, delivery_id=d.delivery_id, at=env.time,
        correlation_id=env.correlationid,
    )


@handles(m.BuildStarted)
def build_started(w: Writer, env: Envelope) -> None:
    d: m.BuildStarted = env.data  # type: ignore[assignment]
    w.rows(BUILD_STARTED, app_id=d.app_id, number=d.build, commit_sha=d.commit, at=env.time, log_path=d.log_path,
           correlation_id=env.correlationid)


@handles(m.BuildFinished)
def build_finished(w: Writer, env: Envelope) -> None:
    d: m.BuildFinished = env.data  # type: ignore[assignment]
    w.rows(
        BUILD_FINISHED, app_id=d.app_id, number=d.build, status=d.status, commit_sha=d.commit, at=env.time,
        duration=d.duration, exit_code=d.exit_code, image=d.tags[0] if d.tags else (d.image_id or None),
        image_id=d.image_id or None, tags=Jsonb(d.tags), log=d.log, log_path=d.log_path,
        correlation_id=env.correlationid,
    )


# --------------------------------------------------------------------------------- releases

DEPLOY_REQUESTED = Rows(
    "INSERT INTO releases (app_id, revision, status, image, commit_sha, trigger, build, cause, requested_by,"
    " requested_at, correlation_id)"
    " SELECT app_id, revision, 'requested', image, commit_sha, trigger, build, cause, requested_by, at,"
    " correlation_id FROM {rows}"
    " ON CONFLICT (app_id, revision) DO UPDATE SET image = excluded.image, commit_sha = excluded.commit_sha,"
    " trigger = excluded.trigger, build = excluded.build, cause = excluded.cause,"
    " requested_by = excluded.requested_by, requested_at = excluded.requested_at,"
    " correlation_id = excluded.correlation_id",
    app_id="int8", revision="int4", image="text", commit_sha="text", trigger="text", build="int4", cause="text",
    requested_by="text", at="timestamptz", correlation_id="text",
)
DEPLOY_SUPERSEDED = Rows(
    "UPDATE releases r SET status = 'superseded', superseded_by = v.superseded_by, finished_at = v.at"
    " FROM {rows} WHERE r.app_id = v.app_id AND r.revision = v.revision",
    app_id="int8", revision="int4", superseded_by="int4", at="timestamptz",
)
DEPLOY_STARTED = Rows(
    "UPDATE releases r SET status = 'started', started_at = v.at, log_path = v.log_path"
    " FROM {rows} WHERE r.app_id = v.app_id AND r.revision = v.revision",
    app_id="int8", revision="int4", at="timestamptz", log_path="text",
)
RELEASE_REPLACED = Rows(
    "UPDATE releases r SET current = false, status = 'replaced', live_until = v.at"
    " FROM {rows} WHERE r.app_id = v.app_id AND r.current AND r.revision <> v.revision",
    app_id="int8", revision="int4", at="timestamptz",
)
RELEASE_DEPLOYED = Rows(
    "INSERT INTO releases (app_id, revision, status, image, commit_sha, finished_at, duration, instances, url,"
    " current, live_from, correlation_id)"
    " SELECT app_id, revision, 'deployed', image, commit_sha, at, duration, instances, url, true, at,"
    " correlation_id FROM {rows}"
    " ON CONFLICT (app_id, revision) DO UPDATE SET status = 'deployed', image = excluded.image,"
    " commit_sha = excluded.commit_sha, finished_at = excluded.finished_at, duration = excluded.duration,"
    " instances = excluded.instances, url = excluded.url, current = true,"
    " live_from = coalesce(releases.live_from, excluded.live_from), live_until = NULL",
    app_id="int8", revision="int4", image="text", commit_sha="text", at="timestamptz", duration="float8",
    instances="jsonb", url="text", correlation_id="text",
)
APP_DEPLOYED = Rows(
    "UPDATE apps a SET current_revision = v.revision, url = coalesce(v.url, a.url) FROM {rows}"
    " WHERE a.app_id = v.app_id",
    app_id="int8", revision="int4", url="text",
)
DEPLOY_FAILED = Rows(
    "UPDATE releases r SET status = 'failed', failed_step = v.step, failure_reason = v.reason, finished_at = v.at"
    " FROM {rows} WHERE r.app_id = v.app_id AND r.revision = v.revision AND NOT r.current",
    app_id="int8", revision="int4", step="text", reason="text", at="timestamptz",
)


@handles(m.DeployRequested)
def deploy_requested(w: Writer, env: Envelope) -> None:
    d: m.DeployRequested = env.data  # type: ignore[assignment]
    w.rows(
        DEPLOY_REQUESTED, app_id=d.app_id, revision=d.revision, image=d.image, commit_sha=d.commit,
        trigger=d.trigger, build=d.build, cause=d.cause, requested_by=d.requested_by, at=env.time,
        correlation_id=env.correlationid,
    )


@handles(m.DeploySuperseded)
def deploy_superseded(w: Writer, env: Envelope) -> None:
    d: m.DeploySuperseded = env.data  # type: ignore[assignment]
    w.rows(DEPLOY_SUPERSEDED, app_id=d.app_id, revision=d.revision, superseded_by=d.superseded_by, at=env.time)


@handles(m.DeployStarted)
def deploy_started(w: Writer, env: Envelope) -> None:
    d: m.DeployStarted = env.data  # type: ignore[assignment]
    w.rows(DEPLOY_STARTED, app_id=d.app_id, revision=d.revision, at=env.time, log_path=d.log_path)


@handles(m.Deployed)
def deployed(w: Writer, env: Envelope) -> None:
    """The new revision becomes current; the one it replaces stops being live at the same instant."""
    d: m.Deployed = env.data  # type: ignore[assignment]
    w.rows(RELEASE_REPLACED, app_id=d.app_id, revision=d.revision, at=env.time)
    w.rows(
        RELEASE_DEPLOYED, app_id=d.app_id, revision=d.revision, image=d.image, commit_sha=d.commit, at=env.time,
        duration=d.duration, instances=Jsonb(d.instances), url=d.url or None, correlation_id=env.correlationid,
    )
    w.rows(APP_DEPLOYED, app_id=d.app_id, revision=d.revision, url=d.url or None)


@handles(m.DeployFailed)
def deploy_failed(w: Writer, env: Envelope) -> None:
    d: m.DeployFailed = env.data  # type: ignore[assignment]
    w.rows(DEPLOY_FAILED, app_id=d.app_id, revision=d.revision, step=d.step, reason=d.reason, at=env.time)


# ------------------------------------------------------------------------------------- jobs

JOB_REQUESTED = Rows(
    "INSERT INTO jobs (app_id, job, status, image, env, cause, requested_at, correlation_id)"
    " SELECT app_id, job, 'requested', image, env, cause, at, correlation_id FROM {rows}"
    " ON CONFLICT (app_id, job) DO UPDATE SET image = excluded.image, env = excluded.env, cause = excluded.cause,"
    " requested_at = excluded.requested_at, correlation_id = excluded.correlation_id",
    app_id="int8", job="int4", image="text", env="jsonb", cause="text", at="timestamptz", correlation_id="text",
)
JOB_FINISHED = Rows(
    "INSERT INTO jobs (app_id, job, status, exit_code, log, duration, finished_at, correlation_id)"
    " SELECT app_id, job, status, exit_code, log, duration, at, correlation_id FROM {rows}"
    " ON CONFLICT (app_id, job) DO UPDATE SET status = excluded.status, exit_code = excluded.exit_code,"
    " log = excluded.log, duration = excluded.duration, finished_at = excluded.finished_at",
    app_id="int8", job="int4", status="text", exit_code="int4", log="text", duration="float8", at="timestamptz",
    correlation_id="text",
)


@handles(m.JobRequested)
def job_requested(w: Writer, env: Envelope) -> None:
    d: m.JobRequested = env.data  # type: ignore[assignment]
    w.rows(JOB_REQUESTED, app_id=d.app_id, job=d.job, image=d.image, env=Jsonb(d.env), cause=d.cause, at=env.time,
           correlation_id=env.correlationid)


@handles(m.JobFinished)
def job_finished(w: Writer, env: Envelope) -> None:
    d: m.JobFinished = env.data  # type: ignore[assignment]
    w.rows(JOB_FINISHED, app_id=d.app_id, job=d.job, status="succeeded" if d.exit_code == 0 else "failed",
           exit_code=d.exit_code, log=d.log, duration=d.duration, at=env.time, correlation_id=env.correlationid)


# ---------------------------------------------------------------------------- subscriptions

SUBSCRIPTION_CREATED = Rows(
    "INSERT INTO subscriptions (subscription_id, app_id, url, events, description, status, created_at, updated_at)"
    " SELECT subscription_id, app_id, url, events, description, 'active', at, at FROM {rows}"
    " ON CONFLICT (subscription_id) DO NOTHING",
    subscription_id="text", app_id="int8", url="text", events="jsonb", description="text", at="timestamptz",
)
SUBSCRIPTION_UPDATED = Rows(
    "UPDATE subscriptions s SET url = coalesce(v.url, s.url), events = coalesce(v.events, s.events),"
    " description = coalesce(v.description, s.description), updated_at = v.at,"
    " status = CASE WHEN v.enable THEN 'active' ELSE s.status END,"
    " disabled_reason = CASE WHEN v.enable THEN NULL ELSE s.disabled_reason END"
    " FROM {rows} WHERE s.subscription_id = v.subscription_id AND s.app_id = v.app_id",
    subscription_id="text", app_id="int8", url="text", events="jsonb", description="text", enable="bool",
    at="timestamptz",
)
SUBSCRIPTION_DISABLED = Rows(
    "UPDATE subscriptions s SET status = 'disabled', disabled_reason = v.reason, updated_at = v.at FROM {rows}"
    " WHERE s.subscription_id = v.subscription_id AND s.app_id = v.app_id AND s.status <> 'deleted'",
    subscription_id="text", app_id="int8", reason="text", at="timestamptz",
)
SUBSCRIPTION_DELETED = Rows(
    "UPDATE subscriptions s SET status = 'deleted', updated_at = v.at FROM {rows}"
    " WHERE s.subscription_id = v.subscription_id AND s.app_id = v.app_id",
    subscription_id="text", app_id="int8", at="timestamptz",
)


@handles(m.SubscriptionCreated)
def subscription_created(w: Writer, env: Envelope) -> None:
    """The encrypted secret stays with the dispatcher: history needs where, not how to sign."""
    d: m.SubscriptionCreated = env.data  # type: ignore[assignment]
    w.rows(SUBSCRIPTION_CREATED, subscription_id=d.subscription_id, app_id=d.app_id, url=d.url,
           events=Jsonb(d.events), description=d.description, at=env.time)


@handles(m.SubscriptionUpdated)
def subscription_updated(w: Writer, env: Envelope) -> None:
    d: m.SubscriptionUpdated = env.data  # type: ignore[assignment]
    c = d.changes
    w.rows(
        SUBSCRIPTION_UPDATED, subscription_id=d.subscription_id, app_id=d.app_id,
        url=c["url"] if isinstance(c.get("url"), str) else None,
        events=Jsonb(c["events"]) if isinstance(c.get("events"), list) else None,
        description=c["description"] if isinstance(c.get("description"), str) else None,
        enable=c.get("enabled") is True, at=env.time,
    )


@handles(m.SubscriptionDisabled)
def subscription_disabled(w: Writer, env: Envelope) -> None:
    d: m.SubscriptionDisabled = env.data  # type: ignore[assignment]
    w.rows(SUBSCRIPTION_DISABLED, subscription_id=d.subscription_id, app_id=d.app_id, reason=d.reason, at=env.time)


@handles(m.SubscriptionDeleted)
def subscription_deleted(w: Writer, env: Envelope) -> None:
    d: m.SubscriptionDeleted = env.data  # type: ignore[assignment]
    w.rows(SUBSCRIPTION_DELETED, subscription_id=d.subscription_id, app_id=d.app_id, at=env.time)


# ------------------------------------------------------------------------------------ audit


def audit_data(env: Envelope) -> str:
    """The event's data as JSON text for the ``audit.data`` jsonb column (NUL replaced: jsonb rejects it)."""
    text = orjson.dumps(env.data.__dict__).decode()  # compact UTF-8, like the codec's
    if "\\u0000" in text:
        text = orjson.dumps(_without_nul(env.data.__dict__)).decode()
    return text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
