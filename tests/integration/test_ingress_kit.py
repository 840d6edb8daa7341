"""Shared helpers of the ingress tests (no tests here): GitHub payload shapes, a harness around
``shipline.web.create_app`` with the real Kafka and PostgreSQL, and the secret scan that runs when
every ingress test ends: no secret or token the test generated may appear in any topic, in the
captured logs or in the ingress's tables."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from ingress.rebuild import read_topic
from shipline import codec
from shipline.config import Settings
from shipline.envelope import Envelope
from shipline.messages import DeliveryReceived


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def sha1_sign(secret: str, body: bytes) -> str:
    return "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def repository(html_url: str = "https://github.com/acme/shop") -> dict[str, Any]:
    """The ``repository`` object of a GitHub webhook payload (trimmed to its usual fields)."""
    owner, name = html_url.rstrip("/").split("/")[-2:]
    api = f"https://api.github.com/repos/{owner}/{name}"
    return {
        "id": 881234567,
        "node_id": "R_kgDONSXxhw",
        "name": name,
        "full_name": f"{owner}/{name}",
        "private": False,
        "owner": {"name": owner, "email": None, "login": owner, "id": 1234567, "type": "Organization",
                  "html_url": f"https://github.com/{owner}", "site_admin": False},
        "html_url": html_url,
        "description": "The shop",
        "fork": False,
        "url": f"https://github.com/{owner}/{name}",
        "git_url": f"git://github.com/{owner}/{name}.git",
        "ssh_url": f"git@github.com:{owner}/{name}.git",
        "clone_url": f"https://github.com/{owner}/{name}.git",
        "svn_url": f"https://github.com/{owner}/{name}",
        "commits_url": api + "/commits{/sha}",
        "created_at": 1731400000,
        "updated_at": "2025-11-20T09:13:41Z",
        "pushed_at": 1732000000,
        "homepage": None,
        "size": 120,
        "stargazers_count": 3,
        "watchers_count": 3,
        "language": "Python",
        "default_branch": "main",
        "master_branch": "main",
        "organization": owner,
        "visibility": "public",
    }


def push_payload(
    html_url: str = "https://github.com/acme/shop",
    ref: str = "refs/heads/main",
    *,
    deleted: bool = False,
    message: str = "Fix the checkout total",
) -> dict[str, Any]:
    """A GitHub ``push`` event payload as GitHub sends it."""
    after = "0" * 40 if deleted else uuid.uuid4().hex + "deadbeef"
    before = "6113728f27ae82c7b1a177c8d03f9e96e0adf246"
    author = {"name": "Ada Lovelace", "email": "ada@example.com", "username": "ada"}
    commit = {
        "id": after,
        "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433",
        "distinct": True,
        "message": message,
        "timestamp": "2025-11-22T10:15:02+01:00",
        "url": f"{html_url}/commit/{after}",
        "author": author,
        "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
        "added": ["shop/checkout.py"],
        "removed": [],
        "modified": ["README.md"],
    }
    return {
        "ref": ref,
        "before": before,
        "after": after,
        "repository": repository(html_url),
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "organization": {"login": "acme", "id": 1234567},
        "sender": {"login": "ada", "id": 7654321, "type": "User", "site_admin": False},
        "created": False,
        "deleted": deleted,
        "forced": False,
        "base_ref": None,
        "compare": f"{html_url}/compare/{before[:12]}...{after[:12]}",
        "commits": [] if deleted else [commit],
        "head_commit": None if deleted else commit,
    }


def ping_payload(html_url: str = "https://github.com/acme/shop") -> dict[str, Any]:
    return {
        "zen": "Keep it logically awesome.",
        "hook_id": 512345678,
        "hook": {"type": "Repository", "id": 512345678, "name": "web", "active": True, "events": ["push"],
                 "config": {"content_type": "json", "insecure_ssl": "0", "url": "https://ship.example.com/x"}},
        "repository": repository(html_url),
        "sender": {"login": "ada", "id": 7654321, "type": "User"},
    }


def body_of(payload: dict[str, Any]) -> bytes:
    """GitHub sends compact JSON with a trailing newline-free body; any exact bytes will do."""
    return json.dumps(payload, indent=2).encode()


def github_headers(
    body: bytes, secret: str | None, event: str = "push", delivery: str | None = None
) -> dict[str, str]:
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/6b1c3f2",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "512345678",
        "X-GitHub-Hook-Installation-Target-ID": "881234567",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
    }
    if secret is not None:
        headers["X-Hub-Signature"] = sha1_sign(secret, body)
        headers["X-Hub-Signature-256"] = sign(secret, body)
    return headers


def read_envelopes(settings: Settings, topic: str | None = None) -> list[Envelope]:
    return [codec.decode(v) for _, _, v in read_topic(settings.bootstrap_servers, topic or settings.topics.inbound)]


@dataclass
class Harness:
    settings: Settings
    app: Any
    client: Any
    secrets: list[str] = field(default_factory=list)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}

    def remember(self, doc: dict[str, Any]) -> dict[str, Any]:
        for key in ("github_secret", "token"):
            if key in doc:
                self.secrets.append(doc[key])
        return doc

    def register(self, **fields: Any) -> dict[str, Any]:
        fields.setdefault("name", f"app-{uuid.uuid4().hex[:8]}")
        fields.setdefault("namespace", "acme")
        resp = self.client.post("/api/v1/apps", json=fields, headers=self.admin)
        assert resp.status_code == 201, resp.get_json()
        return self.remember(resp.get_json())

    def deploy_hook(self, app_id: int, name: str = "ci") -> dict[str, Any]:
        resp = self.client.post(f"/api/v1/apps/{app_id}/deploy-hooks", json={"name": name}, headers=self.admin)
        assert resp.status_code == 201, resp.get_json()
        return self.remember(resp.get_json())

    def enable_webhook(self, app_id: int) -> dict[str, Any]:
        resp = self.client.post(f"/api/v1/apps/{app_id}/webhook", headers=self.admin)
        assert resp.status_code == 201, resp.get_json()
        return self.remember(resp.get_json())

    def github(self, path: str, payload: dict[str, Any], secret: str | None, event: str = "push",
               delivery: str | None = None, body: bytes | None = None) -> Any:
        raw = body if body is not None else body_of(payload)
        return self.client.post(path, data=raw, headers=github_headers(raw, secret, event, delivery))

    def envelopes(self) -> list[Envelope]:
        return read_envelopes(self.settings)

    def deliveries(self) -> list[Envelope]:
        return [e for e in self.envelopes() if isinstance(e.data, DeliveryReceived)]

    def flush_notes(self) -> None:
        """Wait for the accepted deliveries' rows (``ingress.notes`` writes them in the background)."""
        if self.app is not None:
            assert self.app.extensions["shipline"].extras["ingress"].notes.flush(10)

    def store_dump(self) -> str:
        self.flush_notes()
        schema = self.settings.schema("ingress")
        with psycopg.connect(self.settings.db_url) as conn:
            parts = []
            for table in ("apps", "deploy_hooks", "webhook_tokens", "seen_deliveries"):
                rows = conn.execute(f'SELECT * FROM "{schema}".{table} ORDER BY 1, 2').fetchall()
                parts.append(f"{table}: {rows!r}")
        return "\n".join(parts)

    def scan_for_secrets(self, log_text: str) -> None:
        """No raw secret or token generated during the test is in any topic, log line or table."""
        raw: list[bytes] = []
        for topic in self.settings.topics.all():
            raw.extend(v or b"" for _, _, v in read_topic(self.settings.bootstrap_servers, topic))
        blob = b"\n".join(raw)
        dump = self.store_dump()
        for secret in self.secrets:
            assert secret.encode() not in blob, "a raw secret/token reached Kafka"
            assert secret not in log_text, "a raw secret/token reached the logs"
            assert secret not in dump, "a raw secret/token is stored in the ingress tables"


def make_harness(settings: Settings, **create: Any) -> Harness:
    from shipline.web import create_app

    app = create_app(settings, **create)
    return Harness(settings=settings, app=app, client=app.test_client())


@pytest.fixture
def ingress(settings: Settings, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]):
    """A harness on the full public app; at teardown, the secret scan over topics, logs and tables."""
    caplog.set_level(logging.DEBUG)
    harness = make_harness(settings)
    yield harness
    out, err = capfd.readouterr()
    harness.scan_for_secrets(caplog.text + out + err)
    harness.app.extensions["shipline"].producer.flush(5)
    harness.app.extensions["shipline"].pool.close()
