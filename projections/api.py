"""The read API (GET only; writes are the ingress's), mounted on the public app.

Every route needs the admin bearer token. Lists are newest first and paginated with ``?limit=``
(default 50, at most 1000) and ``?before=`` (an exclusive cursor: a revision, a build number or
an RFC 3339 time); when a page is full the next cursor is in ``X-Shipline-Next-Before`` and a
``Link: <...>; rel="next"`` header, so the bodies keep their documented shapes.

Read your writes: a write through the ingress answers with its request id; a read given
``?after=<request_id>`` or ``X-Shipline-After: <request_id>`` waits (at most
``PROJECTIONS_AFTER_TIMEOUT`` seconds, default 5) until the projection has folded an event of
that request, and otherwise answers anyway with ``X-Shipline-Stale: true``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import wraps
from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import BadRequest

from projections import queries
from projections.schema import MIGRATIONS
from shipline.db import migrate, validate_schema
from shipline.web import current, error, require_admin

bp = Blueprint("projections", __name__)

MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
AFTER_TIMEOUT = 5.0


def mount(app: Flask) -> None:
    ctx = app.extensions["shipline"]
    migrate(ctx.pool, ctx.settings.schema("projections"), MIGRATIONS)
    app.register_blueprint(bp)


# ---------------------------------------------------------------------------- helpers


def _schema() -> str:
    return current().settings.schema("projections")


def _limit() -> int:
    raw = request.args.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise BadRequest("limit must be an integer from 1 to 1000")
    return int(raw)


def _int_arg(name: str, maximum: int = MAX_INT) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or int(raw) > maximum:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(raw)


def _time_arg(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    text = raw.strip().replace(" ", "+")  # an unencoded "+" in a query string arrives as a space
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(f"{name} must be an RFC 3339 time, e.g. 2025-01-31T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _paged(items: list[dict[str, Any]], limit: int, cursor: Callable[[dict[str, Any]], Any]) -> Response:
    resp = jsonify(items)
    if len(items) == limit:
        nxt = cursor(items[-1])
        resp.headers["X-Shipline-Next-Before"] = str(nxt)
        args = {k: v for k, v in request.args.items() if k not in ("before", "after")}
        args["before"] = str(nxt)
        resp.headers["Link"] = f'<{request.path}?{urlencode(args)}>; rel="next"'
    return resp


def _valid_app_id(app_id: int) -> bool:
    return 0 <= app_id <= MAX_BIGINT


def fresh(view: Callable[..., Any]) -> Callable[..., Any]:
    """Read your writes: wait (bounded) for the request id in ``after`` to be folded."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        after = request.args.get("after") or request.headers.get("X-Shipline-After")
        if after:
            timeout = float(current_app.config.get("PROJECTIONS_AFTER_TIMEOUT", AFTER_TIMEOUT))
            g.projections_stale = not _wait_for(after[:200], timeout)
        return view(*args, **kwargs)

    return wrapped


def _wait_for(correlation_id: str, timeout: float) -> bool:
    pool, schema = current().pool, _schema()
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        with pool.connection() as conn:
            if queries.seen_correlation(conn, schema, correlation_id):
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, 0.1)


@bp.after_request
def _stale_header(resp: Response) -> Response:
    if g.get("projections_stale"):
        resp.headers["X-Shipline-Stale"] = "true"
    return resp


# ----------------------------------------------------------------------------- routes


@bp.get("/api/v1/apps")
@require_admin
@fresh
def apps() -> Any:
    include_deleted = request.args.get("include_deleted", "") in ("1", "true", "yes")
    with current().pool.connection() as conn:
        return jsonify(queries.list_apps(conn, _schema(), include_deleted=include_deleted))


@bp.get("/api/v1/apps/<int:app_id>")
@require_admin
@fresh
def app_detail(app_id: int) -> Any:
    with current().pool.connection() as conn:
        found = queries.get_app(conn, _schema(), app_id) if _valid_app_id(app_id) else None
    if found is None:
        return error(404, f"app {app_id} not found")
    return jsonify(found)


def _app_or_404(conn: Any, app_id: int) -> Response | None:
    if not _valid_app_id(app_id) or queries.get_app(conn, _schema(), app_id) is None:
        return error(404, f"app {app_id} not found")
    return None


