"""The management API's writes: each becomes one request record on the inbound topic.

Every handler checks the request's form, publishes the request, waits for Kafka's ack, then
notes in the credentials store what verification needs, and answers with the ``request_id``
(streams uses it as the resulting events' correlation id, for read-your-writes) and the record's
``position`` (``<topic>:<partition>:<offset>``). Secrets and tokens are shown once in the
response: the record carries only a Fernet ciphertext (GitHub secret) or a SHA-256 hash (tokens).
Reads (``GET /api/v1/apps``...) belong to the projections read side.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from typing import Any

from flask import Blueprint, Response, jsonify

from ingress import crypto, errors, validation
from ingress.context import Ingress, deps
from ingress.deliveries import SOURCE
from ingress.github import app_id_of
from ingress.store import App
from shipline import messages as m
from shipline.envelope import wrap
from shipline.web import error, json_body, require_admin

bp = Blueprint("ingress_admin", __name__)
errors.install(bp)

Answer = tuple[Response, int] | Response


def _publish(ingress: Ingress, message: m.Message, conn: Any = None) -> dict[str, str]:
    """Produce, wait for the ack, apply to the store (in ``conn``'s transaction when given)."""
    request_id: str = message.request_id  # type: ignore[attr-defined]
    env = wrap(message, source=SOURCE, id=request_id, correlationid=request_id)
    (acked,) = ingress.send([env])
    if conn is not None:
        ingress.store.apply(conn, env)
    else:
        ingress.store.record([env])
    return {"request_id": request_id, "position": ingress.position(acked)}


def _live_app(ingress: Ingress, app_id: str) -> App | None:
    number = app_id_of(app_id)
    return ingress.store.app(number) if number is not None else None


def _no_app(app_id: str) -> Response:
    return error(404, f"no app with id {app_id[:40]!r}")


def _new_request_id() -> str:
    return str(uuid.uuid4())


@bp.post("/api/v1/apps")
@require_admin
def register_app() -> Answer:
    ingress = deps()
    fields = validation.app_fields(json_body(), partial=False)
    secret = crypto.new_secret()
    with ingress.store.transaction() as conn:
        ingress.store.lock_name(conn, fields["namespace"], fields["name"])
        if ingress.store.name_taken(conn, fields["namespace"], fields["name"], None):
            return error(409, f"an app named {fields['name']!r} already exists in namespace {fields['namespace']!r}",
                         field="name")
        app_id = ingress.store.next_app_id(conn)
        message = m.RegisterApp(app_id=app_id, **fields, secret_encrypted=ingress.box.encrypt(secret),
                                request_id=_new_request_id())
        written = _publish(ingress, message, conn)
    return jsonify({
        "id": app_id,
        "name": fields["name"],
        "namespace": fields["namespace"],
        "github_webhook_url": ingress.url(f"/api/v1/webhooks/github/{app_id}"),
        "github_secret": secret,
        **written,
    }), 201


@bp.patch("/api/v1/apps/<app_id>")
@require_admin
def update_app(app_id: str) -> Answer:
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    changes = validation.app_fields(json_body(), partial=True)
    with ingress.store.transaction() as conn:
        namespace, name = changes.get("namespace", app.namespace), changes.get("name", app.name)
        if (namespace, name) != (app.namespace, app.name):
            ingress.store.lock_name(conn, namespace, name)
            if ingress.store.name_taken(conn, namespace, name, app.id):
                return error(409, f"an app named {name!r} already exists in namespace {namespace!r}", field="name")
        written = _publish(ingress, m.UpdateApp(app_id=app.id, changes=changes, request_id=_new_request_id()), conn)
    return jsonify({"id": app.id, "changes": changes, **written})


@bp.delete("/api/v1/apps/<app_id>")
@require_admin
def delete_app(app_id: str) -> Answer:
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    written = _publish(ingress, m.DeleteApp(app_id=app.id, request_id=_new_request_id()))
    return jsonify({"id": app.id, "deleted": True, **written})


@bp.post("/api/v1/apps/<app_id>/deploy-hooks")
@require_admin
def create_deploy_hook(app_id: str) -> Answer:
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    name = validation.hook_name(json_body())
    token = crypto.new_token(crypto.DEPLOY_HOOK)
    hook_id = str(uuid.uuid4())
    message = m.CreateDeployHook(app_id=app.id, hook_id=hook_id, name=name, token_hash=crypto.token_hash(token),
                                 token_prefix=crypto.token_prefix(token), request_id=_new_request_id())
    written = _publish(ingress, message)
    return jsonify({
        "id": hook_id,
        "app_id": app.id,
        "name": name,
        "token": token,
        "token_prefix": message.token_prefix,
        "url": ingress.url("/api/v1/dh"),
        **written,
    }), 201


@bp.delete("/api/v1/deploy-hooks/<hook_id>")
@require_admin
def delete_deploy_hook(hook_id: str) -> Answer:
    ingress = deps()
    app_id = ingress.store.deploy_hook_app(hook_id)
    if app_id is None:
        return error(404, f"no deploy hook with id {hook_id[:80]!r}")
    written = _publish(ingress, m.DeleteDeployHook(app_id=app_id, hook_id=hook_id, request_id=_new_request_id()))
    resp = Response(status=204)
    resp.headers["X-Request-Id"] = written["request_id"]
    resp.headers["X-Shipline-Position"] = written["position"]
    return resp


def _webhook_url(ingress: Ingress, app: App) -> str:
    return ingress.url(f"/api/v1/webhook/{app.namespace}/{app.name}")


@bp.post("/api/v1/apps/<app_id>/webhook")
@require_admin
def enable_webhook(app_id: str) -> Answer:
    """Enable the per-app token hook, or regenerate its token (the old one stops working)."""
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    token = crypto.new_token(crypto.WEBHOOK_TOKEN)
    message = m.EnableWebhookToken(app_id=app.id, token_hash=crypto.token_hash(token),
                                   token_prefix=crypto.token_prefix(token), request_id=_new_request_id())
    written = _publish(ingress, message)
    return jsonify({"url": _webhook_url(ingress, app), "token": token, "token_prefix": message.token_prefix,
                    **written}), 201


@bp.get("/api/v1/apps/<app_id>/webhook")
@require_admin
def webhook_status(app_id: str) -> Answer:
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    ingress.notes.flush(1.0)  # this process's deliveries' last_used_at (others' follow within 50 ms)
    token = ingress.store.webhook_token(app.id)
    return jsonify({
        "enabled": token is not None,
        "url": _webhook_url(ingress, app),
        "token_prefix": token["token_prefix"] if token else None,
        "created_at": _iso(token["created_at"]) if token else None,
        "last_used_at": _iso(token["last_used_at"]) if token else None,
    })


@bp.delete("/api/v1/apps/<app_id>/webhook")
@require_admin
def disable_webhook(app_id: str) -> Answer:
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    written = _publish(ingress, m.DisableWebhookToken(app_id=app.id, request_id=_new_request_id()))
    return jsonify({"enabled": False, **written})


@bp.post("/api/v1/apps/<app_id>/rollback")
@require_admin
def rollback(app_id: str) -> Answer:
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    revision = validation.rollback_request(json_body(required=False))
    message = m.RequestDeploy(app_id=app.id, request_id=_new_request_id(), trigger="rollback", revision=revision)
    return jsonify(_publish(ingress, message)), 202


@bp.post("/api/v1/apps/<app_id>/deploy")
@require_admin
def deploy(app_id: str) -> Answer:
    ingress = deps()
    app = _live_app(ingress, app_id)
    if app is None:
        return _no_app(app_id)
    image, commit = validation.deploy_request(json_body())
    message = m.RequestDeploy(app_id=app.id, request_id=_new_request_id(), trigger="manual", image=image,
                              commit=commit)
    return jsonify(_publish(ingress, message)), 202


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")  # type: ignore[no-any-return]
