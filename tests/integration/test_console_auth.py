"""The console's gate: nothing under /console without the admin token, and no POST without CSRF."""

from __future__ import annotations

import re

import pytest

from shipline.web import create_app

pytestmark = pytest.mark.integration

GET_PATHS = [
    "/console/",
    "/console/apps/1",
    "/console/apps/1/live",
    "/console/apps/1/builds/1",
    "/console/apps/1/builds/1/live",
    "/console/apps/1/rollback/1",
    "/console/apps/1/hooks",
    "/console/apps/1/deliveries",
    "/console/apps/1/deliveries/outbound",
    "/console/timeline/some-delivery",
    "/console/static/console.js",
    "/console/no/such/page",
]
POST_PATHS = [
    "/console/apps/1/rollback/1",
    "/console/apps/1/hooks",
    "/console/apps/1/hooks/h1/delete",
    "/console/apps/1/webhook/enable",
    "/console/apps/1/webhook/disable",
    "/console/outbound/d1/redeliver",
    "/console/logout",
]


@pytest.fixture
def app(settings):
    app = create_app(settings)
    yield app
    app.extensions["shipline"].pool.close()


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def sign_in(client, settings) -> str:
    page = client.get("/console/login")
    assert page.status_code == 200
    resp = client.post("/console/login", data={"token": settings.admin_token, "csrf_token": csrf_of(page.text)})
    assert resp.status_code == 303, resp.text
    return csrf_of(client.get("/console/").text)


def test_every_page_redirects_to_sign_in(app) -> None:
    client = app.test_client()
    for path in GET_PATHS:
        resp = client.get(path)
        assert resp.status_code == 303, (path, resp.status_code)
        assert resp.headers["Location"].startswith("/console/login"), path
    for path in POST_PATHS:
        resp = client.post(path, data={"name": "x", "app_id": "1"})
        assert resp.status_code == 303, (path, resp.status_code)
        assert resp.headers["Location"].startswith("/console/login"), path
    assert client.get("/console").status_code in (301, 308)  # to /console/, which then asks for sign-in


def test_sign_in_with_the_admin_token(app, settings) -> None:
    client = app.test_client()
    page = client.get("/console/login?next=/console/apps/7/hooks")
    csrf = csrf_of(page.text)

    wrong = client.post("/console/login", data={"token": "not-the-token", "csrf_token": csrf})
    assert wrong.status_code == 401
    assert "not the admin token" in wrong.text
    assert client.get("/console/").status_code == 303

    resp = client.post("/console/login", data={"token": settings.admin_token, "csrf_token": csrf,
                                                "next": "/console/apps/7/hooks"})
    assert resp.status_code == 303
    assert resp.headers["Location"] == "/console/apps/7/hooks"
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert settings.admin_token not in cookie

    apps = client.get("/console/")
    assert apps.status_code == 200
    assert "<h1>Apps</h1>" in apps.text
    assert client.get("/console/static/console.js").status_code == 200

    # only console paths are accepted as the place to go after sign-in
    client2 = app.test_client()
    csrf2 = csrf_of(client2.get("/console/login").text)
    resp = client2.post("/console/login", data={"token": settings.admin_token, "csrf_token": csrf2,
                                                 "next": "https://evil.example/"})
    assert resp.headers["Location"] == "/console/"


def test_posts_without_the_csrf_token_are_refused(app, settings) -> None:
    client = app.test_client()
    # the sign-in form itself
    client.get("/console/login")
    resp = client.post("/console/login", data={"token": settings.admin_token})
    assert resp.status_code == 400
    assert "CSRF" in resp.text
    assert client.get("/console/").status_code == 303

    csrf = sign_in(client, settings)
    for path in POST_PATHS:
        for data in ({}, {"csrf_token": "forged"}, {"csrf_token": csrf[:-1]}):
            resp = client.post(path, data={**data, "name": "x", "app_id": "1"})
            assert resp.status_code == 400, (path, data, resp.status_code)
            assert "CSRF" in resp.text
    # still signed in: the refused sign-out did nothing
    assert client.get("/console/").status_code == 200
    # the token from another session does not work either
    other = app.test_client()
    other_csrf = sign_in(other, settings)
    assert other_csrf != csrf
    assert client.post("/console/logout", data={"csrf_token": other_csrf}).status_code == 400
    # with the right token sign-out works, and the session is gone
    assert client.post("/console/logout", data={"csrf_token": csrf}).status_code == 303
    assert client.get("/console/").status_code == 303


def test_changing_the_admin_token_signs_everyone_out(app, settings) -> None:
    import dataclasses

    client = app.test_client()
    sign_in(client, settings)
    assert client.get("/console/").status_code == 200
    ctx = app.extensions["shipline"]
    ctx.settings = dataclasses.replace(settings, admin_token="adm-rotated")
    try:
        assert client.get("/console/").status_code == 303
    finally:
        ctx.settings = settings


def test_pages_render_for_an_empty_system(app, settings) -> None:
    client = app.test_client()
    sign_in(client, settings)
    apps = client.get("/console/")
    assert apps.status_code == 200
    assert 'id="no-apps"' in apps.text
    assert f"curl -X POST {settings.public_url}/api/v1/apps" in apps.text
    missing = client.get("/console/apps/424242")
    assert missing.status_code == 404
    assert "text/html" in missing.headers["Content-Type"]
    timeline = client.get("/console/timeline/nothing-here")
    assert timeline.status_code == 200
    assert "Nothing recorded for this id" in timeline.text
    assert client.get("/console/no/such/page").status_code == 404
