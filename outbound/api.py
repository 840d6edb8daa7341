"""Subscriptions, the attempt log and manual actions on the public app (all ``require_admin``).

Subscription writes are requests on the inbound topic (streams turns them into subscription.*
events, which the dispatcher folds into its table); reads come from the dispatcher's tables, so a
subscription appears a moment after the 201. Redeliver, recover and replay are operations on the
outbound queue itself and act on the tables directly.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
from flask import Blueprint, Flask, Response, jsonify, request

from outbound import events, signing, ssrf
from outbound.options import from_settings
from outbound.schema import MIGRATIONS
from outbound.store import Store
from shipline import kafka
from shipline.db import migrate
from shipline.envelope import wrap
from shipline.messages import CreateSubscription, DeleteSubscription, Message, UpdateSubscription
from shipline.web import current, error, json_body, require_admin

bp = Blueprint("outbound", __name__)
SOURCE = "shipline/api/outbound"
MAX_DESCRIPTION = 1000
PATCHABLE = {"url", "events", "description", "enabled", "secret", "rotate_secret"}


def mount(app: Flask) -> None:
    ctx = app.extensions["shipline"]
    schema = ctx.settings.schema("outbound")
    migrate(ctx.pool, schema, MIGRATIONS)
    ctx.extras["outbound.store"] = Store(ctx.pool, schema)
    app.register_blueprint(bp)


def _store() -> Store:
    return current().extras["outbound.store"]  # type: ignore[no-any-return]


class Invalid(ValueError):
    pass


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return value


def _view(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in row.items()}
    out["events"] = list(row.get("events") or [])
    out["previous_secret_expires_at"] = _iso(row.get("previous_secret_expires_at"))
    out["status"] = "enabled" if row.get("enabled") else "disabled"
    return out


def _publish(message: Message) -> Response | None:
    ctx = current()
    env = wrap(message, source=SOURCE, id=getattr(message, "request_id", None) or None)
    try:
        kafka.send_sync(ctx.producer, ctx.settings.topics.inbound, env)
    except kafka.NotDurable as exc:
        return error(503, f"not accepted, try again: {exc}")
    return None


def _url(value: Any) -> str:
    try:
        url = ssrf.check_url(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None
    host = urlsplit(url).hostname or ""
    try:
        import ipaddress

        ip = ipaddress.ip_address(host)
    except ValueError:
        return url  # a name: checked after resolution, at every attempt
    reason = ssrf.why_forbidden(ip)
    if reason and not ssrf.allowed(ip, ssrf.parse_networks(current().settings.outbound_allow)):
        raise Invalid(f"url points at a {reason} address, not allowed by SHIPLINE_OUTBOUND_ALLOW")
    return url


def _events(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise Invalid('events must be a list of event names, or ["*"]')
    try:
        return events.normalise(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _description(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
        raise Invalid(f"description must be a string of at most {MAX_DESCRIPTION} characters")
    return value


def _secret(value: Any) -> str:
    try:
        return signing.validate(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _time(value: Any, name: str) -> datetime:
    if isinstance(value, bool):
        raise Invalid(f"{name} must be an RFC 3339 time or epoch seconds")
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            raise Invalid(f"{name} is out of range") from None
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Invalid(f"{name} must be an RFC 3339 time or epoch seconds") from None
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    raise Invalid(f"{name} must be an RFC 3339 time or epoch seconds")


@bp.errorhandler(Invalid)
def _invalid(exc: Invalid) -> Response:
    return error(400, str(exc))


@bp.errorhandler(psycopg.OperationalError)
def _database_away(exc: psycopg.OperationalError) -> Response:
    return error(503, "database unavailable, try again")


# ---------------------------------------------------------------------------------- subscriptions


@bp.post("/api/v1/apps/<int:app_id>/subscriptions")
@require_admin
def create(app_id: int) -> Any:
    body = json_body()
    unknown = set(body) - {"url", "events", "secret", "description"}
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    if app_id < 1 or app_id >= 2**63:
        raise Invalid("app id must be a positive integer")
    url = _url(body.get("url"))
    names = _events(body.get("events", ["*"]))
    secret = _secret(body["secret"]) if body.get("secret") is not None else signing.generate()
    description = _description(body.get("description", ""))
    sid = str(uuid.uuid4())
    ctx = current()
    message = CreateSubscription(
        app_id=app_id, subscription_id=sid, url=url, events=names,
        secret_encrypted=signing.encrypt(ctx.settings.secret_key, secret), description=description,
        request_id=str(uuid.uuid4()),
    )
    failed = _publish(message)
    if failed is not None:
        return failed
    resp = jsonify({"id": sid, "app_id": app_id, "url": url, "events": names, "secret": secret,
                    "description": description})
    resp.status_code = 201
    resp.headers["Location"] = f"/api/v1/subscriptions/{sid}"
    return resp


@bp.get("/api/v1/apps/<int:app_id>/subscriptions")
@require_admin
def list_for_app(app_id: int) -> Any:
    if app_id >= 2**63:
        raise Invalid("app id out of range")
    return jsonify({"subscriptions": [_view(r) for r in _store().subscriptions(app_id)]})


def _existing(sid: str) -> dict[str, Any] | Response:
    if len(sid) > 100:
        return error(404, "no such subscription")
    row = _store().subscription(sid)
    if row is None:
        return error(404, "no such subscription")
    return row


@bp.get("/api/v1/subscriptions/<sid>")
@require_admin
def show(sid: str) -> Any:
    row = _existing(sid)
    return row if isinstance(row, Response) else jsonify(_view(row))


@bp.patch("/api/v1/subscriptions/<sid>")
@require_admin
def update(sid: str) -> Any:
    row = _existing(sid)
    if isinstance(row, Response):
        return row
    body = json_body()
    unknown = set(body) - PATCHABLE
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(PATCHABLE))}")
    changes: dict[str, Any] = {}
    if "url" in body:
        changes["url"] = _url(body["url"])
    if "events" in body:
        changes["events"] = _events(body["events"])
    if "description" in body:
        changes["description"] = _description(body["description"])
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise Invalid("enabled must be true or false")
        changes["enabled"] = body["enabled"]
    if "rotate_secret" in body and not isinstance(body["rotate_secret"], bool):
        raise Invalid("rotate_secret must be true or false")
    new_secret = None
    if body.get("secret") is not None:
        new_secret = _secret(body["secret"])
    elif body.get("rotate_secret"):
        new_secret = signing.generate()
    ctx = current()
    if new_secret is not None:
        rotation = from_settings(ctx.settings).rotation
        changes["secret_encrypted"] = signing.encrypt(ctx.settings.secret_key, new_secret)
        changes["previous_secret_expires_at"] = _iso(datetime.now(UTC) + timedelta(seconds=rotation))
    if not changes:
        raise Invalid("nothing to change")
    failed = _publish(UpdateSubscription(app_id=row["app_id"], subscription_id=sid, changes=changes,
                                         request_id=str(uuid.uuid4())))
    if failed is not None:
        return failed
    view = _view(row)
    view.update({k: v for k, v in changes.items() if k != "secret_encrypted"})
    if new_secret is not None:
        view["secret"] = new_secret
    resp = jsonify(view)
    resp.status_code = 202
    return resp


@bp.delete("/api/v1/subscriptions/<sid>")
@require_admin
def delete(sid: str) -> Any:
    row = _existing(sid)
    if isinstance(row, Response):
        return row
    failed = _publish(DeleteSubscription(app_id=row["app_id"], subscription_id=sid, request_id=str(uuid.uuid4())))
    if failed is not None:
        return failed
    resp = jsonify({"id": sid, "deleted": True})
    resp.status_code = 202
    return resp


# ------------------------------------------------------------------------------ deliveries, attempts


def _int_arg(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Invalid(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise Invalid(f"{name} must be between {lo} and {hi}")
    return value


@bp.get("/api/v1/subscriptions/<sid>/deliveries")
@require_admin
def deliveries(sid: str) -> Any:
    row = _existing(sid)
    if isinstance(row, Response):
        return row
    status = request.args.get("status") or None
    if status not in (None, "pending", "succeeded", "failed"):
        raise Invalid("status must be pending, succeeded or failed")
    limit = _int_arg("limit", 100, 1, 1000)
    before = _int_arg("before", None, 1, 2**63 - 1)
    rows = [{k: _iso(v) if k != "id" else str(v) for k, v in r.items()}
            for r in _store().deliveries(sid, status, limit or 100, before)]
    nxt = rows[-1]["seq"] if len(rows) == limit else None
    return jsonify({"deliveries": rows, "next_before": nxt})


@bp.get("/api/v1/outbound/deliveries/<uuid:did>")
@require_admin
def delivery(did: uuid.UUID) -> Any:
    row = _store().delivery(str(did))
    if row is None:
        return error(404, "no such delivery")
    out = {k: _iso(v) if k != "id" else str(v) for k, v in row.items() if k != "payload"}
    try:
        out["payload"] = json.loads(bytes(row["payload"]))
    except ValueError:
        out["payload"] = bytes(row["payload"]).decode("utf-8", "replace")
    return jsonify(out)


@bp.get("/api/v1/outbound/deliveries/<uuid:did>/attempts")
@bp.get("/api/v1/deliveries/<uuid:did>/attempts")
@require_admin
def attempts(did: uuid.UUID) -> Any:
    if _store().delivery(str(did)) is None:
        return error(404, "no such delivery")
    rows = [{k: _iso(v) for k, v in r.items()} for r in _store().attempts(str(did))]
    return jsonify({"delivery_id": str(did), "attempts": rows})


@bp.post("/api/v1/outbound/deliveries/<uuid:did>/redeliver")
@bp.post("/api/v1/deliveries/<uuid:did>/redeliver")
@require_admin
def redeliver(did: uuid.UUID) -> Any:
    done = _store().redeliver(str(did))
    if done is None:
        return error(404, "no such delivery (or its subscription was deleted)")
    resp = jsonify(done)
    resp.status_code = 202
    return resp


@bp.post("/api/v1/subscriptions/<sid>/recover")
@require_admin
def recover(sid: str) -> Any:
    row = _existing(sid)
    if isinstance(row, Response):
        return row
    body = json_body()
    if "since" not in body:
        raise Invalid("since is required (RFC 3339 time or epoch seconds)")
    since = _time(body["since"], "since")
    count = _store().recover(sid, since)
    resp = jsonify({"subscription_id": sid, "since": _iso(since), "recovered": count,
                    "subscription_enabled": row["enabled"]})
    resp.status_code = 202
    return resp


@bp.post("/api/v1/subscriptions/<sid>/replay")
@require_admin
def replay(sid: str) -> Any:
    row = _existing(sid)
    if isinstance(row, Response):
        return row
    body = json_body()
    unknown = set(body) - {"since_time", "since_sequence"}
    if unknown:
        raise Invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    since_time = _time(body["since_time"], "since_time") if body.get("since_time") is not None else None
    since_sequence = body.get("since_sequence")
    if since_sequence is not None and (type(since_sequence) is not int or not 0 < since_sequence < 2**63):
        raise Invalid("since_sequence must be a positive integer")
    if (since_time is None) == (since_sequence is None):
        raise Invalid("give exactly one of since_time or since_sequence")
    replay_id = str(uuid.uuid4())
    _store().request_replay(replay_id, sid, since_time, since_sequence)
    resp = jsonify({"id": replay_id, "subscription_id": sid, "status": "pending",
                    "since_time": _iso(since_time), "since_sequence": since_sequence})
    resp.status_code = 202
    resp.headers["Location"] = f"/api/v1/outbound/replays/{replay_id}"
    return resp


@bp.get("/api/v1/outbound/replays/<uuid:rid>")
@require_admin
def replay_status(rid: uuid.UUID) -> Any:
    row = _store().replay(str(rid))
    if row is None:
        return error(404, "no such replay")
    return jsonify({k: _iso(v) for k, v in row.items()})
