"""Subscription secrets and request signatures.

Two signatures ride on every request: ``X-Shipline-Signature: sha256=<hex>`` (GitHub style,
HMAC-SHA256 of the body keyed with the secret string exactly as shown at creation) and Standard
Webhooks ``webhook-signature: v1,<base64>`` (HMAC-SHA256 of ``id.timestamp.body`` keyed with the
base64-decoded part of a ``whsec_`` secret, or the secret's bytes when it has no such prefix).
During a rotation both secrets sign: the Standard Webhooks header lists both signatures (space
separated, as the spec allows); the hex header keeps the exact GitHub format with the new secret,
and ``X-Shipline-Signature-Previous`` carries the old secret's hex signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Sequence

from cryptography.fernet import Fernet, InvalidToken

from outbound import VERSION

PREFIX = "whsec_"
MIN_LEN = 8
MAX_LEN = 256
USER_AGENT = f"Shipline-Hookshot/{VERSION}"


def generate() -> str:
    """A Standard Webhooks secret: ``whsec_`` + base64 of 24 random bytes."""
    return PREFIX + base64.b64encode(os.urandom(24)).decode()


def validate(secret: object) -> str:
    if not isinstance(secret, str) or not MIN_LEN <= len(secret) <= MAX_LEN or not secret.isprintable():
        raise ValueError(f"secret must be a printable string of {MIN_LEN} to {MAX_LEN} characters")
    if " " in secret or "," in secret:
        raise ValueError("secret must not contain spaces or commas")
    if secret.startswith(PREFIX):
        try:
            raw = base64.b64decode(secret[len(PREFIX):], validate=True)
        except ValueError:
            raise ValueError("a whsec_ secret must be followed by base64") from None
        if len(raw) < 16:
            raise ValueError("a whsec_ secret must hold at least 16 bytes")
    return secret


def encrypt(key: str, secret: str) -> str:
    return Fernet(key.encode()).encrypt(secret.encode()).decode()


def decrypt(key: str, token: str) -> str:
    try:
        return Fernet(key.encode()).decrypt(token.encode()).decode()
    except (InvalidToken, ValueError) as exc:
        raise ValueError("secret cannot be decrypted with SHIPLINE_SECRET_KEY") from exc


def signing_key(secret: str) -> bytes:
    """The Standard Webhooks key: the base64 part of a ``whsec_`` secret, else the secret's bytes."""
    if secret.startswith(PREFIX):
        return base64.b64decode(secret[len(PREFIX):])
    return secret.encode()


def hex_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    to_sign = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), to_sign, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(
    *, delivery_id: str, event: str, body: bytes, secrets: Sequence[str], timestamp: int
) -> dict[str, str]:
    """Every header of one attempt; ``secrets`` is [current] or [current, previous] during rotation."""
    out = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Shipline-Event": event,
        "X-Shipline-Delivery": delivery_id,
        "X-Shipline-Signature": hex_signature(secrets[0], body),
        "webhook-id": delivery_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(standard_signature(s, delivery_id, timestamp, body) for s in secrets),
    }
    if len(secrets) > 1:
        out["X-Shipline-Signature-Previous"] = hex_signature(secrets[1], body)
    return out
