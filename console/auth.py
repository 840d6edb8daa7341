"""Console sign-in and CSRF: the admin token opens a session; every POST carries the session's token.

The session is Flask's signed cookie (``SECRET_KEY`` is set by ``create_app``), HttpOnly and
SameSite=Lax. It holds a fingerprint of the admin token it was opened with, so changing
``SHIPLINE_ADMIN_TOKEN`` signs every console out. The CSRF token is per session, made at the first
page and compared in constant time on every POST (form field ``csrf_token`` or header
``X-CSRF-Token``), the sign-in form included.

A secret to be shown once (a new deploy-hook token) crosses the redirect after a POST inside the
session, Fernet-encrypted with ``SHIPLINE_SECRET_KEY``, and is removed by the page that shows it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from flask import abort, request, session

SIGNED_IN = "console_who"
CSRF = "console_csrf"
ONCE = "console_once"


def fingerprint(admin_token: str, secret_key: str) -> str:
    return hmac.new(secret_key.encode(), b"console:" + admin_token.encode(), hashlib.sha256).hexdigest()[:32]


def token_matches(given: str, admin_token: str) -> bool:
    return bool(given) and hmac.compare_digest(given.encode(), admin_token.encode())


def sign_in(admin_token: str, secret_key: str) -> None:
    session.clear()
    session[SIGNED_IN] = fingerprint(admin_token, secret_key)
    session[CSRF] = secrets.token_urlsafe(32)  # a fresh token per session: no fixation across sign-ins


def signed_in(admin_token: str, secret_key: str) -> bool:
    who = session.get(SIGNED_IN)
    return isinstance(who, str) and hmac.compare_digest(who, fingerprint(admin_token, secret_key))


def csrf_token() -> str:
    token = session.get(CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[CSRF] = token
    return token


def check_csrf() -> None:
    """Abort with 400 unless the POST carries this session's CSRF token."""
    expected = session.get(CSRF)
    given = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token") or ""
    if not isinstance(expected, str) or not given or not hmac.compare_digest(given.encode(), expected.encode()):
        abort(400, description="CSRF token missing or wrong: reload the page and try again")


def show_once(secret_key: str, **values: Any) -> None:
    import json

    session[ONCE] = Fernet(secret_key.encode()).encrypt(json.dumps(values).encode()).decode()


def take_once(secret_key: str) -> dict[str, Any] | None:
    import json

    sealed = session.pop(ONCE, None)
    if not isinstance(sealed, str):
        return None
    try:
        return json.loads(Fernet(secret_key.encode()).decrypt(sealed.encode(), ttl=300))  # type: ignore[no-any-return]
    except (InvalidToken, ValueError):
        return None


def safe_next(target: str | None) -> str | None:
    """Only a console path may be the target after sign-in (no open redirect)."""
    if target and target.startswith("/console") and not target.startswith("//") and "\\" not in target:
        return target
    return None
