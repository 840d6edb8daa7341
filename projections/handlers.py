"""Fold functions: one ``apply(cursor, envelope)`` per event type, in ``HANDLERS``.

Each function turns one event into writes on the projection tables and nothing else: no reads
(the batch runs them in a pipeline), no clock, no ids of its own, so replaying the log gives the
same rows. Tables are named unqualified; the caller's ``search_path`` picks the schema (the live
one, or the fresh one a rebuild fills). Upserts keep a fold total over logs that start midway.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from psycopg import Cursor
from psycopg.types.json import Jsonb

from shipline import messages as m
from shipline.envelope import Envelope

Handler = Callable[[Cursor[Any], Envelope], None]
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


@handles(m.AppRegistered)
def app_registered(cur: Cursor[Any], env: Envelope) -> None:
    d: m.AppRegistered = env.data  # type: ignore[assignment]
    cur.execute(
        "INSERT INTO apps (app_id, name, namespace, repo_url, branch, image, kind, strategy, command, port,"
        " health_path, build, allow_unsigned, created_by, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (app_id) DO UPDATE SET name = excluded.name, namespace = excluded.namespace,"
        " repo_url = excluded.repo_url, branch = excluded.branch, image = excluded.image, kind = excluded.kind,"
        " strategy = excluded.strategy, command = excluded.command, port = excluded.port,"
        " health_path = excluded.health_path, build = excluded.build, allow_unsigned = excluded.allow_unsigned,"
        " created_by = excluded.created_by, created_at = excluded.created_at, updated_at = excluded.updated_at,"
        " deleted = false, deleted_at = NULL",
        (
            d.app_id, d.name, d.namespace, d.repo_url, d.branch, d.image, d.kind, d.strategy, d.command, d.port,
            d.health_path, _json(d.build), d.allow_unsigned, d.requested_by, env.time, env.time,
        ),
    )


@handles(m.AppUpdated)
def app_updated(cur: Cursor[Any], env: Envelope) -> None:
    d: m.AppUpdated = env.data  # type: ignore[assignment]
    known = [k for k in APP_COLUMNS if k in d.changes]
    extra = {k: v for k, v in d.changes.items() if k not in APP_COLUMNS}
    sets = "".join(f", {k} = %s" for k in known)  # column names come from APP_COLUMNS only
    values = [_json(d.changes[k]) if k in JSON_COLUMNS else d.changes[k] for k in known]
    cur.execute(
        f"UPDATE apps SET updated_at = %s, extra = extra || %s{sets} WHERE app_id = %s",
        (env.time, Jsonb(extra), *values, d.app_id),
    )


@handles(m.AppDeleted)
def app_deleted(cur: Cursor[Any], env: Envelope) -> None:
    cur.execute(
        "UPDATE releases SET current = false, live_until = %s WHERE app_id = %s AND current",
        (env.time, env.app_id),
    )
    cur.execute(
        "UPDATE apps SET deleted = true, deleted_at = %s, updated_at = %s, current_revision = NULL"
        " WHERE app_id = %s",
        (env.time, env.time, env.app_id),
    )


@handles(m.WebhookTokenEnabled)
def webhook_token_enabled(cur: Cursor[Any], env: Envelope) -> None:
    d: m.WebhookTokenEnabled = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE apps SET webhook_enabled = true, webhook_token_hash = %s, webhook_token_prefix = %s,"
        " webhook_enabled_at = %s, webhook_last_used_at = NULL WHERE app_id = %s",
        (d.token_hash, d.token_prefix, env.time, d.app_id),
    )


@handles(m.WebhookTokenDisabled)
def webhook_token_disabled(cur: Cursor[Any], env: Envelope) -> None:
    cur.execute(
        "UPDATE apps SET webhook_enabled = false, webhook_token_hash = NULL, webhook_token_prefix = NULL"
        " WHERE app_id = %s",
        (env.app_id,),
    )


@handles(m.DeployHookCreated)
def deploy_hook_created(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeployHookCreated = env.data  # type: ignore[assignment]
    cur.execute(
        "INSERT INTO deploy_hooks (hook_id, app_id, name, token_hash, token_prefix, created_at)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (hook_id) DO NOTHING",
        (d.hook_id, d.app_id, d.name, d.token_hash, d.token_prefix, env.time),
    )


@handles(m.DeployHookDeleted)
def deploy_hook_deleted(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeployHookDeleted = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE deploy_hooks SET deleted = true, deleted_at = %s WHERE hook_id = %s AND NOT deleted",
        (env.time, d.hook_id),
    )


# ------------------------------------------------------------------------------- deliveries


def _storable_body(body: str, encoding: str) -> tuple[str, str]:
    """PostgreSQL text cannot hold NUL; such a body is kept exactly, as base64."""
    if "\x00" in body and encoding == "utf8":
        return base64.b64encode(body.encode()).decode(), "base64"
    return body, encoding


@handles(m.DeliveryAccepted)
def delivery_accepted(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeliveryAccepted = env.data  # type: ignore[assignment]
    body, encoding = _storable_body(d.body, d.body_encoding)
    cur.execute(
        "INSERT INTO deliveries (delivery_id, app_id, source, route, event, verification, received_at, outcome,"
        " reason, headers, body, body_encoding, event_id, correlation_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (delivery_id, app_id) DO NOTHING",
        (
            d.delivery_id, d.app_id, d.source, d.route, d.event, d.verification, d.received_at, d.outcome,
            d.reason, Jsonb(d.headers), body, encoding, env.id, env.correlationid,
        ),
    )
    if d.verification == "token":
        cur.execute(
            "UPDATE apps SET webhook_last_used_at = %s WHERE app_id = %s AND webhook_enabled",
            (d.received_at, d.app_id),
        )


@handles(m.DeliveryDuplicate)
def delivery_duplicate(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeliveryDuplicate = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE deliveries SET duplicates = duplicates + 1, last_duplicate_at = %s"
        " WHERE delivery_id = %s AND app_id = %s",
        (d.received_at, d.delivery_id, d.app_id),
    )


# ----------------------------------------------------------------------------------- builds


@handles(m.BuildQueued)
def build_queued(cur: Cursor[Any], env: Envelope) -> None:
    d: m.BuildQueued = env.data  # type: ignore[assignment]
    cur.execute(
        "INSERT INTO builds (app_id, number, status, commit_sha, commit_message, commit_author, ref, repo_url,"
        " delivery_id, queued_at, correlation_id) VALUES (%s, %s, 'queued', %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (app_id, number) DO UPDATE SET commit_sha = excluded.commit_sha,"
        " commit_message = excluded.commit_message, commit_author = excluded.commit_author, ref = excluded.ref,"
        " repo_url = excluded.repo_url, delivery_id = excluded.delivery_id, queued_at = excluded.queued_at,"
        " correlation_id = excluded.correlation_id",
        (
            d.app_id, d.build, d.commit, d.message, d.author, d.ref, d.repo_url, d.delivery_id, env.time,
            env.correlationid,
        ),
    )


@handles(m.BuildStarted)
def build_started(cur: Cursor[Any], env: Envelope) -> None:
    d: m.BuildStarted = env.data  # type: ignore[assignment]
    cur.execute(
        "INSERT INTO builds (app_id, number, status, commit_sha, started_at, log_path, correlation_id)"
        " VALUES (%s, %s, 'running', %s, %s, %s, %s)"
        " ON CONFLICT (app_id, number) DO UPDATE SET status = 'running', started_at = excluded.started_at,"
        " log_path = excluded.log_path",
        (d.app_id, d.build, d.commit, env.time, d.log_path, env.correlationid),
    )


@handles(m.BuildFinished)
def build_finished(cur: Cursor[Any], env: Envelope) -> None:
    d: m.BuildFinished = env.data  # type: ignore[assignment]
    image = d.tags[0] if d.tags else (d.image_id or None)
    cur.execute(
        "INSERT INTO builds (app_id, number, status, commit_sha, finished_at, duration, exit_code, image, image_id,"
        " tags, log, log_path, correlation_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (app_id, number) DO UPDATE SET status = excluded.status, finished_at = excluded.finished_at,"
        " duration = excluded.duration, exit_code = excluded.exit_code, image = excluded.image,"
        " image_id = excluded.image_id, tags = excluded.tags, log = excluded.log, log_path = excluded.log_path",
        (
            d.app_id, d.build, d.status, d.commit, env.time, d.duration, d.exit_code, image, d.image_id or None,
            Jsonb(d.tags), d.log, d.log_path, env.correlationid,
        ),
    )


# --------------------------------------------------------------------------------- releases


@handles(m.DeployRequested)
def deploy_requested(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeployRequested = env.data  # type: ignore[assignment]
    cur.execute(
        "INSERT INTO releases (app_id, revision, status, image, commit_sha, trigger, build, cause, requested_by,"
        " requested_at, correlation_id) VALUES (%s, %s, 'requested', %s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (app_id, revision) DO UPDATE SET image = excluded.image, commit_sha = excluded.commit_sha,"
        " trigger = excluded.trigger, build = excluded.build, cause = excluded.cause,"
        " requested_by = excluded.requested_by, requested_at = excluded.requested_at,"
        " correlation_id = excluded.correlation_id",
        (
            d.app_id, d.revision, d.image, d.commit, d.trigger, d.build, d.cause, d.requested_by, env.time,
            env.correlationid,
        ),
    )


@handles(m.DeploySuperseded)
def deploy_superseded(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeploySuperseded = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE releases SET status = 'superseded', superseded_by = %s, finished_at = %s"
        " WHERE app_id = %s AND revision = %s",
        (d.superseded_by, env.time, d.app_id, d.revision),
    )


@handles(m.DeployStarted)
def deploy_started(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeployStarted = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE releases SET status = 'started', started_at = %s, log_path = %s WHERE app_id = %s AND revision = %s",
        (env.time, d.log_path, d.app_id, d.revision),
    )


@handles(m.Deployed)
def deployed(cur: Cursor[Any], env: Envelope) -> None:
    """The new revision becomes current; the one it replaces stops being live at the same instant."""
    d: m.Deployed = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE releases SET current = false, status = 'replaced', live_until = %s"
        " WHERE app_id = %s AND current AND revision <> %s",
        (env.time, d.app_id, d.revision),
    )
    cur.execute(
        "INSERT INTO releases (app_id, revision, status, image, commit_sha, finished_at, duration, instances, url,"
        " current, live_from, correlation_id) VALUES (%s, %s, 'deployed', %s, %s, %s, %s, %s, %s, true, %s, %s)"
        " ON CONFLICT (app_id, revision) DO UPDATE SET status = 'deployed', image = excluded.image,"
        " commit_sha = excluded.commit_sha, finished_at = excluded.finished_at, duration = excluded.duration,"
        " instances = excluded.instances, url = excluded.url, current = true,"
        " live_from = coalesce(releases.live_from, excluded.live_from), live_until = NULL",
        (
            d.app_id, d.revision, d.image, d.commit, env.time, d.duration, Jsonb(d.instances), d.url or None,
            env.time, env.correlationid,
        ),
    )
    cur.execute(
        "UPDATE apps SET current_revision = %s, url = coalesce(%s, url) WHERE app_id = %s",
        (d.revision, d.url or None, d.app_id),
    )


@handles(m.DeployFailed)
def deploy_failed(cur: Cursor[Any], env: Envelope) -> None:
    d: m.DeployFailed = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE releases SET status = 'failed', failed_step = %s, failure_reason = %s, finished_at = %s"
        " WHERE app_id = %s AND revision = %s AND NOT current",
        (d.step, d.reason, env.time, d.app_id, d.revision),
    )


# ------------------------------------------------------------------------------------- jobs


@handles(m.JobRequested)
def job_requested(cur: Cursor[Any], env: Envelope) -> None:
    d: m.JobRequested = env.data  # type: ignore[assignment]
    cur.execute(
        "INSERT INTO jobs (app_id, job, status, image, env, cause, requested_at, correlation_id)"
        " VALUES (%s, %s, 'requested', %s, %s, %s, %s, %s) ON CONFLICT (app_id, job) DO UPDATE SET"
        " image = excluded.image, env = excluded.env, cause = excluded.cause, requested_at = excluded.requested_at,"
        " correlation_id = excluded.correlation_id",
        (d.app_id, d.job, d.image, Jsonb(d.env), d.cause, env.time, env.correlationid),
    )


@handles(m.JobFinished)
def job_finished(cur: Cursor[Any], env: Envelope) -> None:
    d: m.JobFinished = env.data  # type: ignore[assignment]
    status = "succeeded" if d.exit_code == 0 else "failed"
    cur.execute(
        "INSERT INTO jobs (app_id, job, status, exit_code, log, duration, finished_at, correlation_id)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (app_id, job) DO UPDATE SET status = excluded.status,"
        " exit_code = excluded.exit_code, log = excluded.log, duration = excluded.duration,"
        " finished_at = excluded.finished_at",
        (d.app_id, d.job, status, d.exit_code, d.log, d.duration, env.time, env.correlationid),
    )


# ---------------------------------------------------------------------------- subscriptions


@handles(m.SubscriptionCreated)
def subscription_created(cur: Cursor[Any], env: Envelope) -> None:
    """The encrypted secret stays with the dispatcher: history needs where, not how to sign."""
    d: m.SubscriptionCreated = env.data  # type: ignore[assignment]
    cur.execute(
        "INSERT INTO subscriptions (subscription_id, app_id, url, events, description, status, created_at,"
        " updated_at) VALUES (%s, %s, %s, %s, %s, 'active', %s, %s) ON CONFLICT (subscription_id) DO NOTHING",
        (d.subscription_id, d.app_id, d.url, Jsonb(d.events), d.description, env.time, env.time),
    )


@handles(m.SubscriptionUpdated)
def subscription_updated(cur: Cursor[Any], env: Envelope) -> None:
    d: m.SubscriptionUpdated = env.data  # type: ignore[assignment]
    c = d.changes
    cur.execute(
        "UPDATE subscriptions SET url = coalesce(%s, url), events = coalesce(%s, events),"
        " description = coalesce(%s, description), updated_at = %s,"
        " status = CASE WHEN %s::boolean THEN 'active' ELSE status END, disabled_reason ="
        " CASE WHEN %s::boolean THEN NULL ELSE disabled_reason END WHERE subscription_id = %s",
        (
            c.get("url") if isinstance(c.get("url"), str) else None,
            Jsonb(c["events"]) if isinstance(c.get("events"), list) else None,
            c.get("description") if isinstance(c.get("description"), str) else None,
            env.time, c.get("enabled") is True, c.get("enabled") is True, d.subscription_id,
        ),
    )


@handles(m.SubscriptionDisabled)
def subscription_disabled(cur: Cursor[Any], env: Envelope) -> None:
    d: m.SubscriptionDisabled = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE subscriptions SET status = 'disabled', disabled_reason = %s, updated_at = %s"
        " WHERE subscription_id = %s AND status <> 'deleted'",
        (d.reason, env.time, d.subscription_id),
    )


@handles(m.SubscriptionDeleted)
def subscription_deleted(cur: Cursor[Any], env: Envelope) -> None:
    d: m.SubscriptionDeleted = env.data  # type: ignore[assignment]
    cur.execute(
        "UPDATE subscriptions SET status = 'deleted', updated_at = %s WHERE subscription_id = %s",
        (env.time, d.subscription_id),
    )


# ------------------------------------------------------------------------------------ audit


def audit_data(env: Envelope) -> str:
    """The event's data as JSON text for the ``audit.data`` jsonb column (NUL replaced: jsonb rejects it)."""
    text = json.dumps(env.data.__dict__, separators=(",", ":"), ensure_ascii=False)
    if "\\u0000" in text:
        text = json.dumps(_without_nul(env.data.__dict__), separators=(",", ":"), ensure_ascii=False)
    return text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value
