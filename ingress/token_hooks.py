"""Token-authenticated deploy hooks: Skipper's per-app webhook and Shipmight's deploy hooks.

Tokens are compared by SHA-256 hash in constant time; the token itself is never stored, logged
or published (``ingress.deliveries`` keeps only allow-listed headers).
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from ingress import errors, validation
from ingress.accept import accept
from ingress.context import deps
from ingress.crypto import same_hash, signature_matches, token_hash
from ingress.deliveries import delivery_id
from shipline.web import error, json_body

bp = Blueprint("ingress_token_hooks", __name__)
errors.install(bp)

TOKEN_HEADERS = ("X-Shipline-Token", "X-Skipper-Token")
HOOK_HEADER = "X-Deploy-Hook-Token"
SIGNATURE = "X-Hub-Signature-256"

Answer = tuple[Response, int] | Response


def _token(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = request.headers.get(name)
        if value:
            return value.strip()
    return None


@bp.post("/api/v1/webhook/<namespace>/<name>")
def skipper(namespace: str, name: str) -> Answer:
    """Skipper's ``{image, commit?}`` deploy, authenticated by the app's webhook token or HMAC."""
    ingress = deps()
    raw = request.get_data(cache=True)
    delivery = delivery_id(request.headers)
    app = ingress.credentials.app_by_name(namespace, name, delivery)
    if app is None:
        return error(404, f"no app named {name[:100]!r} in namespace {namespace[:100]!r}")
    token = _token(TOKEN_HEADERS)
    if token is not None:
        if app.token_hash is None:
            return error(401, f"the webhook token of app {namespace}/{name} is not enabled")
        if not same_hash(token_hash(token), app.token_hash):
            return error(401, f"token is not the webhook token of app {namespace}/{name}")
        verification = "token"
    elif request.headers.get(SIGNATURE) is not None and app.secret_encrypted:
        if not signature_matches(ingress.box.decrypt(app.secret_encrypted), raw, request.headers[SIGNATURE]):
            return error(401, f"{SIGNATURE} does not match the body signed with app {app.id}'s secret")
        verification = "hmac"
    else:
        return error(401, f"missing {TOKEN_HEADERS[0]} (or {TOKEN_HEADERS[1]}) header")
    image, commit = validation.image_deploy(json_body())
    return accept([app], delivery=delivery, source="skipper", event="deploy", verification=verification,
                  status="queued", code=201, extra={"image": image, "commit": commit})


@bp.post("/api/v1/dh")
def shipmight() -> Answer:
    """Shipmight's deploy hook: ``{"imageTag"}`` for services, instance env vars for jobs."""
    ingress = deps()
    request.get_data(cache=True)
    token = _token((HOOK_HEADER,))
    if token is None:
        return error(401, f"missing {HOOK_HEADER} header")
    delivery = delivery_id(request.headers)
    digest = token_hash(token)
    found = ingress.credentials.hook_by_token(digest, delivery)
    if found is None or not same_hash(digest, found[1]):
        return error(404, "deploy hook not found: the token is unknown or its hook was deleted")
    hook_id, _, app = found
    doc = json_body()
    if app.kind == "job":
        env = validation.job_environment(doc)
        return accept([app], delivery=delivery, source="shipmight", event="job", verification="deploy_hook",
                      status="triggered", code=201, hook_id=hook_id, extra={"variables": sorted(env)})
    tag = validation.image_tag(doc)
    if not app.image:
        return error(400, f"app {app.id} has no image repository to deploy tag {tag!r} of; set its 'image'",
                     field="imageTag")
    return accept([app], delivery=delivery, source="shipmight", event="deploy", verification="deploy_hook",
                  status="triggered", code=201, hook_id=hook_id, extra={"image": f"{app.image}:{tag}"})
