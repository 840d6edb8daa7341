"""GitHub push webhooks: per app (SkyPort's route) and by repository (Shipyard's route).

Verification comes first: ``X-Hub-Signature-256`` is the HMAC-SHA256 of the raw body with the
app's secret (on ``/api/webhook`` also ``GITHUB_WEBHOOK_SECRET``); a missing signature is accepted
only for apps registered with ``allow_unsigned``. Then ``ping`` answers 200 with nothing queued,
events other than ``push`` are recorded and answered 202 (ignored downstream), tag pushes and
branch deletions start nothing, and a push to a tracked branch is queued (201).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request

from ingress import errors
from ingress.accept import accept, duplicate
from ingress.context import deps
from ingress.crypto import signature_matches
from ingress.deliveries import delivery_id
from ingress.repos import parse_ref, payload_repo_keys
from ingress.store import App
from shipline.web import error, json_body

bp = Blueprint("ingress_github", __name__)
errors.install(bp)

SIGNATURE = "X-Hub-Signature-256"
EVENT = "X-GitHub-Event"
MAX_APP_ID = 2**63 - 1

Answer = tuple[Response, int] | Response


def app_id_of(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) <= MAX_APP_ID else None


def _secret_ok(app: App, raw: bytes, header: str | None) -> bool:
    return signature_matches(deps().box.decrypt(app.secret_encrypted), raw, header)


def _ignored(delivery: str, reason: str) -> Answer:
    return jsonify({"status": "ignored", "reason": reason, "delivery_id": delivery, "app_ids": []}), 202


def _push_target(doc: dict[str, Any], delivery: str) -> tuple[str | None, Answer | None]:
    """The pushed branch, or the answer for a push that starts nothing."""
    ref = doc.get("ref")
    if not isinstance(ref, str) or not ref:
        return None, error(400, "push payload has no 'ref'", field="ref")
    parsed = parse_ref(ref)
    if parsed.tag is not None:
        return None, _ignored(delivery, f"tag push ({ref}) starts nothing")
    if doc.get("deleted") is True:
        return None, _ignored(delivery, f"branch deletion ({ref}) starts nothing")
    if parsed.branch is None:
        return None, _ignored(delivery, f"push to {ref} (not a branch) starts nothing")
    return parsed.branch, None


@bp.post("/api/v1/webhooks/github/<app_id>")
def github_app(app_id: str) -> Answer:
    raw = request.get_data(cache=True)
    number = app_id_of(app_id)
    delivery = delivery_id(request.headers)
    app = deps().credentials.app(number, delivery) if number is not None else None
    if app is None:
        return error(404, f"no app with id {app_id[:40]!r}")
    header = request.headers.get(SIGNATURE)
    if header is not None:
        if not _secret_ok(app, raw, header):
            return error(401, f"{SIGNATURE} does not match the body signed with app {app.id}'s secret")
        verification = "hmac"
    elif app.allow_unsigned:
        verification = "unsigned"
    else:
        return error(401, f"missing {SIGNATURE}: app {app.id} accepts only signed deliveries")
    doc = json_body()
    event = request.headers.get(EVENT, "").strip()
    if event == "ping":
        return jsonify({"status": "ping", "delivery_id": delivery, "app_ids": [app.id]})
    if not event:
        return error(400, f"missing {EVENT} header")
    if event != "push":
        return accept([app], delivery=delivery, source="github", event=event, verification=verification,
                      status="ignored", code=202, extra={"reason": f"event {event!r} starts nothing"})
    branch, answer = _push_target(doc, delivery)
    if answer is not None:
        return answer
    if branch != app.branch:
        return error(404, f"branch {branch!r} does not match app {app.id}'s branch {app.branch!r}")
    return accept([app], delivery=delivery, source="github", event=event, verification=verification,
                  status="queued", code=201)


@bp.post("/api/webhook")
def shipyard() -> Answer:
    """Every app whose repository URL and branch match the push (Shipyard's route)."""
    ingress = deps()
    raw = request.get_data(cache=True)
    doc = json_body()
    delivery = delivery_id(request.headers)
    keys = payload_repo_keys(doc.get("repository"))
    candidates = ingress.credentials.apps_by_repo(keys, delivery) if keys else []
    header = request.headers.get(SIGNATURE)
    repo = _repo_name(doc)
    if header is not None:
        global_ok = signature_matches(ingress.settings.github_webhook_secret, raw, header)
        verified = [a for a in candidates if global_ok or _secret_ok(a, raw, header)]
        if not global_ok and not verified:
            if not candidates and not ingress.settings.github_webhook_secret:
                return error(404, f"no app is registered for repository {repo}")
            return error(401, f"{SIGNATURE} does not match GITHUB_WEBHOOK_SECRET or the secret of any app "
                              f"registered for repository {repo}")
        verification = "hmac"
    else:
        verified = [a for a in candidates if a.allow_unsigned]
        if not verified:
            return error(401, f"missing {SIGNATURE} (only apps registered with allow_unsigned accept unsigned "
                              "deliveries)")
        verification = "unsigned"
    event = request.headers.get(EVENT, "").strip()
    if event == "ping":
        return jsonify({"status": "ping", "delivery_id": delivery, "app_ids": [a.id for a in verified]})
    if not event:
        return error(400, f"missing {EVENT} header")
    if not verified:
        return error(404, f"no app is registered for repository {repo}")
    if event != "push":
        return accept(verified, delivery=delivery, source="shipyard", event=event, verification=verification,
                      status="ignored", code=202, extra={"reason": f"event {event!r} starts nothing"})
    branch, answer = _push_target(doc, delivery)
    if answer is not None:
        return answer
    matched = [a for a in verified if a.branch == branch]
    if not matched:
        tracked = ", ".join(sorted({repr(a.branch) for a in verified}))
        return error(404, f"no app registered for repository {repo} tracks branch {branch!r} "
                          f"(its apps track {tracked})")
    if all(a.seen for a in matched):
        return duplicate(delivery)
    return accept(matched, delivery=delivery, source="shipyard", event=event, verification=verification,
                  status="queued", code=201)


def _repo_name(doc: dict[str, Any]) -> str:
    repository = doc.get("repository")
    if isinstance(repository, dict):
        for field in ("html_url", "clone_url", "full_name"):
            value = repository.get(field)
            if isinstance(value, str) and value:
                return repr(value[:300])
    return "(the payload names no repository)"
