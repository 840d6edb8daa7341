"""The main job: a real push-to-deploy against a running stack, narrated step by step.

It makes a git repository locally, registers an app, subscribes a local receiver to
``build_finish``, sends a correctly signed GitHub push webhook, and follows the pipeline through
the read API: build, deploy, health check, the app answering through the proxy, then a second
commit (v2) and a rollback (v1 again). Nothing external is needed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

from shipline.config import Settings

APP_PY = '''"""Demo app: answers every GET with its version."""
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "{version}"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from shipline-demo {{VERSION}}\\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''

DOCKERFILE = """FROM shipline/busybox:latest
COPY index.html /www/index.html
CMD ["sh", "-c", "exec httpd -f -p ${PORT} -h /www"]
"""


class Receiver:
    """A local outbound-webhook subscriber that records what it gets."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append({"headers": dict(self.headers), "body": body})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/build"

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.received if r["headers"].get("X-Shipline-Event") == name]


class Demo:
    def __init__(self, settings: Settings, docker: bool, out: Any = print) -> None:
        self.s = settings
        self.docker = docker
        self.say = out
        self.base = settings.public_url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {settings.admin_token}"
        self.work = settings.data_dir / "demo" / uuid.uuid4().hex[:6]

    # -------------------------------------------------------------- helpers

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.repo), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    def commit(self, version: str) -> str:
        (self.repo / "serve.py").write_text(APP_PY.format(version=version))
        (self.repo / "index.html").write_text(f"hello from shipline-demo {version}\n")
        (self.repo / "Dockerfile").write_text(DOCKERFILE)
        self.git("add", "-A")
        self.git("-c", "user.name=Demo Dev", "-c", "user.email=dev@example.com", "commit", "-qm", f"Release {version}")
        return self.git("rev-parse", "HEAD")

    def push(self, app: dict[str, Any], sha: str, message: str) -> str:
        delivery = str(uuid.uuid4())
        payload = {
            "ref": "refs/heads/main", "before": "0" * 40, "after": sha, "created": False, "deleted": False,
            "repository": {"id": 1, "name": "shipline-demo", "full_name": "demo/shipline-demo",
                           "clone_url": self.repo_url, "html_url": self.repo_url,
                           "owner": {"login": "demo", "id": 1}},
            "pusher": {"name": "demo-dev", "email": "dev@example.com"},
            "head_commit": {"id": sha, "message": message, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "author": {"name": "Demo Dev", "email": "dev@example.com", "username": "demo-dev"}},
            "commits": [{"id": sha, "message": message}],
        }
        body = json.dumps(payload).encode()
        signature = "sha256=" + hmac.new(app["github_secret"].encode(), body, hashlib.sha256).hexdigest()
        resp = requests.post(app["github_webhook_url"], data=body, timeout=15, headers={
            "Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery,
            "X-Hub-Signature-256": signature, "User-Agent": "GitHub-Hookshot/demo"})
        self.say(f"  POST {app['github_webhook_url']} (push {sha[:7]}, delivery {delivery}) -> {resp.status_code}")
        resp.raise_for_status()
        return delivery

    def wait_for(self, what: str, check: Any, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except requests.RequestException as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what} (last answer: {last!r})")

    def current(self, app_id: int, revision: int) -> dict[str, Any] | None:
        app_resp = self.http.get(f"{self.base}/api/v1/apps/{app_id}", timeout=10)
        hist_resp = self.http.get(f"{self.base}/api/v1/apps/{app_id}/history", timeout=10)
        if app_resp.status_code != 200 or hist_resp.status_code != 200:
            return None  # not projected yet
        app, rows = app_resp.json(), hist_resp.json()
        row = next((r for r in rows if r["revision"] == revision), None)
        if row and row["status"] == "failed":
            raise RuntimeError(f"revision {revision} failed: {row}")
        if app.get("current_revision") == revision:
            return app
        return None

    def through_proxy(self, url: str, expect: str) -> str:
        def check() -> str | None:
            text = requests.get(url, timeout=5).text.strip()
            return text if expect in text else None

        return str(self.wait_for(f"{url} to answer {expect}", check, 30))

    # -------------------------------------------------------------- the run

    def run(self) -> int:
        s = self.say
        t0 = time.monotonic()
        strategy = "docker" if self.docker else "process"
        s(f"== Shipline demo ({strategy} strategy) against {self.base}")
        self.repo = self.work / "repo"
        self.repo.mkdir(parents=True)
        subprocess.run(["git", "init", "-q", "-b", "main", str(self.repo)], check=True)
        self.repo_url = f"file://{self.repo}"
        sha1 = self.commit("v1")
        s(f"1. made a git repository at {self.repo} (commit {sha1[:7]} 'Release v1')")

        spec = {"name": f"demo-{self.work.name}", "namespace": "demo", "repo_url": self.repo_url, "branch": "main",
                "strategy": strategy, "health_path": "/"}
        if strategy == "process":
            spec["command"] = "python3 serve.py"
        resp = self.http.post(f"{self.base}/api/v1/apps", json=spec, timeout=15)
        resp.raise_for_status()
        app = resp.json()
        s(f"2. registered app {app['name']} (id {app['id']}); GitHub webhook URL {app['github_webhook_url']}")

        receiver = Receiver()
        sub = self.http.post(f"{self.base}/api/v1/apps/{app['id']}/subscriptions",
                             json={"url": receiver.url, "events": ["build_finish", "deployed"],
                                   "description": "demo receiver"}, timeout=15)
        sub.raise_for_status()
        s(f"3. subscribed {receiver.url} to build_finish and deployed (subscription {sub.json()['id']})")

        s("4. sending a signed GitHub push webhook for v1")
        delivery = self.push(app, sha1, "Release v1")
        live = self.wait_for("revision 1 to go live", lambda: self.current(app["id"], 1), 180)
        url = live["url"]
        build_rows = self.http.get(f"{self.base}/api/v1/apps/{app['id']}/builds", timeout=10).json()
        if build_rows:
            b = build_rows[0]
            s(f"   build #{b.get('number', b.get('build'))} {b.get('status')} (image {b.get('image')})")
        s(f"   revision 1 deployed; the app answers through the proxy at {url}:")
        s(f"   GET {url} -> {self.through_proxy(url, 'v1')!r}")
        finish = self.wait_for("build_finish at the subscriber", lambda: receiver.events("build_finish"), 60)
        payload = json.loads(finish[0]["body"])
        s(f"5. the subscriber got build_finish (delivery {finish[0]['headers'].get('X-Shipline-Delivery')}, "
          f"signature {finish[0]['headers'].get('X-Shipline-Signature', '')[:19]}..., "
          f"status {payload.get('build', {}).get('status')})")

        sha2 = self.commit("v2")
        s(f"6. committed v2 ({sha2[:7]}) and pushed")
        self.push(app, sha2, "Release v2")
        self.wait_for("revision 2 to go live", lambda: self.current(app["id"], 2), 180)
        s(f"   revision 2 deployed: GET {url} -> {self.through_proxy(url, 'v2')!r}")

        s("7. rolling back to the previous revision")
        rb = self.http.post(f"{self.base}/api/v1/apps/{app['id']}/rollback", json={}, timeout=15)
        rb.raise_for_status()
        self.wait_for("the rollback (revision 3) to go live", lambda: self.current(app["id"], 3), 180)
        s(f"   revision 3 (rollback to v1) deployed: GET {url} -> {self.through_proxy(url, 'v1')!r}")

        rows = self.http.get(f"{self.base}/api/v1/apps/{app['id']}/history", timeout=10).json()
        s(f"8. history (GET /api/v1/apps/{app['id']}/history, or `shipline app history {app['name']}`):")
        s("   REV  TRIGGER   STATUS     CURRENT  COMMIT   IMAGE")
        for r in rows:
            s(f"   {r['revision']:<4} {r['trigger']:<9} {r['status']:<10} {'*' if r.get('current') else ' ':<8} "
              f"{(r.get('commit') or '')[:7]:<8} {r.get('image')}")
        audit = self.http.get(f"{self.base}/api/v1/audit", params={"correlation_id": delivery}, timeout=10).json()
        chain = audit["events"]
        s(f"9. audit chain of the first delivery (`shipline audit {delivery}`): "
          + " -> ".join(e.get("type", "?") for e in chain)
          + f"; {len(audit.get('outbound', []))} outbound deliveries")
        s(f"== demo finished in {time.monotonic() - t0:.1f}s. Console: {self.base}/console ; "
          f"API: {self.base}/api/v1/apps ; logs under {self.s.data_dir}/logs")
        return 0


def run(settings: Settings, docker: bool = False) -> int:
    return Demo(settings, docker, out=lambda line: print(line, flush=True)).run()

