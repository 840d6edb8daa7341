"""``python -m ingress``: the public app under gunicorn, accepting a signed push over real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.integration.test_ingress_kit import body_of, github_headers, push_payload, read_envelopes

pytestmark = pytest.mark.integration


def _env(settings) -> dict[str, str]:
    return {**os.environ, **settings.env, "SHIPLINE_WEB_WORKERS": "2", "SHIPLINE_LOG_LEVEL": "WARNING"}


def test_python_m_ingress_serves_under_gunicorn_and_stops_on_sigterm(settings, tmp_path):
    base = f"http://{settings.http_host}:{settings.http_port}"
    log = open(tmp_path / "ingress.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "ingress"], env=_env(settings), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, (tmp_path / "ingress.log").read_text()
            assert time.monotonic() < deadline, "gunicorn did not come up"
            time.sleep(0.3)
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
