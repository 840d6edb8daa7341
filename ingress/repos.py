"""Repository URLs and git refs as the Shipyard route matches them.

Two URLs name the same repository when they differ only in scheme/host case, a default port, a
trailing ``.git`` or ``/``. ``git@host:owner/repo`` (scp-like SSH) becomes ``ssh://git@host/owner/repo``.
A push payload offers several URLs (``html_url``, ``clone_url``, ``ssh_url``, ...); an app matches
when its normalised ``repo_url`` equals any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_SCP = re.compile(r"^(?P<user>[^@/\s]+@)?(?P<host>[^:/\s]+):(?P<path>(?!//)[^\s]*)$")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22, "git": 9418}
PAYLOAD_URL_FIELDS = ("html_url", "clone_url", "ssh_url", "git_url", "url", "svn_url")


def normalise(url: str) -> str:
    url = url.strip()
    scp = _SCP.match(url)
    if scp and "://" not in url:
        url = f"ssh://{scp['user'] or ''}{scp['host']}/{scp['path']}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return _strip(url)
    if not parts.scheme or not parts.netloc:
        return _strip(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    user = f"{parts.username}@" if parts.username else ""
    netloc = f"{user}{host}" if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{user}{host}:{port}"
    return urlunsplit((scheme, netloc, _strip(parts.path), parts.query, ""))


def _strip(path: str) -> str:
    while True:
        before = path
        path = path.rstrip("/")
        if path.endswith(".git"):
            path = path[:-4]
        if path == before:
            return path


def payload_repo_keys(repository: Any) -> list[str]:
    """Normalised URLs of a push payload's ``repository`` object (empty when it has none)."""
    if not isinstance(repository, dict):
        return []
    keys: list[str] = []
    for name in PAYLOAD_URL_FIELDS:
        value = repository.get(name)
        if isinstance(value, str) and value.strip():
            key = normalise(value)
            if key and key not in keys:
                keys.append(key)
    return keys


@dataclass(frozen=True)
class Ref:
    ref: str
    branch: str | None  # set for refs/heads/<branch>
    tag: str | None  # set for refs/tags/<tag>


def parse_ref(ref: str) -> Ref:
    if ref.startswith("refs/heads/"):
        return Ref(ref, ref[len("refs/heads/"):], None)
    if ref.startswith("refs/tags/"):
        return Ref(ref, None, ref[len("refs/tags/"):])
    return Ref(ref, None, None)
