"""Every message type on the wire: one frozen dataclass per CloudEvent ``type``.

Three families, named as cosmicpython names them:

* **requests** (imperative, topic ``inbound``, written by the ingress): what a webhook sender or
  an operator asked for. Streams decides what they mean.
* **events** (past tense, topic ``events``, written only by streams, which stamps the per-app
  ``sequence``): what happened. Outcomes the deployer and dispatcher observe travel as the same
  event types on the ``inbound`` topic first (as reports, without a sequence: one ordered input
  log per app), and streams re-stamps them.
* **commands** (imperative, topic ``commands``, written by streams): work for the deployer.

The JSON Schemas under ``schemas/`` are generated from these classes (``python -m
shipline.schemagen``); a test fails when they drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

REGISTRY: dict[str, type[Message]] = {}


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    KIND: ClassVar[str] = ""  # "request" | "event" | "command"
    VERSION: ClassVar[int] = 1

    app_id: int


def _register(type_name: str, kind: str):  # type: ignore[no-untyped-def]
    def wrap(cls: type[Message]) -> type[Message]:
        cls.TYPE = type_name
        cls.KIND = kind
        if type_name in REGISTRY:
            raise RuntimeError(f"duplicate message type {type_name}")
        REGISTRY[type_name] = cls
        return cls

    return wrap


def request(type_name: str):  # type: ignore[no-untyped-def]
    return _register(type_name, "request")


def event(type_name: str):  # type: ignore[no-untyped-def]
    return _register(type_name, "event")


def command(type_name: str):  # type: ignore[no-untyped-def]
    return _register(type_name, "command")


# ---------------------------------------------------------------------------------- requests


@request("delivery.received")
@dataclass(frozen=True)
class DeliveryReceived(Message):
    """One accepted inbound HTTP request, with the exact raw body for later re-verification."""

    delivery_id: str
    source: str  # github | shipyard | skipper | shipmight
    route: str
    event: str  # X-GitHub-Event, or "deploy" / "job" for token hooks
    headers: dict[str, str]
    body: str
    body_encoding: str  # utf8 | base64
    verification: str  # hmac | token | deploy_hook | unsigned
    received_at: str
    hook_id: str | None = None


@request("app.register")
@dataclass(frozen=True)
class RegisterApp(Message):
    name: str
    namespace: str
    repo_url: str | None = None
    branch: str = "main"
    image: str | None = None
    kind: str = "service"
    strategy: str = "docker"
    command: str | None = None
    port: int | None = None
    health_path: str = "/"
    build: dict[str, Any] | None = None
    allow_unsigned: bool = False
    secret_encrypted: str | None = None
    requested_by: str = "admin"
    request_id: str = ""


@request("app.update")
@dataclass(frozen=True)
class UpdateApp(Message):
    changes: dict[str, Any]
    requested_by: str = "admin"
    request_id: str = ""


@request("app.delete")
@dataclass(frozen=True)
class DeleteApp(Message):
    requested_by: str = "admin"
    request_id: str = ""


@request("deploy_hook.create")
@dataclass(frozen=True)
class CreateDeployHook(Message):
    hook_id: str
    name: str
    token_hash: str
    token_prefix: str
    request_id: str = ""


@request("deploy_hook.delete")
@dataclass(frozen=True)
class DeleteDeployHook(Message):
    hook_id: str
    request_id: str = ""


@request("webhook_token.enable")
@dataclass(frozen=True)
class EnableWebhookToken(Message):
    token_hash: str
    token_prefix: str
    request_id: str = ""


@request("webhook_token.disable")
@dataclass(frozen=True)
class DisableWebhookToken(Message):
    request_id: str = ""


@request("deploy.request")
@dataclass(frozen=True)
class RequestDeploy(Message):
    """Manual deploy, rollback (revision None = previous) or promotion asked through the API."""

    request_id: str
    trigger: str  # manual | rollback | promotion
    image: str | None = None
    commit: str | None = None
    revision: int | None = None
    requested_by: str = "admin"


@request("subscription.create")
@dataclass(frozen=True)
class CreateSubscription(Message):
    subscription_id: str
    url: str
    events: list[str]
    secret_encrypted: str
    description: str = ""
    request_id: str = ""


@request("subscription.update")
@dataclass(frozen=True)
class UpdateSubscription(Message):
    subscription_id: str
    changes: dict[str, Any]
    request_id: str = ""


@request("subscription.delete")
@dataclass(frozen=True)
class DeleteSubscription(Message):
    subscription_id: str
    request_id: str = ""


# ------------------------------------------------------------------------------------ events


@event("app.registered")
@dataclass(frozen=True)
class AppRegistered(Message):
    name: str
    namespace: str
    repo_url: str | None
    branch: str
    image: str | None
    kind: str
    strategy: str
    command: str | None
    port: int | None
    health_path: str
    build: dict[str, Any] | None
    allow_unsigned: bool
    requested_by: str


@event("app.updated")
@dataclass(frozen=True)
class AppUpdated(Message):
    changes: dict[str, Any]
    requested_by: str


@event("app.deleted")
@dataclass(frozen=True)
class AppDeleted(Message):
    requested_by: str


@event("deploy_hook.created")
@dataclass(frozen=True)
class DeployHookCreated(Message):
    hook_id: str
    name: str
    token_hash: str
    token_prefix: str


@event("deploy_hook.deleted")
@dataclass(frozen=True)
class DeployHookDeleted(Message):
    hook_id: str


@event("webhook_token.enabled")
@dataclass(frozen=True)
class WebhookTokenEnabled(Message):
    token_hash: str
    token_prefix: str


@event("webhook_token.disabled")
@dataclass(frozen=True)
class WebhookTokenDisabled(Message):
    pass


@event("delivery.accepted")
@dataclass(frozen=True)
class DeliveryAccepted(Message):
    """The audit copy of an inbound delivery and what streams made of it."""

    delivery_id: str
    source: str
    route: str
    event: str
    verification: str
    received_at: str
    outcome: str  # queued | ignored | ping | rejected
    reason: str
    headers: dict[str, str]
    body: str
    body_encoding: str
    hook_id: str | None = None  # the deploy hook whose token authenticated it


@event("delivery.duplicate")
@dataclass(frozen=True)
class DeliveryDuplicate(Message):
    delivery_id: str
    received_at: str


@event("build.queued")
@dataclass(frozen=True)
class BuildQueued(Message):
    build: int
    commit: str
    message: str
    author: str
    ref: str
    delivery_id: str
    repo_url: str


@event("build.started")
@dataclass(frozen=True)
class BuildStarted(Message):
    build: int
    commit: str
    log_path: str


@event("build.finished")
@dataclass(frozen=True)
class BuildFinished(Message):
    build: int
    commit: str
    status: str  # succeeded | failed | cancelled
    exit_code: int
    image_id: str
    tags: list[str]
    duration: float
    log: str
    log_path: str


@event("deploy.requested")
@dataclass(frozen=True)
class DeployRequested(Message):
    revision: int
    image: str
    commit: str
    trigger: str  # webhook | manual | rollback | promotion
    build: int | None = None
    cause: str = ""  # delivery id or request id
    requested_by: str = ""


@event("deploy.superseded")
@dataclass(frozen=True)
class DeploySuperseded(Message):
    revision: int
    superseded_by: int


@event("deploy.started")
@dataclass(frozen=True)
class DeployStarted(Message):
    revision: int
    log_path: str


@event("deployed")
@dataclass(frozen=True)
class Deployed(Message):
    revision: int
    image: str
    commit: str
    instances: list[str]
    duration: float
    url: str


@event("deploy.failed")
@dataclass(frozen=True)
class DeployFailed(Message):
    revision: int
    step: str
    reason: str


@event("app.retired")
@dataclass(frozen=True)
class AppRetired(Message):
    """The deployer took a deleted app down: its route is gone from the proxy and its instances stopped.

    ``stopped`` names the instances (containers or processes) that were running and were stopped;
    a retire that finds nothing running (a replay, an app never deployed) reports an empty list.
    """

    stopped: list[str]
    revision: int | None  # the release that was serving, if any
    url: str  # the proxy address that no longer serves the app ("" when it had none)


@event("job.requested")
@dataclass(frozen=True)
class JobRequested(Message):
    job: int
    image: str
    env: dict[str, str]
    cause: str


@event("job.finished")
@dataclass(frozen=True)
class JobFinished(Message):
    job: int
    exit_code: int
    log: str
    duration: float


@event("subscription.created")
@dataclass(frozen=True)
class SubscriptionCreated(Message):
    subscription_id: str
    url: str
    events: list[str]
    secret_encrypted: str
    description: str


@event("subscription.updated")
@dataclass(frozen=True)
class SubscriptionUpdated(Message):
    subscription_id: str
    changes: dict[str, Any]


@event("subscription.deleted")
@dataclass(frozen=True)
class SubscriptionDeleted(Message):
    subscription_id: str


@event("subscription.disabled")
@dataclass(frozen=True)
class SubscriptionDisabled(Message):
    subscription_id: str
    reason: str


@event("request.rejected")
@dataclass(frozen=True)
class RequestRejected(Message):
    """A management request streams could not apply (unknown app, nothing to roll back to...).

    Its correlationid is the request's ``request_id``, so a writer waiting for its request sees
    the refusal instead of waiting forever.
    """

    request_type: str
    request_id: str
    reason: str


# ---------------------------------------------------------------------------------- commands


@command("build.image")
@dataclass(frozen=True)
class BuildImage(Message):
    build: int
    commit: str
    repo_url: str
    app: dict[str, Any]  # the app's configuration when the build was queued


@command("deploy.release")
@dataclass(frozen=True)
class DeployRelease(Message):
    revision: int
    image: str
    commit: str
    app: dict[str, Any]
    build: int | None = None
    instances: int = 1


@command("job.run")
@dataclass(frozen=True)
class RunJob(Message):
    job: int
    image: str
    env: dict[str, str]
    app: dict[str, Any] = field(default_factory=dict)


@command("app.retire")
@dataclass(frozen=True)
class RetireApp(Message):
    """Take a deleted app down: remove its proxy route, stop every instance, forget its release."""

    app: dict[str, Any] = field(default_factory=dict)


def kinds(kind: str) -> dict[str, type[Message]]:
    return {t: c for t, c in REGISTRY.items() if c.KIND == kind}
