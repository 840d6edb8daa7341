"""The public HTTP app: one Flask app factory mounting every service's blueprint.

Shared clients (the Kafka producer, the PostgreSQL pool) are made here, once per process, by
``create_app`` and handed to blueprints through ``current()``; nothing is created at import.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

import orjson
from flask import Flask, Response, current_app, jsonify, request
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer
from werkzeug.exceptions import HTTPException

from shipline.config import Settings


@dataclass
class WebContext:
    settings: Settings
    producer: Any  # confluent_kafka.Producer
    pool: Any  # psycopg_pool.ConnectionPool
    extras: dict[str, Any] = field(default_factory=dict)


def current() -> WebContext:
    return current_app.extensions["shipline"]  # type: ignore[no-any-return]


def error(status: int, message: str, **extra: Any) -> Response:
    resp = jsonify({"error": message, **extra})
    resp.status_code = status
    return resp


def json_response(body: dict[str, Any], status: int = 200) -> Response:
    """``jsonify(body), status`` for a body of plain JSON values, without Flask's JSON provider:
    the webhook hot path answers with this (the same compact JSON, UTF-8 where jsonify escapes)."""
    return Response(orjson.dumps(body) + b"\n", status=status, mimetype="application/json")


def require_admin(view: Callable[..., Any]) -> Callable[..., Any]:
    """Bearer ``SHIPLINE_ADMIN_TOKEN`` on every management call, compared in constant time."""

    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = current().settings.admin_token
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
            return error(401, "missing or wrong bearer token")
        return view(*args, **kwargs)

    return wrapped


def json_body(required: bool = True) -> dict[str, Any]:
    """The request's JSON object, or an HTTP error the error handler turns into JSON."""
    from werkzeug.exceptions import BadRequest, UnsupportedMediaType

    raw = request.get_data(cache=True)
    if not raw and not required:
        return {}
    ctype = request.mimetype or ""
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType("Content-Type must be application/json")
    try:
        doc = _loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    return doc


class CachedSerializerSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions (the console's), with the signing serializer made once per key.

    Flask builds it and parses the cookies on every request, session or not; on the webhook
    routes, which never use a session, that was a tenth of a request's Python time.
    """

    _cached: tuple[tuple[Any, ...], URLSafeTimedSerializer | None] | None = None

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        key = (app.secret_key, tuple(app.config["SECRET_KEY_FALLBACKS"] or ()))
        cached = self._cached
        if cached is None or cached[0] != key:
            cached = self._cached = (key, super().get_signing_serializer(app))
        return cached[1]

    def open_session(self, app: Flask, request: Any) -> Any:
        """No ``Cookie`` header, no session to read: a new empty one, as Flask would make after
        parsing the (absent) cookies and building the serializer."""
        if "HTTP_COOKIE" not in request.environ and self.get_signing_serializer(app) is not None:
            return self.session_class()
        return super().open_session(app, request)


_LONG_NUMBER = re.compile(rb"\d{19}")


def _loads(raw: bytes) -> Any:
    """``json.loads``, the same values and the same refusals, mostly done by orjson (several times
    faster, on the webhook hot path). orjson refuses NaN, Infinity, a BOM and UTF-16, which
    ``json`` takes, so its refusals go to ``json``; it reads an integer past 64 bits as a float,
    so a body with a run of 19 digits goes to ``json`` straight away."""
    if _LONG_NUMBER.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def create_app(settings: Settings, *, producer: Any = None, pool: Any = None) -> Flask:
    from shipline import health

    app = Flask("shipline")
    app.session_interface = CachedSerializerSessions()
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body
    app.config["SECRET_KEY"] = settings.secret_key
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if producer is None:
        from shipline.kafka import producer as make_producer

        producer = make_producer(settings.bootstrap_servers)
    if pool is None:
        from shipline.db import make_pool

        pool = make_pool(settings.db_url, max_size=16)
    app.extensions["shipline"] = WebContext(settings=settings, producer=producer, pool=pool)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        current_app.logger.exception("unhandled error")
        return error(500, "internal error")

    app.register_blueprint(health.bp)
    for mount in _mounts():
        mount(app)
    return app


def _mounts() -> list[Callable[[Flask], None]]:
    """Each service's ``mount(app)``: runs migrations it needs and registers its blueprints."""
    import importlib
    import importlib.util

    mounts: list[Callable[[Flask], None]] = []
    for module in ("ingress.web", "projections.api", "outbound.api", "console.views"):
        if importlib.util.find_spec(module.split(".")[0]) and _exists(module):
            mounts.append(importlib.import_module(module).mount)
    return mounts


def _exists(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
