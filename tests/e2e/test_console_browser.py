"""The console in a real browser (Debian's Chromium driven by Playwright) against the whole stack.

``shipline up`` on free ports; an app with the process strategy is built and deployed twice from a
local git repository by signed GitHub pushes; then, in the browser: sign in, see the history,
press Rollback and watch the new revision become current without reloading, create a deploy hook
and see its token once, redeliver an outbound delivery, and follow a delivery's timeline.
Screenshots of the main pages go to pytest's tmp dir, or to the folder named by
``SHIPLINE_TEST_SCREENSHOTS`` (``SHIPLINE_TEST_SCREENSHOTS=docs/screenshots`` refreshes the README's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 60_000


class Receiver:
    """An outbound-webhook subscriber answering 200 with a small JSON body."""

    def __init__(self) -> None:
        self.got: list[dict[str, str]] = []
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                got.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps({"ok": True, "received": self.headers.get("X-Shipline-Event")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/shipline"


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        try:
            s.up()
        except AssertionError:
            # free_port() can race with other processes on a shared machine: once more, on new ports
            s.remove()
            s = Stack()
            s.up()
        yield s
    finally:
        s.remove()


def deployed_app(stack: Stack, receiver: Receiver) -> dict[str, Any]:
    """An app deployed twice (r1 = v1, r2 = v2) by signed pushes, with a subscriber to ``deployed``."""
    from shipline.config import load
    from shipline.demo import Demo

    demo = Demo(load(stack.env), docker=False, out=lambda line: None)
    demo.repo = demo.work / "repo"
    demo.repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(demo.repo)], check=True)
    demo.repo_url = f"file://{demo.repo}"
    base = stack.base
    sha1 = demo.commit("v1")
    resp = demo.http.post(f"{base}/api/v1/apps", timeout=15, json={
        "name": "storefront", "namespace": "shop", "repo_url": demo.repo_url, "branch": "main",
        "strategy": "process", "command": "python3 serve.py", "health_path": "/"})
    assert resp.status_code == 201, resp.text
    app = resp.json()
    resp = demo.http.post(f"{base}/api/v1/apps/{app['id']}/subscriptions", timeout=15,
                          json={"url": receiver.url, "events": ["deployed"], "description": "ops dashboard"})
    assert resp.status_code == 201, resp.text
    first = demo.push(app, sha1, "Release v1")
    live = demo.wait_for("revision 1 to go live", lambda: current(demo, base, app["id"], 1), 180)
    sha2 = demo.commit("v2")
    demo.push(app, sha2, "Release v2")
    demo.wait_for("revision 2 to go live", lambda: current(demo, base, app["id"], 2), 180)
    demo.through_proxy(live["url"], "v2")
    return {**app, "url": live["url"], "first_delivery": first, "demo": demo}


def current(demo: Any, base: str, app_id: int, revision: int) -> dict[str, Any] | None:
    """The app once ``revision`` is its current one (None before; fails fast if it failed)."""
    resp = demo.http.get(f"{base}/api/v1/apps/{app_id}/history", timeout=10)
    if resp.status_code != 200:
        return None  # not projected yet
    row = next((r for r in resp.json() if r["revision"] == revision), None)
    if row and row["status"] == "failed":
        raise AssertionError(f"revision {revision} failed: {row}")
    if row and row["current"]:
        return demo.http.get(f"{base}/api/v1/apps/{app_id}", timeout=10).json()  # type: ignore[no-any-return]
    return None


def reload_until(page: Any, selector: str, text: str, timeout: float = 60) -> None:
    """Reload a page that does not poll until ``selector`` shows ``text`` (the projection may lag)."""
    deadline = time.monotonic() + timeout
    while text not in page.locator(selector).inner_text():
        assert time.monotonic() < deadline, f"{selector} never showed {text!r}"
        time.sleep(1)
        page.reload()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the screenshots go: ``SHIPLINE_TEST_SCREENSHOTS`` (relative to the repo) or a tmp dir."""
    named = os.environ.get("SHIPLINE_TEST_SCREENSHOTS")
    folder = ROOT / named if named else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_console_in_a_real_browser(stack: Stack, screenshots: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    receiver = Receiver()
    app = deployed_app(stack, receiver)
    app_id, base = app["id"], stack.base
    t0 = time.monotonic()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)

            def shot(page: Any, name: str) -> None:
                page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)

            # nothing without signing in
            page.goto(f"{base}/console/apps/{app_id}")
            expect(page).to_have_url(re.compile(r"/console/login"))
            page.fill("#token", "wrong-token")
            page.click("#sign-in")
            expect(page.locator(".flash.error")).to_contain_text("not the admin token")
            shot(page, "login")
            page.fill("#token", stack.admin_token)
            page.click("#sign-in")
            expect(page).to_have_url(re.compile(rf"/console/apps/{app_id}$"))
            cookie = next(c for c in context.cookies() if c["name"] == "session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"

            # the apps list
            page.goto(f"{base}/console/")
            row = page.locator(f'#apps tr[data-app-id="{app_id}"]')
            expect(row.locator(".revision")).to_have_text("r2")
            expect(row).to_contain_text(app["url"])
            shot(page, "apps")

            # the app page: history with Rollback on the non-current entry
            row.locator("a").first.click()
            expect(page.locator("#current-revision")).to_have_text("r2")
            expect(page.locator('#history tr[data-revision="2"]')).to_have_class("current")
            expect(page.locator('#history tr[data-revision="2"] a.rollback')).to_have_count(0)
            expect(page.locator('#builds tr[data-build="2"]')).to_contain_text("succeeded")
            shot(page, "app")

            # Rollback: confirm, then watch r3 (= v1's image) become current without a reload
            page.locator('#history tr[data-revision="1"] a.rollback').click()
            expect(page.locator("h1")).to_have_text("Roll back storefront?")
            shot(page, "rollback-confirm")
            page.click("#confirm-rollback")
            expect(page.locator(".flash.ok")).to_contain_text("Rollback to revision 1 requested")
            page.evaluate("window.__sameDocument = true")
            expect(page.locator("#current-revision")).to_have_text("r3", timeout=150_000)
            assert page.evaluate("window.__sameDocument === true"), "the page reloaded instead of updating live"
            current = page.locator('#history tr[data-revision="3"]')
            expect(current).to_have_class("current")
            expect(current).to_contain_text("rollback")
            image_r1 = page.locator('#history tr[data-revision="1"] td').nth(3).inner_text()
            assert image_r1 and image_r1 in current.inner_text()
            shot(page, "app-after-rollback")
            app["demo"].through_proxy(app["url"], "v1")

            # a build with its log
            page.locator('#builds tr[data-build="1"] a').first.click()
            expect(page.locator("#build-log")).not_to_be_empty()
            shot(page, "build")

            # Hooks: the token is shown once, with a copy button and the curl example
            page.goto(f"{base}/console/apps/{app_id}/hooks")
            page.fill("#hook-name", "github-actions")
            page.locator("#create-hook button[type=submit]").click()
            token = page.locator("#token-value").inner_text().strip()
            assert len(token) >= 20
            expect(page.locator("#curl-example")).to_contain_text(f"X-Deploy-Hook-Token: {token}")
            expect(page.locator("#curl-example")).to_contain_text(f"{base}/api/v1/dh")
            page.locator('#new-token button[data-copy="#token-value"]').click()
            expect(page.locator('#new-token button[data-copy="#token-value"]')).to_have_text("Copied")
            assert page.evaluate("navigator.clipboard.readText()") == token
            shot(page, "hooks")
            page.reload()
            expect(page.locator("#new-token")).to_have_count(0)
            assert token not in page.content()
            reload_until(page, "#deploy-hooks", "github-actions")
            assert token not in page.content()

            # Deliveries: the push with its outcome; the subscriber's deliveries with attempts; Redeliver
            page.goto(f"{base}/console/apps/{app_id}/deliveries")
            inbound = page.locator(f'#inbound tr[data-delivery-id="{app["first_delivery"]}"]')
            expect(inbound).to_contain_text("github")
            newest = page.locator("tr[data-outbound-id]").first
            expect(newest).to_have_attribute("data-attempts", "1")
            expect(newest).to_contain_text("200")
            outbound_id = newest.get_attribute("data-outbound-id")
            sent_before = len(receiver.got)
            newest.locator("button.redeliver").click()
            expect(page.locator(".flash.ok")).to_contain_text("Redelivery of")
            again = page.locator(f'tr[data-outbound-id="{outbound_id}"]')
            expect(again).to_have_attribute("data-attempts", "2")
            assert len(receiver.got) > sent_before
            assert sum(h["x-shipline-delivery"] == outbound_id for h in receiver.got) >= 2
            again.locator("details.attempt").first.locator("summary").click()
            shot(page, "deliveries")

            # Timeline of the first push: received -> build -> deploy -> sent to subscribers
            inbound.locator("a.timeline-link").click()
            for stage in ("received", "build", "deploy", "sent"):
                expect(page.locator(f'ul.timeline[data-stage="{stage}"]')).to_have_count(1)
            shot(page, "timeline")
        finally:
            browser.close()
    assert time.monotonic() - t0 < 240
