"""The OpenAPI 3.1 document of every ingress route, served at ``GET /api/v1/openapi.json``.

Other services may add their own paths by putting ``{"paths": {...}, "schemas": {...}}`` dicts
in ``current().extras["openapi"]`` (a list) when they mount; they are merged in when served.
"""

from __future__ import annotations

import copy
from typing import Any

from flask import Blueprint, Response, jsonify

bp = Blueprint("ingress_openapi", __name__)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    meaning = {
        400: "malformed request or invalid field (the error names it)",
        401: "missing or wrong credentials",
        404: "not found, or nothing matched (the error says what)",
        409: "conflicts with an existing app",
        413: "body larger than SHIPLINE_MAX_BODY",
        415: "Content-Type is not application/json",
        503: "Kafka or PostgreSQL unavailable: nothing was accepted; retry after Retry-After seconds",
    }
    out: dict[str, Any] = {}
    for code in codes:
        out[str(code)] = _json(_ref("Error"), meaning[code])
        if code == 503:
            out[str(code)]["headers"] = {"Retry-After": {"schema": {"type": "string"}, "required": True}}
    return out


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _header(name: str, description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": required, "description": description,
            "schema": {"type": "string"}}


APP_ID = {"name": "app_id", "in": "path", "required": True,
          "schema": {"type": "integer", "minimum": 1, "format": "int64"}}
ADMIN: list[dict[str, list[str]]] = [{"admin": []}]
DELIVERY_HEADERS = [
    _header("X-GitHub-Delivery", "delivery id (redeliveries carry the same one)"),
    _header("Idempotency-Key", "delivery id for senders other than GitHub"),
]
GITHUB_HEADERS = [
    _header("X-GitHub-Event", "ping, push, or any other event (recorded, ignored)"),
    _header("X-Hub-Signature-256", "sha256=<hex HMAC-SHA256 of the raw body>"),
    *DELIVERY_HEADERS,
]
STANDARD = (400, 401, 404, 413, 415, 503)

_APP_PROPERTIES: dict[str, Any] = {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
    "namespace": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
    "repo_url": {"type": ["string", "null"]},
    "branch": {"type": "string", "default": "main"},
    "image": {"type": ["string", "null"], "description": "image repository for image deploys"},
    "kind": {"enum": ["service", "job"], "default": "service"},
    "strategy": {"enum": ["docker", "process"], "default": "docker"},
    "command": {"type": ["string", "null"], "description": "command of the process strategy"},
    "port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
    "health_path": {"type": "string", "default": "/"},
    "build": {
        "type": ["object", "null"],
        "properties": {k: {"type": ["string", "null"]} for k in ("dockerfile", "context", "test_command")},
        "additionalProperties": False,
    },
    "allow_unsigned": {"type": "boolean", "default": False},
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}, "field": {"type": "string"}}},
    "Delivery": {
        "type": "object",
        "required": ["status", "delivery_id"],
        "properties": {
            "status": {"enum": ["queued", "triggered", "ignored", "ping", "duplicate"]},
            "delivery_id": {"type": "string"},
            "app_ids": {"type": "array", "items": {"type": "integer"}},
            "duplicate": {"const": True},
            "reason": {"type": "string"},
            "image": {"type": ["string", "null"]},
            "commit": {"type": ["string", "null"]},
            "variables": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Written": {
        "type": "object",
        "required": ["request_id", "position"],
        "properties": {
            "request_id": {"type": "string", "description": "correlation id of the resulting events"},
            "position": {"type": "string", "description": "<topic>:<partition>:<offset> of the request record"},
        },
    },
    "GitHubPush": {
        "type": "object",
        "description": "GitHub's push (or other event) payload; ref, deleted and repository are read",
        "properties": {
            "ref": {"type": "string", "examples": ["refs/heads/main"]},
            "after": {"type": "string"},
            "deleted": {"type": "boolean"},
            "repository": {"type": "object", "properties": {"html_url": {"type": "string"},
                                                            "clone_url": {"type": "string"}}},
        },
    },
    "AppCreate": {"type": "object", "required": ["name", "namespace"], "properties": _APP_PROPERTIES,
                  "additionalProperties": False},
    "AppPatch": {"type": "object", "minProperties": 1, "properties": _APP_PROPERTIES,
                 "additionalProperties": False},
    "AppCreated": {
        "allOf": [_ref("Written"), {
            "type": "object",
            "required": ["id", "name", "namespace", "github_webhook_url", "github_secret"],
            "properties": {"id": {"type": "integer"}, "name": {"type": "string"}, "namespace": {"type": "string"},
                           "github_webhook_url": {"type": "string"},
                           "github_secret": {"type": "string", "description": "shown once"}},
        }],
    },
    "AppUpdated": {"allOf": [_ref("Written"), {
        "type": "object", "required": ["id", "changes"],
        "properties": {"id": {"type": "integer"}, "changes": {"type": "object"}}}]},
    "AppDeleted": {"allOf": [_ref("Written"), {"type": "object", "required": ["id", "deleted"],
                                               "properties": {"id": {"type": "integer"}, "deleted": {"const": True}}}]},
    "DeployHookCreated": {
        "allOf": [_ref("Written"), {
            "type": "object",
            "required": ["id", "app_id", "name", "token", "token_prefix", "url"],
            "properties": {"id": {"type": "string"}, "app_id": {"type": "integer"}, "name": {"type": "string"},
                           "token": {"type": "string", "description": "shown once"},
                           "token_prefix": {"type": "string"}, "url": {"type": "string"}},
        }],
    },
    "WebhookEnabled": {
        "allOf": [_ref("Written"), {
            "type": "object",
            "required": ["url", "token", "token_prefix"],
            "properties": {"url": {"type": "string"}, "token": {"type": "string", "description": "shown once"},
                           "token_prefix": {"type": "string"}},
        }],
    },
    "WebhookStatus": {
        "type": "object",
        "required": ["enabled", "url", "token_prefix", "created_at", "last_used_at"],
        "properties": {"enabled": {"type": "boolean"}, "url": {"type": "string"},
                       "token_prefix": {"type": ["string", "null"]},
                       "created_at": {"type": ["string", "null"]}, "last_used_at": {"type": ["string", "null"]}},
    },
    "WebhookDisabled": {"allOf": [_ref("Written"), {"type": "object", "required": ["enabled"],
                                                    "properties": {"enabled": {"const": False}}}]},
}

