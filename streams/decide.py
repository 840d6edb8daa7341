"""What an inbound record means for one app: ``decide(state, envelope) -> [event | command]``.

Pure functions, no clock and no I/O: every output is a fully formed envelope whose id is
derived from its cause (``derive_id(cause_id, type, n)``) and whose time is the cause's time,
so deciding the same record from the same state again yields byte-identical records. That is
what makes the at-least-once replay after a crash harmless (see ``streams/agent.py``).

``step`` is the whole per-record transition the agent runs: skip what was already applied or
seen, decide, stamp each event with the app's next ``sequence``, and evolve the state.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from typing import Any, cast

from shipline.envelope import Envelope, derive_id
from shipline.messages import (
    AppDeleted,
    AppRegistered,
    AppUpdated,
    BuildFinished,
    BuildImage,
    BuildQueued,
    CreateDeployHook,
    CreateSubscription,
    DeleteApp,
    DeleteDeployHook,
    DeleteSubscription,
    DeliveryAccepted,
    DeliveryDuplicate,
    DeliveryReceived,
    Deployed,
    DeployFailed,
    DeployHookCreated,
    DeployHookDeleted,
    DeployRelease,
    DeployRequested,
    DeploySuperseded,
    EnableWebhookToken,
    JobRequested,
    Message,
    RegisterApp,
    RequestDeploy,
    RequestRejected,
    RetireApp,
    RunJob,
    SubscriptionCreated,
    SubscriptionDeleted,
    SubscriptionUpdated,
    UpdateApp,
    UpdateSubscription,
    WebhookTokenDisabled,
    WebhookTokenEnabled,
)
from streams.state import AppState, applied, at_position, evolve, remember_input

SOURCE = "shipline/streams"
GITHUB_SOURCES = ("github", "shipyard")
# Outcomes the deployer and dispatcher report; streams re-emits each as a sequenced event.
REPORT_TYPES = frozenset(
    {"build.started", "build.finished", "deploy.started", "deployed", "deploy.failed", "job.finished",
     "app.retired", "subscription.disabled"}
)


class Rejected(Exception):
    """A request or delivery that cannot be applied; the reason goes on the log."""


class Outputs:
    """Collects the outputs of one decision, numbering them for deterministic ids."""

    def __init__(self, cause: Envelope, correlationid: str) -> None:
        self.cause = cause
        self.correlationid = correlationid
        self.items: list[Envelope] = []

    def emit(self, message: Message, *, causationid: str | None = None) -> Envelope:
        env = Envelope(
            id=derive_id(self.cause.id, message.TYPE, len(self.items)),
            source=SOURCE,
            type=message.TYPE,
            time=self.cause.time,
            subject=str(message.app_id),
            data=message,
            correlationid=self.correlationid,
            causationid=causationid or self.cause.id,
        )
        self.items.append(env)
        return env

    def reemit(self, report: Envelope) -> Envelope:
        """A report from the deployer or dispatcher, as the event of record (sequenced later).

        It keeps the report's source, time, correlation and causation (the command it answers),
        so the audit chain on the events topic is unbroken; only the id is new, derived from
        the report's id.
        """
        env = dataclasses.replace(report, id=derive_id(report.id, report.type, len(self.items)), sequence=None)
        self.items.append(env)
        return env


def is_event(env: Envelope) -> bool:
    return env.data.KIND == "event"


# ------------------------------------------------------------------------------------ deploys


def _request_deploy(
    s: AppState, out: Outputs, *, image: str, commit: str, trigger: str, build: int | None, cause: str,
    requested_by: str = "", causationid: str | None = None,
) -> None:
    """deploy.requested, then either its deploy.release or (latest wins) it waits.

    At most one deploy.release per app is with the deployer; a newer request waits for it, and
    a request that was waiting when a newer one arrives is superseded by it.
    """
    revision = s.revision + 1
    requested = out.emit(
        DeployRequested(app_id=s.app_id, revision=revision, image=image, commit=commit, trigger=trigger,
                        build=build, cause=cause, requested_by=requested_by),
        causationid=causationid,
    )
    if s.in_flight is None:
        out.emit(DeployRelease(app_id=s.app_id, revision=revision, image=image, commit=commit,
                               app=s.app_payload(), build=build), causationid=requested.id)
    elif s.waiting is not None:
        out.emit(DeploySuperseded(app_id=s.app_id, revision=s.waiting, superseded_by=revision),
                 causationid=requested.id)


def _release_waiting(s: AppState, out: Outputs, finished: int, causationid: str) -> None:
    """The in-flight deploy ended: hand the waiting revision to the deployer (not for a deleted app:
    its app.retire is already queued behind the deploy that just ended)."""
    if s.in_flight != finished or s.waiting is None or s.deleted:
        return
    rev = s.revisions.get(s.waiting)
    if rev is None:  # pragma: no cover - revisions are kept far longer than anything waits
        return
    out.emit(DeployRelease(app_id=s.app_id, revision=s.waiting, image=rev.image, commit=rev.commit,
                           app=s.app_payload(), build=rev.build), causationid=causationid)


# ----------------------------------------------------------------------------------- requests


def _require_app(s: AppState) -> None:
    if s.deleted:
        raise Rejected(f"app {s.app_id} was deleted")
    if s.config is None:
        raise Rejected(f"app {s.app_id} is not registered")


def _register(s: AppState, env: Envelope, out: Outputs) -> None:
    r = cast(RegisterApp, env.data)
    if s.config is not None:
        raise Rejected(f"app {s.app_id} is already registered")
    out.emit(AppRegistered(
        app_id=r.app_id, name=r.name, namespace=r.namespace, repo_url=r.repo_url, branch=r.branch,
        image=r.image, kind=r.kind, strategy=r.strategy, command=r.command, port=r.port,
        health_path=r.health_path, build=r.build, allow_unsigned=r.allow_unsigned, requested_by=r.requested_by,
    ))


def _update(s: AppState, env: Envelope, out: Outputs) -> None:
    _require_app(s)
    r = cast(UpdateApp, env.data)
    out.emit(AppUpdated(app_id=s.app_id, changes=r.changes, requested_by=r.requested_by))


def _delete(s: AppState, env: Envelope, out: Outputs) -> None:
    """app.deleted, and app.retire for the deployer: on the commands topic under the app's key, it
    comes after every command already queued for the app (a deploy in flight finishes, then the app
    is taken down). Nothing is built or deployed for a deleted app afterwards: requests and
    deliveries are rejected, a build finishing later deploys nothing and a waiting deploy is never
    released."""
    _require_app(s)
    deleted = out.emit(AppDeleted(app_id=s.app_id, requested_by=cast(DeleteApp, env.data).requested_by))
    out.emit(RetireApp(app_id=s.app_id, app=s.app_payload()), causationid=deleted.id)


def _hook_create(s: AppState, env: Envelope, out: Outputs) -> None:
    _require_app(s)
    r = cast(CreateDeployHook, env.data)
    out.emit(DeployHookCreated(app_id=s.app_id, hook_id=r.hook_id, name=r.name, token_hash=r.token_hash,
                               token_prefix=r.token_prefix))


def _hook_delete(s: AppState, env: Envelope, out: Outputs) -> None:
    out.emit(DeployHookDeleted(app_id=s.app_id, hook_id=cast(DeleteDeployHook, env.data).hook_id))


def _token_enable(s: AppState, env: Envelope, out: Outputs) -> None:
    _require_app(s)
    r = cast(EnableWebhookToken, env.data)
    out.emit(WebhookTokenEnabled(app_id=s.app_id, token_hash=r.token_hash, token_prefix=r.token_prefix))


def _token_disable(s: AppState, env: Envelope, out: Outputs) -> None:
    out.emit(WebhookTokenDisabled(app_id=s.app_id))


def _subscription_create(s: AppState, env: Envelope, out: Outputs) -> None:
    r = cast(CreateSubscription, env.data)
    out.emit(SubscriptionCreated(app_id=r.app_id, subscription_id=r.subscription_id, url=r.url, events=r.events,
                                 secret_encrypted=r.secret_encrypted, description=r.description))


def _subscription_update(s: AppState, env: Envelope, out: Outputs) -> None:
    r = cast(UpdateSubscription, env.data)
    out.emit(SubscriptionUpdated(app_id=s.app_id, subscription_id=r.subscription_id, changes=r.changes))


def _subscription_delete(s: AppState, env: Envelope, out: Outputs) -> None:
    out.emit(SubscriptionDeleted(app_id=s.app_id, subscription_id=cast(DeleteSubscription, env.data).subscription_id))


def _deploy_request(s: AppState, env: Envelope, out: Outputs) -> None:
    """Manual deploy, rollback (to revision N, or the one live before the current) or promotion."""
    _require_app(s)
    r = cast(RequestDeploy, env.data)
    if r.trigger not in ("manual", "rollback", "promotion"):
        raise Rejected(f"unknown trigger {r.trigger!r}")
    image, commit, build = r.image, r.commit or "", None
    if r.trigger == "rollback":
        target = r.revision if r.revision is not None else s.previous_live()
        if target is None:
            raise Rejected("no earlier revision to roll back to")
        rev = s.revisions.get(target)
        if rev is None:
            raise Rejected(f"revision {target} is unknown")
        image, commit, build = rev.image, rev.commit, rev.build
    elif image is None and r.revision is not None:
        rev = s.revisions.get(r.revision)
        if rev is None:
            raise Rejected(f"revision {r.revision} is unknown")
        image, commit, build = rev.image, rev.commit, rev.build
    elif image is None and r.commit:
        found = [n for n, rev in s.revisions.items() if rev.commit == r.commit]
        if not found:
            raise Rejected(f"no image is known for commit {r.commit}: push it or give an image")
        rev = s.revisions[max(found)]
        image, commit, build = rev.image, rev.commit, rev.build
    elif image is None:
        if s.live is None or s.live not in s.revisions:
            raise Rejected("no image given and nothing is live to redeploy")
        rev = s.revisions[s.live]
        image, commit, build = rev.image, rev.commit, rev.build
    _request_deploy(s, out, image=image, commit=commit, trigger=r.trigger, build=build,
                    cause=r.request_id or env.id, requested_by=r.requested_by)


# --------------------------------------------------------------------------------- deliveries


class Ignored(Exception):
    """A delivery that is valid but starts nothing (tag push, other branch, other event)."""


def _delivery_id(env: Envelope) -> str:
    return cast(DeliveryReceived, env.data).delivery_id


def _body(d: Any) -> Any:
    try:
        raw = base64.b64decode(d.body, validate=True) if d.body_encoding == "base64" else d.body.encode()
        return json.loads(raw)
    except ValueError as exc:
        raise Rejected(f"body is not JSON: {exc}") from None


def _str_field(body: dict[str, Any], name: str, default: str = "") -> str:
    value = body.get(name, default)
    return value if isinstance(value, str) else default


def _github(s: AppState, env: Envelope, out: Outputs) -> tuple[str, str]:
    d = cast(DeliveryReceived, env.data)
    if d.event == "ping":
        return "ping", "GitHub ping: nothing to do"
    if d.event != "push":
        raise Ignored(f"GitHub event {d.event!r} starts nothing")
    body = _body(d)
    if not isinstance(body, dict):
        raise Rejected("push body must be a JSON object")
    ref = _str_field(body, "ref")
    if body.get("deleted") is True:
        raise Ignored(f"{ref} was deleted")
    if not ref.startswith("refs/heads/"):
        raise Ignored(f"{ref or 'a ref'} is not a branch")
    branch = ref.removeprefix("refs/heads/")
    tracked = (s.config or {}).get("branch") or "main"
    if branch != tracked:
        raise Ignored(f"branch {branch} is not tracked (tracking {tracked})")
    head: dict[str, Any] = body["head_commit"] if isinstance(body.get("head_commit"), dict) else {}
    sha = _str_field(head, "id") or _str_field(body, "after")
    if not sha or set(sha) == {"0"}:
        raise Ignored("push has no head commit")
    author: dict[str, Any] = head["author"] if isinstance(head.get("author"), dict) else {}
    repo: dict[str, Any] = body["repository"] if isinstance(body.get("repository"), dict) else {}
    repo_url = (s.config or {}).get("repo_url") or _str_field(repo, "clone_url")
    if not repo_url:
        raise Rejected("the app has no repository URL and the push names none")
    build = s.builds + 1
    queued = out.emit(BuildQueued(
        app_id=s.app_id, build=build, commit=sha, message=_str_field(head, "message"),
        author=_str_field(author, "name") or _str_field(author, "username") or _str_field(author, "email"),
        ref=ref, delivery_id=d.delivery_id, repo_url=repo_url,
    ))
    out.emit(BuildImage(app_id=s.app_id, build=build, commit=sha, repo_url=repo_url, app=s.app_payload()),
             causationid=queued.id)
    return "queued", f"build {build} queued for {sha[:12]}"


def _skipper(s: AppState, env: Envelope, out: Outputs) -> tuple[str, str]:
    body = _body(env.data)
    if not isinstance(body, dict) or not isinstance(body.get("image"), str) or not body["image"]:
        raise Rejected("body needs 'image' (a full image reference)")
    image = body["image"]
    _request_deploy(s, out, image=image, commit=_str_field(body, "commit"), trigger="webhook", build=None,
                    cause=_delivery_id(env))
    return "queued", f"revision {s.revision + 1} requested for {image}"


def _shipmight(s: AppState, env: Envelope, out: Outputs) -> tuple[str, str]:
    body = _body(env.data)
    if not isinstance(body, dict):
        raise Rejected("body must be a JSON object")
    config = s.config or {}
    if config.get("kind") == "job" or cast(DeliveryReceived, env.data).event == "job":
        return _shipmight_job(s, env, out, body)
    tag = body.get("imageTag")
    if not isinstance(tag, str) or not tag:
        raise Rejected("body needs 'imageTag'")
    repository = config.get("image")
    if not repository:
        raise Rejected("the app has no image repository to add the tag to")
    image = f"{repository}:{tag}"
    _request_deploy(s, out, image=image, commit="", trigger="webhook", build=None, cause=_delivery_id(env))
    return "queued", f"revision {s.revision + 1} requested for {image}"


def _shipmight_job(s: AppState, env: Envelope, out: Outputs, body: dict[str, Any]) -> tuple[str, str]:
    variables = body.get("instanceEnvironmentVariables", [])
    if not isinstance(variables, list) or not all(
        isinstance(v, dict) and isinstance(v.get("name"), str) and v["name"] and isinstance(v.get("value"), str)
        for v in variables
    ):
        raise Rejected("'instanceEnvironmentVariables' must be a list of {name, value} strings")
    live = s.revisions.get(s.live) if s.live is not None else None
    image = live.image if live is not None else (s.config or {}).get("image")
    if not image:
        raise Rejected("the job app has no image")
    env_vars = {v["name"]: v["value"] for v in variables}
    job = s.jobs + 1
    requested = out.emit(JobRequested(app_id=s.app_id, job=job, image=image, env=env_vars, cause=_delivery_id(env)))
    out.emit(RunJob(app_id=s.app_id, job=job, image=image, env=env_vars, app=s.app_payload()),
             causationid=requested.id)
    return "queued", f"job {job} requested"


# Each returns (outcome, reason) and emits what the delivery starts.
DELIVERY_HANDLERS: dict[str, Callable[[AppState, Envelope, Outputs], tuple[str, str]]] = {
    "github": _github,
    "shipyard": _github,
    "skipper": _skipper,
    "shipmight": _shipmight,
}


def _delivery(s: AppState, env: Envelope, out: Outputs) -> None:
    """Every delivery gets its audit copy (delivery.accepted, with what it caused); a
    redelivery of an id seen before gets only delivery.duplicate."""
    d = cast(DeliveryReceived, env.data)
    if d.delivery_id in s.deliveries:
        out.emit(DeliveryDuplicate(app_id=s.app_id, delivery_id=d.delivery_id, received_at=d.received_at))
        return
    caused = Outputs(env, out.correlationid)
    try:
        _require_app(s)
        handler = DELIVERY_HANDLERS.get(d.source)
        if handler is None:
            raise Rejected(f"unknown delivery source {d.source!r}")
        outcome, reason = handler(s, env, caused)
    except Ignored as exc:
        outcome, reason, caused.items = "ignored", str(exc), []
    except Rejected as exc:
        outcome, reason, caused.items = "rejected", str(exc), []
    out.emit(DeliveryAccepted(
        app_id=s.app_id, delivery_id=d.delivery_id, source=d.source, route=d.route, event=d.event,
        verification=d.verification, received_at=d.received_at, outcome=outcome, reason=reason,
        headers=d.headers, body=d.body, body_encoding=d.body_encoding, hook_id=d.hook_id,
    ))
    # The caused records keep the ids they were derived with (distinct from the audit copy's,
    # since a derived id includes the type): the audit copy comes first in the log.
    out.items.extend(caused.items)


# ------------------------------------------------------------------------------------ reports


def _report(s: AppState, env: Envelope, out: Outputs) -> None:
    event = out.reemit(env)
    if env.type == "build.finished":
        d = cast(BuildFinished, env.data)
        if d.status == "succeeded" and d.build == s.builds and s.registered:
            _request_deploy(s, out, image=d.tags[0] if d.tags else d.image_id, commit=d.commit, trigger="webhook",
                            build=d.build, cause=env.correlationid, causationid=event.id)
    elif env.type in ("deployed", "deploy.failed"):
        _release_waiting(s, out, cast(Deployed | DeployFailed, env.data).revision, event.id)


REQUEST_HANDLERS: dict[str, Callable[[AppState, Envelope, Outputs], None]] = {
    "app.register": _register,
    "app.update": _update,
    "app.delete": _delete,
    "deploy_hook.create": _hook_create,
    "deploy_hook.delete": _hook_delete,
    "webhook_token.enable": _token_enable,
    "webhook_token.disable": _token_disable,
    "deploy.request": _deploy_request,
    "subscription.create": _subscription_create,
    "subscription.update": _subscription_update,
    "subscription.delete": _subscription_delete,
    "delivery.received": _delivery,
}


def correlation_of(env: Envelope) -> str:
    """The originating delivery id or request id everything caused by ``env`` carries."""
    d = env.data
    if isinstance(d, DeliveryReceived):
        return d.delivery_id
    request_id = getattr(d, "request_id", "")
    if env.data.KIND == "request":
        return request_id or env.id
    return env.correlationid


def decide(state: AppState, env: Envelope) -> list[Envelope]:
    """The events and commands one inbound record (request or report) leads to, unsequenced."""
    out = Outputs(env, correlation_of(env))
    if env.type in REPORT_TYPES:
        _report(state, env, out)
        return out.items
    handler = REQUEST_HANDLERS.get(env.type)
    if handler is None:
        raise ValueError(f"streams does not consume {env.type!r} records")
    try:
        handler(state, env, out)
    except Rejected as exc:
        out.items = []
        out.emit(RequestRejected(app_id=state.app_id, request_type=env.type,
                                 request_id=getattr(env.data, "request_id", "") or env.id, reason=str(exc)))
    return out.items


def _sequenced(env: Envelope, sequence: int) -> Envelope:
    """``env.with_sequence`` without ``dataclasses.replace``'s re-validation (hot path)."""
    new = object.__new__(Envelope)
    new.__dict__.update(env.__dict__)
    new.__dict__["sequence"] = sequence
    return new


def input_id(env: Envelope) -> str | None:
    """What identifies a request or report across producer retries (deliveries dedupe by
    delivery id inside ``decide`` instead, since they must leave an audit record)."""
    if env.type == "delivery.received":
        return None
    return getattr(env.data, "request_id", "") or env.id


def step(state: AppState, env: Envelope, offset: int | None = None) -> tuple[AppState, list[Envelope]]:
    """Apply one input record: the new state and the outputs to publish (events sequenced).

    ``offset`` locates the record in the input topic: a record at or below the offset the state
    already applied was decided before a crash, and is skipped (its outputs were published
    before that state was written).
    """
    if offset is not None and offset <= applied(state):
        return state, []
    key = input_id(env)
    if key is not None and key in state.inputs:
        outputs: list[Envelope] = []
    else:
        outputs = []
        for item in decide(state, env):
            if is_event(item):
                item = _sequenced(item, state.sequence + 1)
                state = evolve(state, item)
            outputs.append(item)
        if key is not None:
            state = remember_input(state, key)
    if offset is not None:
        state = at_position(state, offset)
    return state, outputs
