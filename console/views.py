"""The web console at ``/console``: server-rendered pages over the public HTTP API.

It holds no business rules and no SQL: every page reads through ``console.client.Api`` and every
button writes through the same management endpoints the CLI uses. Pages that show something in
motion (a build, a deploy, a rollback just asked for) embed a fragment that ``console.js``
re-fetches every 1.5 s while it says it is running.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from console import auth
from console.client import Api, ApiError, InProcess, OverHttp
from shipline.config import Settings

bp = Blueprint("console", __name__, url_prefix="/console", template_folder="templates",
               static_folder="static", static_url_path="/static")

PENDING = "console_pending"
PENDING_FOR = 90.0  # seconds a page keeps polling fast after a write, until the change shows


def mount(app: Flask) -> None:
    settings: Settings = app.extensions["shipline"].settings
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    if settings.public_url.startswith("https://"):
        app.config["SESSION_COOKIE_SECURE"] = True
    app.jinja_env.filters.setdefault("when", when)
    app.jinja_env.filters.setdefault("ago", ago)
    app.jinja_env.filters.setdefault("short", short)
    app.jinja_env.filters.setdefault("image_label", image_label)
    app.register_blueprint(bp)


def _settings() -> Settings:
    return current_app.extensions["shipline"].settings  # type: ignore[no-any-return]


def api() -> Api:
    s = _settings()
    base = current_app.config.get("CONSOLE_API_URL")
    if base:
        return Api(OverHttp(base, s.admin_token))
    return Api(InProcess(current_app._get_current_object(), s.admin_token, s.public_url))  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the gate


@bp.before_request
def gate() -> Response | None:
    s = _settings()
    if request.endpoint == "console.login":
        if request.method == "POST":
            auth.check_csrf()
        return None
    if not auth.signed_in(s.admin_token, s.secret_key):
        target = request.full_path.rstrip("?") if request.method == "GET" else None
        return redirect(url_for("console.login", next=target), 303)
    if request.method == "POST":
        auth.check_csrf()
    return None


@bp.app_context_processor
def inject() -> dict[str, Any]:
    if request.blueprint != "console":
        return {}
    return {"csrf_token": auth.csrf_token, "public_url": _settings().public_url}


@bp.errorhandler(ApiError)
def api_error(exc: ApiError) -> tuple[str, int]:
    status = exc.status if exc.status in (400, 404, 409, 410, 422) else 502
    return render_template("console/error.html", status=status, message=exc.message), status


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> tuple[str, int]:
    status = exc.code or 500
    return render_template("console/error.html", status=status, message=exc.description), status


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | str | tuple[str, int]:
    s = _settings()
    target = auth.safe_next(request.values.get("next")) or url_for("console.apps")
    if request.method == "POST":
        if auth.token_matches(request.form.get("token", ""), s.admin_token):
            auth.sign_in(s.admin_token, s.secret_key)
            return redirect(target, 303)
        return render_template("console/login.html", next=target, failed=True), 401
    if auth.signed_in(s.admin_token, s.secret_key):
        return redirect(target, 303)
    return render_template("console/login.html", next=target, failed=False)


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("console.login"), 303)


@bp.route("/<path:rest>")
def unknown(rest: str) -> Response:
    """Any other path under /console: behind the sign-in gate like the rest, then 404."""
    abort(404, description=f"no console page at /console/{rest}")


# --------------------------------------------------------------------------- apps


@bp.get("/")
def apps() -> str:
    return render_template("console/apps.html", apps=api().apps_overview())


@bp.get("/apps/<int:app_id>")
def app_page(app_id: int) -> str:
    return render_template("console/app.html", **_app_state(app_id, _after()))


@bp.get("/apps/<int:app_id>/live")
def app_live(app_id: int) -> str:
    return render_template("console/_app_live.html", **_app_state(app_id))


def _after() -> str | None:
    """The request id of a write just made here: reads wait (bounded) until it is projected."""
    after = request.args.get("after", "")
    return after[:200] if after else None


def _app_state(app_id: int, after: str | None = None) -> dict[str, Any]:
    client = api()
    app, history = client.app_with_state(app_id, after)
    builds = client.builds(app_id)
    running = [r for r in history if r.running]
    building = [b for b in builds if b.running]
    pending = _pending(app_id, history[0].revision if history else 0)
    return {
        "app": app,
        "history": history,
        "builds": builds,
        "deploying": running,
        "building": building,
        "pending": pending,
        "running": bool(running or building or pending),
    }


@bp.get("/apps/<int:app_id>/builds/<int:number>")
def build_page(app_id: int, number: int) -> str:
    client = api()
    return render_template("console/build.html", app=client.app(app_id), build=client.build(app_id, number))


@bp.get("/apps/<int:app_id>/builds/<int:number>/live")
def build_live(app_id: int, number: int) -> str:
    client = api()
    return render_template("console/_build_live.html", app=client.app(app_id), build=client.build(app_id, number))


@bp.route("/apps/<int:app_id>/rollback/<int:revision>", methods=["GET", "POST"])
def rollback(app_id: int, revision: int) -> Response | str:
    client = api()
    if request.method == "POST":
        newest = client.history(app_id, limit=1)
        written = client.rollback(app_id, revision)
        _mark_pending(app_id, newest[0].revision if newest else 0)
        flash(f"Rollback to revision {revision} requested: the new revision appears below as it rolls out.", "ok")
        return redirect(url_for("console.app_page", app_id=app_id, after=written.request_id), 303)
    app = client.app(app_id)
    target = next((r for r in client.history(app_id, limit=1000) if r.revision == revision), None)
    if target is None:
        abort(404, description=f"app {app_id} has no revision {revision}")
    current = next((r for r in client.history(app_id, limit=50) if r.current), None)
    return render_template("console/rollback.html", app=app, target=target, current=current)


# --------------------------------------------------------------------------- hooks


@bp.get("/apps/<int:app_id>/hooks")
def hooks(app_id: int) -> str:
    s = _settings()
    client = api()
    app = client.app(app_id)
    return render_template(
        "console/hooks.html",
        app=app,
        hooks=client.deploy_hooks(app_id, after=_after()),
        webhook=client.webhook(app_id),
        once=auth.take_once(s.secret_key),
        github_url=f"{s.public_url}/api/v1/webhooks/github/{app_id}",
        token_url=f"{s.public_url}/api/v1/webhook/{app.namespace}/{app.name}",
        dh_url=f"{s.public_url}/api/v1/dh",
    )


@bp.post("/apps/<int:app_id>/hooks")
def create_hook(app_id: int) -> Response:
    name = (request.form.get("name") or "").strip()
    if not name:
        flash("A deploy hook needs a name.", "error")
        return redirect(url_for("console.hooks", app_id=app_id), 303)
    try:
        written = api().create_deploy_hook(app_id, name)
    except ApiError as exc:
        if exc.status >= 500 or exc.status == 0:
            raise
        flash(f"Not created: {exc.message}", "error")
        return redirect(url_for("console.hooks", app_id=app_id), 303)
    auth.show_once(_settings().secret_key, kind="deploy_hook", name=name, token=written.doc.get("token", ""),
                   id=str(written.doc.get("id", "")))
    return redirect(url_for("console.hooks", app_id=app_id, after=written.request_id), 303)


@bp.post("/apps/<int:app_id>/hooks/<hook_id>/delete")
def delete_hook(app_id: int, hook_id: str) -> Response:
    written = api().delete_deploy_hook(hook_id)
    flash("Deploy hook deleted: its token is refused from now on.", "ok")
    return redirect(url_for("console.hooks", app_id=app_id, after=written.request_id), 303)


@bp.post("/apps/<int:app_id>/webhook/enable")
def enable_webhook(app_id: int) -> Response:
    written = api().enable_webhook(app_id)
    auth.show_once(_settings().secret_key, kind="webhook", token=written.doc.get("token", ""),
                   url=written.doc.get("url", ""))
    return redirect(url_for("console.hooks", app_id=app_id), 303)


@bp.post("/apps/<int:app_id>/webhook/disable")
def disable_webhook(app_id: int) -> Response:
    api().disable_webhook(app_id)
    flash("Token webhook disabled.", "ok")
    return redirect(url_for("console.hooks", app_id=app_id), 303)


# --------------------------------------------------------------------------- deliveries


@bp.get("/apps/<int:app_id>/deliveries")
def deliveries(app_id: int) -> str:
    client = api()
    app = client.app(app_id)
    subscriptions = _outbound(client, app_id)
    return render_template("console/deliveries.html", app=app, inbound=client.deliveries(app_id),
                           subscriptions=subscriptions, running=_outbound_running(app_id, subscriptions))


@bp.get("/apps/<int:app_id>/deliveries/outbound")
def outbound_live(app_id: int) -> str:
    client = api()
    app = client.app(app_id)
    subscriptions = _outbound(client, app_id)
    return render_template("console/_outbound.html", app=app, subscriptions=subscriptions,
                           running=_outbound_running(app_id, subscriptions))


def _outbound(client: Api, app_id: int) -> list[tuple[Any, list[Any]]]:
    return [(sub, client.outbound_with_attempts(sub.id)) for sub in client.subscriptions(app_id)]


def _outbound_running(app_id: int, subscriptions: list[tuple[Any, list[Any]]]) -> bool:
    return any(d.moving for _, sent in subscriptions for d in sent)


@bp.post("/outbound/<delivery_id>/redeliver")
def redeliver(delivery_id: str) -> Response:
    app_id = request.form.get("app_id", type=int)
    api().redeliver(delivery_id)  # pending again and due now: the page polls fast until it is sent
    flash(f"Redelivery of {delivery_id} queued: its new attempt appears below.", "ok")
    if app_id is None:
        return redirect(url_for("console.apps"), 303)
    return redirect(url_for("console.deliveries", app_id=app_id) + "#outbound", 303)


# --------------------------------------------------------------------------- timeline


@bp.get("/timeline/<path:correlation_id>")
def timeline(correlation_id: str) -> str:
    client = api()
    chain = client.timeline(correlation_id)
    app = client.app(chain.app_ids[0]) if len(chain.app_ids) == 1 else None
    return render_template("console/timeline.html", chain=chain, app=app)


# --------------------------------------------------------------------------- helpers


def _mark_pending(app_id: int, newest: int) -> None:
    """A deploy was asked for while ``newest`` was the app's newest revision: watch for a newer one."""
    now = time.time()
    pending = {k: v for k, v in (session.get(PENDING) or {}).items() if now - float(v[0]) < PENDING_FOR}
    pending[str(app_id)] = [now, newest]
    session[PENDING] = pending


def _pending(app_id: int, newest: int) -> bool:
    """Still waiting for the revision asked for here to appear (for at most ``PENDING_FOR`` s)?"""
    pending = dict(session.get(PENDING) or {})
    entry = pending.get(str(app_id))
    if not entry:
        return False
    started, baseline = entry
    if newest > int(baseline) or time.time() - float(started) >= PENDING_FOR:
        del pending[str(app_id)]
        session[PENDING] = pending
        return False
    return True


def _parse(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def when(value: Any) -> str:
    parsed = _parse(value)
    return parsed.strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else ""


def ago(value: Any) -> str:
    parsed = _parse(value)
    if not parsed:
        return ""
    seconds = int((datetime.now(UTC) - parsed).total_seconds())
    if seconds < 5:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def short(value: Any, n: int = 7) -> str:
    return str(value)[:n] if value else ""


def image_label(value: Any, width: int = 48) -> str:
    """An image reference short enough for a table cell (the full one goes in a title attribute)."""
    text = str(value or "")
    if text.startswith("process:") and "/" in text:
        return "process:…/" + text.rstrip("/").rsplit("/", 1)[-1]
    if len(text) <= width:
        return text
    return text[: width // 2 - 1] + "…" + text[-(width // 2):]