PATHS: dict[str, Any] = {
    "/api/v1/webhooks/github/{app_id}": {
        "post": {
            "operationId": "githubWebhook",
            "summary": "GitHub webhook of one app (SkyPort's route)",
            "parameters": [APP_ID, *GITHUB_HEADERS],
            "requestBody": _body(_ref("GitHubPush")),
            "responses": {
                "200": _json(_ref("Delivery"), "ping, or a delivery id already accepted (duplicate)"),
                "201": _json(_ref("Delivery"), "push to the tracked branch queued"),
                "202": _json(_ref("Delivery"), "recorded or answered, but starts nothing"),
                **_errors(*STANDARD),
            },
        }
    },
    "/api/webhook": {
        "post": {
            "operationId": "shipyardWebhook",
            "summary": "GitHub push to every app whose repository URL and branch match (Shipyard's route)",
            "parameters": GITHUB_HEADERS,
            "requestBody": _body(_ref("GitHubPush")),
            "responses": {
                "200": _json(_ref("Delivery"), "ping, or a delivery id already accepted (duplicate)"),
                "201": _json(_ref("Delivery"), "queued for every matching app"),
                "202": _json(_ref("Delivery"), "recorded or answered, but starts nothing"),
                **_errors(*STANDARD),
            },
        }
    },
    "/api/v1/webhook/{namespace}/{app}": {
        "post": {
            "operationId": "skipperWebhook",
            "summary": "Deploy an image with the app's webhook token (Skipper's route)",
            "parameters": [
                {"name": "namespace", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "app", "in": "path", "required": True, "schema": {"type": "string"}},
                _header("X-Shipline-Token", "the app's webhook token (X-Skipper-Token also accepted)"),
                _header("X-Hub-Signature-256", "alternatively, GitHub HMAC with the app's secret"),
                *DELIVERY_HEADERS,
            ],
            "requestBody": _body({"type": "object", "required": ["image"],
                                  "properties": {"image": {"type": "string"}, "commit": {"type": "string"}}}),
            "responses": {"200": _json(_ref("Delivery"), "duplicate"),
                          "201": _json(_ref("Delivery"), "deploy queued"), **_errors(*STANDARD)},
        }
    },
    "/api/v1/dh": {
        "post": {
            "operationId": "deployHook",
            "summary": "Trigger a deploy (service) or a job run with a deploy hook token (Shipmight's route)",
            "parameters": [_header("X-Deploy-Hook-Token", "the hook's token"), *DELIVERY_HEADERS],
            "requestBody": _body({
                "type": "object",
                "properties": {
                    "imageTag": {"type": "string"},
                    "instanceEnvironmentVariables": {
                        "type": "array",
                        "items": {"type": "object", "required": ["name", "value"],
                                  "properties": {"name": {"type": "string"}, "value": {"type": "string"}}},
                    },
                },
            }),
            "responses": {"200": _json(_ref("Delivery"), "duplicate"),
                          "201": _json(_ref("Delivery"), "deployment triggered"), **_errors(*STANDARD)},
        }
    },
    "/api/v1/apps": {
        "post": {
            "operationId": "registerApp",
            "summary": "Register an app; its GitHub secret is shown once",
            "security": ADMIN,
            "requestBody": _body(_ref("AppCreate")),
            "responses": {"201": _json(_ref("AppCreated"), "registered"), **_errors(400, 401, 409, 413, 415, 503)},
        }
    },
    "/api/v1/apps/{app_id}": {
        "patch": {
            "operationId": "updateApp",
            "security": ADMIN,
            "parameters": [APP_ID],
            "requestBody": _body(_ref("AppPatch")),
            "responses": {"200": _json(_ref("AppUpdated"), "update requested"), **_errors(*STANDARD, 409)},
        },
        "delete": {
            "operationId": "deleteApp",
            "security": ADMIN,
            "parameters": [APP_ID],
            "responses": {"200": _json(_ref("AppDeleted"), "deletion requested"), **_errors(401, 404, 413, 503)},
        },
    },
    "/api/v1/apps/{app_id}/deploy-hooks": {
        "post": {
            "operationId": "createDeployHook",
            "summary": "Create a deploy hook; its token is shown once",
            "security": ADMIN,
            "parameters": [APP_ID],
            "requestBody": _body({"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}),
            "responses": {"201": _json(_ref("DeployHookCreated"), "created"), **_errors(*STANDARD)},
        }
    },
    "/api/v1/deploy-hooks/{hook_id}": {
        "delete": {
            "operationId": "deleteDeployHook",
            "summary": "Delete a deploy hook: the next request with its token is refused",
            "security": ADMIN,
            "parameters": [{"name": "hook_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "204": {"description": "deleted", "headers": {
                    "X-Request-Id": {"schema": {"type": "string"}, "required": True},
                    "X-Shipline-Position": {"schema": {"type": "string"}, "required": True}}},
                **_errors(401, 404, 413, 503),
            },
        }
    },
    "/api/v1/apps/{app_id}/webhook": {
        "post": {
            "operationId": "enableWebhook",
            "summary": "Enable the per-app token hook, or regenerate its token (the old one is revoked)",
            "security": ADMIN,
            "parameters": [APP_ID],
            "responses": {"201": _json(_ref("WebhookEnabled"), "enabled"), **_errors(401, 404, 413, 503)},
        },
        "get": {
            "operationId": "webhookStatus",
            "security": ADMIN,
            "parameters": [APP_ID],
            "responses": {"200": _json(_ref("WebhookStatus"), "status"), **_errors(401, 404, 503)},
        },
        "delete": {
            "operationId": "disableWebhook",
            "security": ADMIN,
            "parameters": [APP_ID],
            "responses": {"200": _json(_ref("WebhookDisabled"), "disabled"), **_errors(401, 404, 413, 503)},
        },
    },
    "/api/v1/apps/{app_id}/rollback": {
        "post": {
            "operationId": "rollback",
            "summary": "Roll back to a revision (the previous one when omitted)",
            "security": ADMIN,
            "parameters": [APP_ID],
            "requestBody": _body({"type": "object", "properties": {"revision": {"type": "integer", "minimum": 1}},
                                  "additionalProperties": False}, required=False),
            "responses": {"202": _json(_ref("Written"), "rollback requested"), **_errors(*STANDARD)},
        }
    },
    "/api/v1/apps/{app_id}/deploy": {
        "post": {
            "operationId": "deploy",
            "summary": "Deploy an image, or build and deploy a commit",
            "security": ADMIN,
            "parameters": [APP_ID],
            "requestBody": _body({"type": "object", "minProperties": 1, "additionalProperties": False,
                                  "properties": {"image": {"type": "string"}, "commit": {"type": "string"}}}),
            "responses": {"202": _json(_ref("Written"), "deploy requested"), **_errors(*STANDARD)},
        }
    },
    "/api/v1/openapi.json": {
        "get": {
            "operationId": "openapi",
            "responses": {"200": {"description": "this document",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}},
        }
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Shipline ingress",
        "version": "1",
        "description": "Verified webhooks and management writes, published to Kafka before any 2xx. "
                       "Every error body is {\"error\": ...}.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"admin": {"type": "http", "scheme": "bearer",
                                      "description": "SHIPLINE_ADMIN_TOKEN"}},
    },
}


def document(extras: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(DOCUMENT)
    for extra in extras or []:
        for path, ops in extra.get("paths", {}).items():
            doc["paths"].setdefault(path, {}).update(ops)
        doc["components"]["schemas"].update(extra.get("schemas", {}))
    return doc


@bp.get("/api/v1/openapi.json")
def openapi() -> Response:
    from shipline.web import current

    return jsonify(document(current().extras.get("openapi")))
