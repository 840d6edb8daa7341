"""The gunicorn command line and the OpenAPI document (no services needed)."""

from __future__ import annotations

import jsonschema
import pytest
from flask import Flask
from schemathesis.specs.openapi.definitions import OPENAPI_31

from ingress import admin, github, openapi, token_hooks
from ingress.serve import APP, gunicorn_argv
from shipline.config import load

pytestmark = pytest.mark.unit


def test_gunicorn_argv_serves_the_app_factory_on_shipline_http(tmp_path):
    settings = load({"SHIPLINE_DATA_DIR": str(tmp_path), "SHIPLINE_HTTP": "0.0.0.0:9999", "SHIPLINE_WEB_WORKERS": "3"})
    argv = gunicorn_argv(settings)
    assert argv[1:3] == ["-m", "gunicorn"] and argv[-1] == APP == "ingress.serve:app_factory()"
    assert argv[argv.index("--bind") + 1] == "0.0.0.0:9999" and argv[argv.index("--workers") + 1] == "3"
    assert argv[argv.index("--worker-class") + 1] == "gthread"
    assert "--preload" not in argv  # librdkafka and psycopg connections must be made after the fork


def test_openapi_document_is_valid_openapi_31_and_covers_every_ingress_route():
    doc = openapi.document()
    jsonschema.Draft202012Validator(OPENAPI_31).validate(doc)
    app = Flask("probe")
    for bp in (github.bp, token_hooks.bp, admin.bp, openapi.bp):
        app.register_blueprint(bp)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}").replace("{name}", "{app}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((method.lower(), path))
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented


def test_openapi_document_merges_other_services_paths():
    doc = openapi.document([{"paths": {"/api/v1/apps": {"get": {"responses": {"200": {"description": "x"}}}}},
                             "schemas": {"X": {"type": "object"}}}])
    assert set(doc["paths"]["/api/v1/apps"]) == {"get", "post"} and "X" in doc["components"]["schemas"]
    assert set(openapi.DOCUMENT["paths"]["/api/v1/apps"]) == {"post"}


def test_json_bodies_decode_as_the_standard_library_decides():
    """orjson first for speed; what it refuses, ``json`` still judges (so nothing newly becomes a 400)."""
    from shipline.web import json_body

    app = Flask("probe")
    cases = {
        b'{"ref": "refs/heads/main", "n": 1.5}': {"ref": "refs/heads/main", "n": 1.5},
        b'{"big": 123456789012345678901234567890}': {"big": 123456789012345678901234567890},
        b'{"x": NaN}': "nan",
        b'\xef\xbb\xbf{"bom": true}': {"bom": True},
        '{"utf16": 1}'.encode("utf-16"): {"utf16": 1},
    }
    for raw, expected in cases.items():
        with app.test_request_context("/", method="POST", data=raw, content_type="application/json"):
            doc = json_body()
            if expected == "nan":
                assert doc["x"] != doc["x"]
            else:
                assert doc == expected
    for raw in (b"{", b"[1]", b'{"a": "\xff"}'):
        with app.test_request_context("/", method="POST", data=raw, content_type="application/json"):
            with pytest.raises(Exception) as caught:
                json_body()
            assert getattr(caught.value, "code", None) == 400


def test_the_session_serializer_is_made_once_per_key():
    from shipline.web import CachedSerializerSessions

    app = Flask("probe")
    app.secret_key = "one"
    sessions = CachedSerializerSessions()
    first = sessions.get_signing_serializer(app)
    assert first is not None and sessions.get_signing_serializer(app) is first
    token = first.dumps({"csrf": "t"})
    app.secret_key = "two"  # a new key: a new serializer, which refuses cookies signed with the old one
    second = sessions.get_signing_serializer(app)
    assert second is not first and second is not None
    with pytest.raises(Exception, match="Signature"):
        second.loads(token)
    app.config["SECRET_KEY_FALLBACKS"] = ["one"]  # unless the old key is a fallback
    assert sessions.get_signing_serializer(app).loads(token) == {"csrf": "t"}
