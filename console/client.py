"""The console's only door to Shipline: the public HTTP API, called with the admin token.

Every read and write the console makes goes through here, and every JSON shape the read API,
the ingress and outbound return is turned into the small frozen records below, so a change of
shape is a fix in this one module and the templates never see raw API documents.

The default transport (``InProcess``) calls the public Flask app's own routes through WSGI,
without a socket: the same routes, the same bearer-token check and the same JSON as a network
call, but a console page never waits for a second gunicorn worker to be free (two sync workers
each serving a console page that calls back into the server over loopback would deadlock).
``OverHttp`` makes the same calls with ``requests`` to a base URL (a console served elsewhere).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

# Statuses that mean "still moving": the page polls quickly while any is on screen.
RUNNING = frozenset({"queued", "pending", "requested", "started", "running", "building", "deploying",
                     "releasing", "in_progress", "scheduled", "retrying", "waiting"})


class ApiError(Exception):
    """The API answered with an error (``status`` 0: it could not be reached at all)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Reply:
    status: int
    doc: Any
    headers: Mapping[str, str]


class Transport(Protocol):
    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None) -> Reply: ...


class InProcess:
    """The public app's routes, called through WSGI in this process."""

    def __init__(self, app: Any, token: str, base_url: str) -> None:
        from werkzeug.test import Client

        self.client = Client(app, use_cookies=False)
        self.token = token
        self.base_url = base_url

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None) -> Reply:
        kwargs: dict[str, Any] = {"json": body} if body is not None else {}
        resp = self.client.open(path, method=method, query_string=dict(params or {}), base_url=self.base_url,
                                headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json"},
                                environ_base={"REMOTE_ADDR": "127.0.0.1"}, **kwargs)
        try:
            return Reply(resp.status_code, _json(resp.get_data()), dict(resp.headers))
        finally:
            resp.close()


class OverHttp:
    """The same calls over the network with ``requests``."""

    def __init__(self, base_url: str, token: str, timeout: float = 15.0) -> None:
        import requests

        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None) -> Reply:
        import requests

        try:
            resp = self.session.request(method, self.base_url + path, params=params, json=body, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ApiError(0, f"API unreachable: {exc}") from exc
        return Reply(resp.status_code, _json(resp.content), dict(resp.headers))


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"error": raw[:200].decode(errors="replace")}


# --------------------------------------------------------------------------- records


