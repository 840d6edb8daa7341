"""``python -m ingress``: the public app under gunicorn, accepting a signed push over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg
import pytest
import requests

from tests.integration.test_ingress_kit import body_of, github_headers, push_payload, read_envelopes

pytestmark = pytest.mark.integration


def _env(settings) -> dict[str, str]:
    return {**os.environ, **settings.env, "SHIPLINE_WEB_WORKERS": "2", "SHIPLINE_LOG_LEVEL": "WARNING"}


def _serve(settings, tmp_path) -> tuple[subprocess.Popen[bytes], Any, str]:
    base = f"http://{settings.http_host}:{settings.http_port}"
    log = open(tmp_path / "ingress.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ingress"], env=_env(settings), stdout=log, stderr=log)
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, log, base
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("gunicorn did not come up:\n" + (tmp_path / "ingress.log").read_text())
        time.sleep(0.3)


def test_python_m_ingress_serves_under_gunicorn_and_stops_on_sigterm(settings, tmp_path):
    proc, log, base = _serve(settings, tmp_path)
    try:
        admin = {"Authorization": f"Bearer {settings.admin_token}"}
        app = requests.post(f"{base}/api/v1/apps", json={"name": "shop", "namespace": "acme"}, headers=admin,
                            timeout=30).json()
        raw = body_of(push_payload())
        resp = requests.post(f"{base}/api/v1/webhooks/github/{app['id']}", data=raw,
                             headers=github_headers(raw, app["github_secret"]), timeout=30)
        assert resp.status_code == 201, resp.text
        assert resp.headers["Server"].startswith("gunicorn")
        (delivery,) = [e for e in read_envelopes(settings) if e.type == "delivery.received"]
        assert delivery.data.body.encode() == raw
        assert requests.get(f"{base}/api/v1/openapi.json", timeout=10).json()["openapi"] == "3.1.0"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "ingress.log").read_text()
    assert app["github_secret"] not in (tmp_path / "ingress.log").read_text()


def _fresh(method: str, url: str, **kw: Any) -> requests.Response:
    """One request on its own connection, so the kernel hands it to either worker."""
    return requests.request(method, url, headers={**kw.pop("headers", {}), "Connection": "close"}, timeout=30, **kw)


def test_gunicorn_workers_share_dedupe_and_refuse_a_deleted_hook_at_once(settings, tmp_path):
    """Two workers: redeliveries are duplicates and a deleted hook's token is refused on every
    request after the 204, whichever worker serves it; their notes reach PostgreSQL by SIGTERM."""
    proc, log, base = _serve(settings, tmp_path)
    try:
        admin = {"Authorization": f"Bearer {settings.admin_token}"}
        app = _fresh("POST", f"{base}/api/v1/apps", json={"name": "shop", "namespace": "acme",
                                                          "image": "ghcr.io/acme/shop"}, headers=admin).json()
        hook = _fresh("POST", f"{base}/api/v1/apps/{app['id']}/deploy-hooks", json={"name": "ci"},
                      headers=admin).json()
        dh = {"X-Deploy-Hook-Token": hook["token"], "Idempotency-Key": "ci-run-1"}
        first = _fresh("POST", f"{base}/api/v1/dh", json={"imageTag": "1"}, headers=dh)
        assert first.status_code == 201, first.text
        for _ in range(20):
            again = _fresh("POST", f"{base}/api/v1/dh", json={"imageTag": "1"}, headers=dh)
            assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
        assert _fresh("DELETE", f"{base}/api/v1/deploy-hooks/{hook['id']}", headers=admin).status_code == 204
        for i in range(20):
            refused = _fresh("POST", f"{base}/api/v1/dh", json={"imageTag": "1"},
                             headers={**dh, "Idempotency-Key": f"after-{i}"})
            assert refused.status_code == 404, refused.text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "ingress.log").read_text()
    deliveries = [e for e in read_envelopes(settings) if e.type == "delivery.received"]
    assert [e.data.delivery_id for e in deliveries] == ["ci-run-1"]
    with psycopg.connect(settings.db_url) as conn:  # written by the workers' notes before they exited
        seen = conn.execute(f'SELECT delivery_id FROM "{settings.schema("ingress")}".seen_deliveries').fetchall()
    assert seen == [("ci-run-1",)]
