"""Schemathesis over the served OpenAPI 3.1 document: no input makes a 5xx or breaks the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.test_ingress_kit import ingress  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


def test_schemathesis_finds_no_5xx_and_no_schema_violation(ingress):  # noqa: F811
    app = ingress.register(image="ghcr.io/acme/shop", repo_url="https://github.com/acme/shop")
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", ingress.app)
    schema.validate()
    documented = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    assert {("POST", "/api/v1/webhooks/github/{app_id}"), ("POST", "/api/webhook"), ("POST", "/api/v1/dh"),
            ("POST", "/api/v1/webhook/{namespace}/{app}"), ("POST", "/api/v1/apps"),
            ("DELETE", "/api/v1/deploy-hooks/{hook_id}"), ("GET", "/api/v1/apps/{app_id}/webhook")} <= documented
    seen: dict[int, int] = {}

    variants = [
        (GenerationMode.POSITIVE, {}, None),
        (GenerationMode.POSITIVE, ingress.admin, None),
        (GenerationMode.POSITIVE, ingress.admin, {"app_id": app["id"]}),
        (GenerationMode.NEGATIVE, ingress.admin, {"app_id": app["id"]}),
        (GenerationMode.NEGATIVE, {}, None),
    ]
    for mode, headers, path_parameters in variants:
        strategy = schema.as_strategy(mode, headers=headers or None, path_parameters=path_parameters)

        @given(case=strategy)
        @hypothesis_settings(max_examples=60, deadline=None, database=None, derandomize=True,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case):  # type: ignore[no-untyped-def]
            response = case.call()
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            case.validate_response(response, checks=CHECKS)

        run()
    assert not any(code >= 500 for code in seen), seen
    assert any(200 <= code < 300 for code in seen), seen  # the run reached accepting paths too