def _pick(row: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        value = row.get(name)
        if value is not None:
            return value
    return default


def _items(doc: Any, *keys: str) -> list[dict[str, Any]]:
    """A list answer, whether bare or wrapped (``{"items": [...]}`` and friends)."""
    if isinstance(doc, list):
        return [r for r in doc if isinstance(r, dict)]
    if isinstance(doc, dict):
        for key in (*keys, "items", "data", "results"):
            if isinstance(doc.get(key), list):
                return [r for r in doc[key] if isinstance(r, dict)]
    return []


@dataclass(frozen=True)
class App:
    id: int
    name: str
    namespace: str
    url: str | None
    current_revision: int | None
    status: str
    last_deploy_at: str | None
    repo_url: str | None
    branch: str | None
    strategy: str | None
    kind: str | None
    image: str | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> App:
        current = _pick(row, "current_revision", "revision")
        status = _pick(row, "status", "state", default=None)
        if not status:
            status = "deployed" if current else "new"
        return cls(
            id=int(_pick(row, "id", "app_id")),
            name=str(_pick(row, "name", default="")),
            namespace=str(_pick(row, "namespace", default="")),
            url=_pick(row, "url"),
            current_revision=int(current) if current is not None else None,
            status=str(status),
            last_deploy_at=_pick(row, "last_deploy_at", "last_deployed_at", "deployed_at", "live_from"),
            repo_url=_pick(row, "repo_url"),
            branch=_pick(row, "branch"),
            strategy=_pick(row, "strategy"),
            kind=_pick(row, "kind"),
            image=_pick(row, "image"),
        )


@dataclass(frozen=True)
class Release:
    revision: int
    image: str | None
    commit: str | None
    trigger: str
    status: str
    created_at: str | None
    finished_at: str | None
    current: bool
    build: int | None
    correlation_id: str | None
    step: str | None
    reason: str | None

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Release:
        raw_failure = row.get("failure")
        failure: Mapping[str, Any] = raw_failure if isinstance(raw_failure, dict) else {}
        return cls(
            revision=int(_pick(row, "revision")),
            image=_pick(row, "image"),
            commit=_pick(row, "commit", "commit_sha"),
            trigger=str(_pick(row, "trigger", default="")),
            status=str(_pick(row, "status", default="")),
            created_at=_pick(row, "created_at", "requested_at", "started_at"),
            finished_at=_pick(row, "finished_at"),
            current=bool(row.get("current")),
            build=_pick(row, "build", "build_number"),
            correlation_id=_pick(row, "correlation_id", "cause"),
            step=_pick(failure, "step") or _pick(row, "failed_step", "step"),
            reason=_pick(failure, "reason") or _pick(row, "failure_reason", "reason"),
        )


@dataclass(frozen=True)
class Build:
    number: int
    status: str
    commit: str | None
    message: str | None
    author: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    duration: float | None
    exit_code: int | None
    image: str | None
    log: str | None
    correlation_id: str | None
    id: str | None

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Build:
        commit = row.get("commit")
        if isinstance(commit, dict):  # {"sha", "message", "author"}
            sha, message, author = commit.get("sha"), commit.get("message"), commit.get("author")
        else:
            sha = _pick(row, "commit", "commit_sha")
            message = _pick(row, "message", "commit_message")
            author = _pick(row, "author", "commit_author")
        if isinstance(author, dict):
            author = _pick(author, "name", "login")
        return cls(
            number=int(_pick(row, "number", "build", "build_num")),
            status=str(_pick(row, "status", default="")),
            commit=sha,
            message=message,
            author=author,
            queued_at=_pick(row, "queued_at", "created_at"),
            started_at=_pick(row, "started_at"),
            finished_at=_pick(row, "finished_at"),
            duration=_pick(row, "duration"),
            exit_code=_pick(row, "exit_code"),
            image=_pick(row, "image", "image_id"),
            log=_pick(row, "log"),
            correlation_id=_pick(row, "correlation_id", "delivery_id"),
            id=None if _pick(row, "id") is None else str(row["id"]),
        )


@dataclass(frozen=True)
class DeployHook:
    id: str
    name: str
    token_prefix: str | None
    created_at: str | None
    last_used_at: str | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> DeployHook:
        return cls(
            id=str(_pick(row, "id", "hook_id")),
            name=str(_pick(row, "name", default="")),
            token_prefix=_pick(row, "token_prefix"),
            created_at=_pick(row, "created_at"),
            last_used_at=_pick(row, "last_used_at"),
        )


@dataclass(frozen=True)
class WebhookToken:
    enabled: bool
    created_at: str | None = None
    last_used_at: str | None = None
    token_prefix: str | None = None
    url: str | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> WebhookToken:
        return cls(
            enabled=bool(row.get("enabled")),
            created_at=_pick(row, "created_at", "enabled_at"),
            last_used_at=_pick(row, "last_used_at"),
            token_prefix=_pick(row, "token_prefix"),
            url=_pick(row, "url"),
        )


@dataclass(frozen=True)
class Delivery:
    """One inbound webhook delivery and what became of it."""

    delivery_id: str
    source: str
    event: str
    verification: str
    received_at: str | None
    outcome: str
    reason: str
    duplicates: int
    correlation_id: str

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Delivery:
        did = str(_pick(row, "delivery_id", "id"))
        return cls(
            delivery_id=did,
            source=str(_pick(row, "source", default="")),
            event=str(_pick(row, "event", default="")),
            verification=str(_pick(row, "verification", default="")),
            received_at=_pick(row, "received_at"),
            outcome=str(_pick(row, "outcome", default="")),
            reason=str(_pick(row, "reason", default="")),
            duplicates=int(_pick(row, "duplicates", default=0)),
            correlation_id=str(_pick(row, "correlation_id", default=did)),
        )


@dataclass(frozen=True)
class Subscription:
    id: str
    url: str
    events: list[str]
    description: str
    status: str
    disabled_reason: str | None = None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Subscription:
        events = _pick(row, "events", default=[])
        return cls(
            id=str(_pick(row, "id", "subscription_id")),
            url=str(_pick(row, "url", default="")),
            events=list(events) if isinstance(events, list | tuple) else [str(events)],
            description=str(_pick(row, "description", default="")),
            status=str(_pick(row, "status", default="enabled" if row.get("enabled", True) else "disabled")),
            disabled_reason=_pick(row, "disabled_reason"),
        )


@dataclass(frozen=True)
class Attempt:
    number: int | None
    at: str | None
    status_code: int | None
    duration_ms: float | None
    error: str | None
    response: str | None
    outcome: str

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Attempt:
        duration = _pick(row, "duration_ms")
        if duration is None and _pick(row, "duration") is not None:
            duration = float(row["duration"]) * 1000
        code = _pick(row, "status_code", "response_status", "http_status", "status")
        code = code if isinstance(code, int) else None
        return cls(
            number=_pick(row, "attempt", "number"),
            at=_pick(row, "attempted_at", "started_at", "at", "created_at"),
            status_code=code,
            duration_ms=duration,
            error=_pick(row, "error"),
            response=_pick(row, "response_body", "response", "body"),
            outcome=str(_pick(row, "outcome", "result", default="ok" if code and 200 <= code < 300 else "failed")),
        )


@dataclass(frozen=True)
class OutboundDelivery:
    id: str
    subscription_id: str
    event_type: str
    event_id: str | None
    status: str
    attempts: int
    created_at: str | None
    next_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    correlation_id: str | None
    attempt_log: list[Attempt] = field(default_factory=list)

    @property
    def moving(self) -> bool:
        """Pending with its next attempt due within half a minute: worth watching closely."""
        if self.status not in RUNNING:
            return False
        from datetime import UTC, datetime

        try:
            due = datetime.fromisoformat(str(self.next_attempt_at).replace("Z", "+00:00"))
        except ValueError:
            return True
        return (due - datetime.now(UTC)).total_seconds() < 30

    @classmethod
    def of(cls, row: Mapping[str, Any], attempt_log: list[Attempt] | None = None) -> OutboundDelivery:
        attempts = _pick(row, "attempts", "attempt_count", default=0)
        log = attempt_log or []
        if isinstance(attempts, list):
            log = log or [Attempt.of(a) for a in attempts if isinstance(a, dict)]
            attempts = len(attempts)
        return cls(
            id=str(_pick(row, "id", "delivery_id")),
            subscription_id=str(_pick(row, "subscription_id", default="")),
            event_type=str(_pick(row, "event_name", "event_type", "event", "type", default="")),
            event_id=_pick(row, "event_id"),
            status=str(_pick(row, "status", "state", default="")),
            attempts=int(attempts),
            created_at=_pick(row, "created_at", "queued_at"),
            next_attempt_at=_pick(row, "next_attempt_at"),
            last_status_code=_pick(row, "last_status", "last_status_code", "response_status"),
            last_error=_pick(row, "last_error"),
            correlation_id=_pick(row, "correlation_id"),
            attempt_log=log,
        )


STAGES = (("received", ("delivery.",)), ("build", ("build.",)), ("deploy", ("deploy.", "deployed")),
          ("job", ("job.",)), ("outbound", ("outbound.", "subscription.")))


@dataclass(frozen=True)
class AuditEntry:
    type: str
    app_id: int | None
    time: str | None
    event_id: str | None
    causation_id: str | None
    data: dict[str, Any]

    @property
    def stage(self) -> str:
        for stage, prefixes in STAGES:
            if any(self.type == p or self.type.startswith(p) for p in prefixes):
                return stage
        return "other"

    @property
    def summary(self) -> str:
        """One line of the event's most telling fields."""
        keys = ("delivery_id", "outcome", "reason", "build", "commit", "status", "revision", "trigger",
                "image", "url", "step", "exit_code", "subscription_id", "status_code", "attempt")
        parts = []
        for key in keys:
            value = self.data.get(key)
            if value not in (None, "", [], {}):
                text = str(value)
                parts.append(f"{key}={text[:12] if key == 'commit' else text[:80]}")
        return " · ".join(parts)

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> AuditEntry:
        data = _pick(row, "data", default={})
        return cls(
            type=str(_pick(row, "type", default="?")),
            app_id=_pick(row, "app_id"),
            time=_pick(row, "time", "at"),
            event_id=_pick(row, "event_id", "id"),
            causation_id=_pick(row, "causation_id"),
            data=data if isinstance(data, dict) else {},
        )


@dataclass(frozen=True)
class Timeline:
    """The causal chain of one correlation id: its events in order, then what was sent out."""

    correlation_id: str
    events: list[AuditEntry]
    outbound: list[OutboundDelivery]

    @property
    def app_ids(self) -> list[int]:
        return sorted({int(e.app_id) for e in self.events if e.app_id is not None})

    def stages(self) -> list[tuple[str, list[AuditEntry]]]:
        order = ["received", "build", "deploy", "job", "outbound", "other"]
        grouped: dict[str, list[AuditEntry]] = {}
        for entry in self.events:
            grouped.setdefault(entry.stage, []).append(entry)
        return [(stage, grouped[stage]) for stage in order if stage in grouped]


@dataclass(frozen=True)
class Written:
    """A write's answer: its document (a token to show once, maybe), its request id and log position.

    Reads given ``after=<request_id>`` wait (bounded) until the projection has folded the write.
    """

    doc: dict[str, Any]
    request_id: str | None
    position: str | None


# --------------------------------------------------------------------------- the API


class Api:
    def __init__(self, transport: Transport) -> None:
        self.t = transport

    def _reply(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None) -> Reply:
        reply = self.t.request(method, path, params={k: v for k, v in (params or {}).items() if v is not None},
                               body=body)
        if reply.status >= 400:
            message = reply.doc.get("error") if isinstance(reply.doc, dict) else None
            raise ApiError(reply.status, str(message or f"{method} {path} answered {reply.status}"))
        return reply

    def _call(self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None) -> Any:
        return self._reply(method, path, params=params, body=body).doc

    def _write(self, method: str, path: str, body: Any = None) -> Written:
        reply = self._reply(method, path, body=body)
        doc = reply.doc if isinstance(reply.doc, dict) else {}
        headers = {k.lower(): v for k, v in reply.headers.items()}
        return Written(doc=doc, request_id=_pick(doc, "request_id") or headers.get("x-request-id"),
                       position=_pick(doc, "position") or headers.get("x-shipline-position"))

    # reads ------------------------------------------------------------------

    def apps(self) -> list[App]:
        return [App.of(r) for r in _items(self._call("GET", "/api/v1/apps"), "apps")]

    def app(self, app_id: int, after: str | None = None) -> App:
        return App.of(self._call("GET", f"/api/v1/apps/{app_id}", params={"after": after}))

    def history(self, app_id: int, limit: int = 50, after: str | None = None) -> list[Release]:
        doc = self._call("GET", f"/api/v1/apps/{app_id}/history", params={"limit": limit, "after": after})
        return [Release.of(r) for r in _items(doc, "history", "releases")]

    def builds(self, app_id: int, limit: int = 20) -> list[Build]:
        doc = self._call("GET", f"/api/v1/apps/{app_id}/builds", params={"limit": limit})
        return [Build.of(r) for r in _items(doc, "builds")]

    def build(self, app_id: int, number: int) -> Build:
        for path in (f"/api/v1/builds/{app_id}-{number}", f"/api/v1/apps/{app_id}/builds/{number}"):
            try:
                return Build.of(self._call("GET", path))
            except ApiError as exc:
                if exc.status not in (404, 405):
                    raise
                last = exc
        raise last

    def deploy_hooks(self, app_id: int, after: str | None = None) -> list[DeployHook]:
        doc = self._call("GET", f"/api/v1/apps/{app_id}/deploy-hooks", params={"after": after})
        return [DeployHook.of(r) for r in _items(doc, "deploy_hooks", "hooks") if not r.get("deleted")]

    def webhook(self, app_id: int) -> WebhookToken:
        return WebhookToken.of(self._call("GET", f"/api/v1/apps/{app_id}/webhook") or {})

    def deliveries(self, app_id: int, limit: int = 50) -> list[Delivery]:
        doc = self._call("GET", "/api/v1/deliveries", params={"app_id": app_id, "limit": limit})
        return [Delivery.of(r) for r in _items(doc, "deliveries")]

    def timeline(self, correlation_id: str) -> Timeline:
        doc = self._call("GET", "/api/v1/audit", params={"correlation_id": correlation_id})
        outbound = _items(doc, "outbound") if isinstance(doc, dict) else []
        return Timeline(
            correlation_id=str(doc.get("correlation_id", correlation_id)) if isinstance(doc, dict) else correlation_id,
            events=[AuditEntry.of(r) for r in _items(doc, "events", "audit")],
            outbound=[OutboundDelivery.of(r) for r in outbound],
        )

    def subscriptions(self, app_id: int) -> list[Subscription]:
        doc = self._call("GET", f"/api/v1/apps/{app_id}/subscriptions")
        return [Subscription.of(r) for r in _items(doc, "subscriptions")]

    def outbound_deliveries(self, subscription_id: str, limit: int = 20) -> list[OutboundDelivery]:
        doc = self._call("GET", f"/api/v1/subscriptions/{subscription_id}/deliveries", params={"limit": limit})
        return [OutboundDelivery.of(r) for r in _items(doc, "deliveries")]

    def attempts(self, delivery_id: str) -> list[Attempt]:
        doc = self._call("GET", f"/api/v1/outbound/deliveries/{delivery_id}/attempts")
        return [Attempt.of(r) for r in _items(doc, "attempts")]

    # writes -----------------------------------------------------------------

    def rollback(self, app_id: int, revision: int | None) -> Written:
        body = {} if revision is None else {"revision": revision}
        return self._write("POST", f"/api/v1/apps/{app_id}/rollback", body)

    def create_deploy_hook(self, app_id: int, name: str) -> Written:
        return self._write("POST", f"/api/v1/apps/{app_id}/deploy-hooks", {"name": name})

    def delete_deploy_hook(self, hook_id: str) -> Written:
        return self._write("DELETE", f"/api/v1/deploy-hooks/{hook_id}")

    def enable_webhook(self, app_id: int) -> Written:
        return self._write("POST", f"/api/v1/apps/{app_id}/webhook")

    def disable_webhook(self, app_id: int) -> Written:
        return self._write("DELETE", f"/api/v1/apps/{app_id}/webhook")

    def redeliver(self, delivery_id: str) -> Written:
        return self._write("POST", f"/api/v1/outbound/deliveries/{delivery_id}/redeliver")

    # composites -------------------------------------------------------------

    def apps_overview(self) -> list[App]:
        """The apps list, each with its last deploy time even if the list answer lacks it."""
        import dataclasses

        out = []
        for app in self.apps():
            out.append(dataclasses.replace(app, **_deploy_state(app, self.history(app.id, limit=20))))
        return out

    def app_with_state(self, app_id: int, after: str | None = None) -> tuple[App, list[Release]]:
        import dataclasses

        history = self.history(app_id, after=after)  # first: it waits for ``after`` when given
        app = self.app(app_id)
        return dataclasses.replace(app, **_deploy_state(app, history)), history

    def outbound_with_attempts(self, subscription_id: str, limit: int = 10) -> list[OutboundDelivery]:
        """A subscription's latest deliveries, each with its attempt log."""
        import dataclasses

        out = []
        for delivery in self.outbound_deliveries(subscription_id, limit=limit):
            if not delivery.attempt_log:
                delivery = dataclasses.replace(delivery, attempt_log=self.attempts(delivery.id))
            out.append(delivery)
        return out


def _deploy_state(app: App, history: list[Release]) -> dict[str, Any]:
    """An app's status and last deploy time, from its newest releases when the app row lacks them."""
    out: dict[str, Any] = {}
    current = next((r for r in history if r.current), None)
    newest = history[0] if history else None
    if app.last_deploy_at is None and current is not None:
        out["last_deploy_at"] = current.finished_at or current.created_at
    if app.status in ("deployed", "new") and newest is not None:
        if newest.running:
            out["status"] = "deploying"
        elif newest.status == "failed" and not newest.current:
            out["status"] = "failed"
        elif current is not None:
            out["status"] = "live"
    return out