@bp.get("/api/v1/apps/<int:app_id>/history")
@require_admin
@fresh
def app_history(app_id: int) -> Any:
    at = _time_arg("at")
    limit = _limit()
    before = _int_arg("before")
    with current().pool.connection() as conn:
        missing = _app_or_404(conn, app_id)
        if missing is not None:
            return missing
        if at is not None:
            return jsonify(queries.live_at(conn, _schema(), app_id, at))
        items = queries.history(conn, _schema(), app_id, limit=limit, before=before)
    return _paged(items, limit, lambda r: r["revision"])


@bp.get("/api/v1/apps/<int:app_id>/builds")
@require_admin
@fresh
def app_builds(app_id: int) -> Any:
    limit = _limit()
    before = _int_arg("before")
    with current().pool.connection() as conn:
        missing = _app_or_404(conn, app_id)
        if missing is not None:
            return missing
        items = queries.builds(conn, _schema(), app_id, limit=limit, before=before)
    return _paged(items, limit, lambda r: r["number"])


@bp.get("/api/v1/builds/<int:app_id>/<int:number>")
@bp.get("/api/v1/apps/<int:app_id>/builds/<int:number>")
@require_admin
@fresh
def build_by_number(app_id: int, number: int) -> Any:
    return _build(app_id, number)


@bp.get("/api/v1/builds/<build_id>")
@require_admin
@fresh
def build_by_id(build_id: str) -> Any:
    parsed = queries.parse_build_id(build_id)
    if parsed is None:
        return error(404, f"build {build_id!r} not found (ids look like <app_id>-<number>)")
    return _build(*parsed)


def _build(app_id: int, number: int) -> Any:
    found = None
    if _valid_app_id(app_id) and number <= MAX_INT:
        with current().pool.connection() as conn:
            found = queries.get_build(conn, _schema(), app_id, number)
    if found is None:
        return error(404, f"build {app_id}-{number} not found")
    return jsonify(found)


@bp.get("/api/v1/apps/<int:app_id>/deploy-hooks")
@require_admin
@fresh
def app_deploy_hooks(app_id: int) -> Any:
    with current().pool.connection() as conn:
        missing = _app_or_404(conn, app_id)
        if missing is not None:
            return missing
        return jsonify(queries.deploy_hooks(conn, _schema(), app_id))


@bp.get("/api/v1/deliveries")
@require_admin
@fresh
def deliveries() -> Any:
    app_id = _int_arg("app_id", MAX_BIGINT)
    limit = _limit()
    before = _time_arg("before")
    outcome = request.args.get("outcome") or None
    with current().pool.connection() as conn:
        items = queries.deliveries(conn, _schema(), app_id=app_id, outcome=outcome, limit=limit, before=before)
    return _paged(items, limit, lambda r: r["received_at"])


@bp.get("/api/v1/deliveries/<delivery_id>")
@require_admin
@fresh
def delivery(delivery_id: str) -> Any:
    with current().pool.connection() as conn:
        rows = queries.get_delivery(conn, _schema(), delivery_id)
    if not rows:
        return error(404, f"delivery {delivery_id!r} not found")
    return jsonify(rows)


@bp.get("/api/v1/audit")
@require_admin
@fresh
def audit() -> Any:
    """``?correlation_id=`` (or a delivery id): the causal chain; ``?app_id=``: an app's events, newest first."""
    ident = request.args.get("correlation_id") or request.args.get("delivery_id")
    app_id = _int_arg("app_id", MAX_BIGINT)
    if not ident and app_id is None:
        raise BadRequest("give correlation_id (or delivery_id) or app_id")
    settings = current().settings
    with current().pool.connection() as conn:
        if ident:
            correlation_id = queries.resolve_correlation(conn, _schema(), ident)
            outbound = validate_schema(settings.schema("outbound"))
            return jsonify(queries.chain(conn, _schema(), correlation_id, outbound_schema=outbound))
        assert app_id is not None
        limit = _limit()
        items = queries.audit_events(conn, _schema(), app_id=app_id, limit=limit, before=_time_arg("before"))
    return _paged(items, limit, lambda r: r["time"])
