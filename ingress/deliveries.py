"""Turning one verified inbound HTTP request into ``delivery.received`` records.

A record carries the exact raw body (UTF-8 text, or base64 when the bytes are not UTF-8) so a
signature can be re-verified in an audit, and only the headers on ``KEPT_HEADERS``: an allow-list,
so a bearer token (``Authorization``, ``X-Shipline-Token``, ``X-Skipper-Token``,
``X-Deploy-Hook-Token``, ``X-Gitlab-Token``, cookies...) can never reach Kafka. The HMAC signature
headers are kept: they are derived from the secret, not the secret.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping

from werkzeug.datastructures import EnvironHeaders, Headers

from shipline.envelope import Envelope, derive_id, now_iso, wrap
from shipline.messages import DeliveryReceived

SOURCE = "shipline/ingress"
DELIVERY_ID_HEADERS = ("X-GitHub-Delivery", "X-Gitlab-Event-UUID", "Idempotency-Key")
KEPT_HEADERS = (
    "Content-Type",
    "User-Agent",
    "X-GitHub-Event",
    "X-GitHub-Delivery",
    "X-GitHub-Hook-ID",
    "X-GitHub-Hook-Installation-Target-ID",
    "X-GitHub-Hook-Installation-Target-Type",
    "X-Hub-Signature",
    "X-Hub-Signature-256",
    "X-Gitlab-Event",
    "X-Gitlab-Event-UUID",
    "X-Gitlab-Webhook-UUID",
    "X-Gitlab-Instance",
    "Idempotency-Key",
    "X-Request-Id",
    "X-Forwarded-For",
)
MAX_DELIVERY_ID = 200
MAX_HEADER_VALUE = 1024


class BadDeliveryId(ValueError):
    pass


def delivery_id(headers: Mapping[str, str] | Headers) -> str:
    """The sender's id for this delivery (so a redelivery is recognised), else a fresh uuid4."""
    for name in DELIVERY_ID_HEADERS:
        value = (headers.get(name) or "").strip()
        if value:
            if len(value) > MAX_DELIVERY_ID or not value.isprintable():
                raise BadDeliveryId(f"header {name} must be at most {MAX_DELIVERY_ID} printable characters")
            return value
    return str(uuid.uuid4())


# each kept header's WSGI environ key, so a request's headers are read with one dict lookup each
# (``EnvironHeaders.get`` rebuilds the key on every call: a tenth of a webhook's Python time)
_ENVIRON_KEYS = tuple(
    (name, key if (key := name.upper().replace("-", "_")) in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}")
    for name in KEPT_HEADERS
)


def kept_headers(headers: Mapping[str, str] | Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(headers, EnvironHeaders):
        environ = headers.environ
        for name, key in _ENVIRON_KEYS:
            value = environ.get(key)
            if value is not None:
                out[name] = value[:MAX_HEADER_VALUE]
        return out
    for name in KEPT_HEADERS:
        value = headers.get(name)
        if value is not None:
            out[name] = value[:MAX_HEADER_VALUE]
    return out


def encode_body(raw: bytes) -> tuple[str, str]:
    """(body, body_encoding): the bytes exactly, as text when they are UTF-8."""
    try:
        return raw.decode("utf-8"), "utf8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


def records(
    app_ids: list[int],
    *,
    delivery: str,
    source: str,
    route: str,
    event: str,
    headers: Mapping[str, str] | Headers,
    raw: bytes,
    verification: str,
    hook_id: str | None = None,
) -> list[Envelope]:
    """One ``delivery.received`` per app, keyed by app id; the envelope id derives from (app, delivery)
    so a redelivery that slips past the store's check carries the same id downstream."""
    body, encoding = encode_body(raw)
    kept = kept_headers(headers)
    received = now_iso()
    return [
        wrap(
            DeliveryReceived(
                app_id=app_id,
                delivery_id=delivery,
                source=source,
                route=route,
                event=event,
                headers=kept,
                body=body,
                body_encoding=encoding,
                verification=verification,
                received_at=received,
                hook_id=hook_id,
            ),
            source=SOURCE,
            id=derive_id("delivery.received", app_id, delivery),
            correlationid=delivery,
            time=received,
        )
        for app_id in app_ids
    ]
