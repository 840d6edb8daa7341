"""Request bodies: Shipway's ``build_finish`` shape for finished builds, the CloudEvent otherwise."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from shipline import codec
from shipline.envelope import Envelope
from shipline.messages import BuildFinished


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def cloudevent(env: Envelope) -> bytes:
    return dumps(codec.to_dict(env))


def shipway_time(value: str | None) -> str | None:
    """RFC 3339 with a numeric offset and whole seconds, as Shipway writes it."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return when.isoformat(timespec="seconds")


def _owner_and_name(repo_url: str) -> tuple[str | None, str | None]:
    path = urlsplit(repo_url).path if "://" in repo_url else repo_url.partition(":")[2]
    parts = [p for p in path.strip("/").removesuffix(".git").split("/") if p]
    if len(parts) >= 2:
        return parts[-2], parts[-1]
    return None, (parts[-1] if parts else None)


def _clone_url(repo_url: str) -> str:
    if repo_url.startswith(("http://", "https://")) and not repo_url.endswith(".git"):
        return repo_url.rstrip("/") + ".git"
    return repo_url


def _tag_name(full: str) -> str:
    last = full.rsplit("/", 1)[-1]
    name, sep, tag = last.rpartition(":")
    return tag if sep and name else "latest"


def _dockerfile_dir(build_config: dict[str, Any] | None) -> str:
    cfg = build_config or {}
    for key in ("dockerfile_dir", "context", "dir"):
        if isinstance(cfg.get(key), str) and cfg[key]:
            value = cfg[key]
            break
    else:
        dockerfile = cfg.get("dockerfile")
        value = dockerfile.rpartition("/")[0] if isinstance(dockerfile, str) else ""
    value = value.strip().removeprefix(".")
    return "/" + value.strip("/") if value.strip("/") else "/"


def build_finish(env: Envelope, context: dict[str, Any]) -> dict[str, Any]:
    """Shipway's payload, joined from build.finished and what was seen before it.

    ``context``: ``build`` (the build.queued row: message, author, repo_url, queued_at),
    ``app`` (app.registered: name, namespace, repo_url, build config) and ``push`` (the GitHub push:
    repository ids and the commit author's login and name). Anything unknown is null.
    """
    data = env.data
    assert isinstance(data, BuildFinished)
    build = context.get("build") or {}
    app = context.get("app") or {}
    push = context.get("push") or {}
    repository = push.get("repository") or {}
    pusher = push.get("author") or {}
    repo_url = build.get("repo_url") or app.get("repo_url") or ""
    owner, name = _owner_and_name(repo_url)
    owner_doc = repository.get("owner") or {}
    author = build.get("author") or None
    return {
        "build": {
            "build_num": data.build,
            "created_at": shipway_time(build.get("queued_at")) or shipway_time(env.time),
            "dockerfile_dir": _dockerfile_dir(app.get("build")),
            "exit_code": data.exit_code,
            "status": data.status,
            "finished_at": shipway_time(env.time),
            "updated_at": shipway_time(env.time),
        },
        "commit": {
            "author": {"login": pusher.get("login") or author, "name": pusher.get("name") or author},
            "message": build.get("message"),
            "sha": data.commit,
        },
        "image_tags": [{"full_name": t, "id": data.image_id, "name": _tag_name(t)} for t in data.tags],
        "images": [{"id": data.image_id, "pushed": False}] if data.image_id else [],
        "repository": {
            "clone_url": repository.get("clone_url") or (_clone_url(repo_url) if repo_url else None),
            "id": repository.get("id"),
            "name": repository.get("name") or name or app.get("name"),
            "owner": {"id": owner_doc.get("id"), "login": owner_doc.get("login") or owner or app.get("namespace")},
        },
    }


def github_push(body: str, encoding: str, headers: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(repository, author) from a GitHub push delivery's raw body, or None when it is not readable."""
    try:
        raw = base64.b64decode(body) if encoding == "base64" else body.encode()
        text = raw.decode()
        ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
        if "form-urlencoded" in ctype:
            text = parse_qs(text).get("payload", [""])[0]
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("repository"), dict):
        return None
    repo = doc["repository"]
    owner = repo.get("owner") if isinstance(repo.get("owner"), dict) else {}
    repository = {
        "id": repo.get("id") if isinstance(repo.get("id"), int) else None,
        "name": repo.get("name") if isinstance(repo.get("name"), str) else None,
        "clone_url": repo.get("clone_url") if isinstance(repo.get("clone_url"), str) else None,
        "owner": {
            "id": owner.get("id") if isinstance(owner.get("id"), int) else None,
            "login": next((owner[k] for k in ("login", "name") if isinstance(owner.get(k), str)), None),
        },
    }
    head: dict[str, Any] = doc["head_commit"] if isinstance(doc.get("head_commit"), dict) else {}
    who: dict[str, Any] = head["author"] if isinstance(head.get("author"), dict) else {}
    author = {
        "login": who.get("username") if isinstance(who.get("username"), str) else None,
        "name": who.get("name") if isinstance(who.get("name"), str) else None,
    }
    return repository, author
