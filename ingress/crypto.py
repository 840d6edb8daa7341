"""Secrets and tokens: generation, SHA-256 token hashes, GitHub HMAC signatures, Fernet at rest.

Bearer tokens (deploy hooks, per-app webhook tokens) are stored only as SHA-256 hashes; a lookup
hashes the presented token and compares hashes with ``hmac.compare_digest``. GitHub HMAC secrets
must be recoverable to verify signatures, so they are stored Fernet-encrypted with
``SHIPLINE_SECRET_KEY`` and decrypted in memory only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken

DEPLOY_HOOK = "shpdh"
WEBHOOK_TOKEN = "shpwh"
PREFIX_CHARS = 6  # random characters shown after the kind in a token's prefix


def new_secret() -> str:
    """A GitHub webhook secret (64 hex characters)."""
    return secrets.token_hex(32)


def new_token(kind: str) -> str:
    """A bearer token whose first characters say what it is, e.g. ``shpdh_3kT9x...``."""
    return f"{kind}_{secrets.token_urlsafe(32)}"


def token_prefix(token: str) -> str:
    """The part of a token that may be shown again later, to tell tokens apart."""
    kind, _, rest = token.partition("_")
    return f"{kind}_{rest[:PREFIX_CHARS]}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def same_hash(presented: str, stored: str | None) -> bool:
    return stored is not None and hmac.compare_digest(presented.encode(), stored.encode())


def signature(secret: str, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub sends for ``body`` signed with ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signature_matches(secret: str | None, body: bytes, header: str | None) -> bool:
    """Constant-time check of an ``X-Hub-Signature-256`` header (``sha256=<hex>``)."""
    if not secret or not header:
        return False
    expected = signature(secret, body)
    return hmac.compare_digest(expected.encode(), header.strip().lower().encode("ascii", "replace"))


class SecretBox:
    """Fernet encryption of secrets at rest, with decrypted values cached by ciphertext."""

    def __init__(self, key: str) -> None:
        self._fernet = Fernet(key.encode())
        self.decrypt = lru_cache(maxsize=4096)(self._decrypt)

    def encrypt(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def _decrypt(self, ciphertext: str | None) -> str | None:
        """The secret, or None when there is none or it was encrypted with another key."""
        if not ciphertext:
            return None
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except (InvalidToken, ValueError):
            return None
