"""Pure pieces of the ingress: URL normalisation, refs, signatures, tokens, records, validation."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.fernet import Fernet

from ingress import crypto, validation
from ingress.deliveries import BadDeliveryId, delivery_id, encode_body, kept_headers, records
from ingress.repos import normalise, parse_ref, payload_repo_keys
from shipline import codec

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("url", [
    "https://github.com/acme/shop", "https://github.com/acme/shop/", "https://github.com/acme/shop.git",
    "HTTPS://GitHub.COM/acme/shop.git/", "https://github.com:443/acme/shop", "https://github.com/acme/shop.git//",
])
def test_repo_urls_normalise_to_one_key(url):
    assert normalise(url) == "https://github.com/acme/shop"


def test_repo_url_normalisation_keeps_what_matters():
    assert normalise("https://github.com/Acme/Shop") != normalise("https://github.com/acme/shop")  # path case kept
    assert normalise("git@github.com:acme/shop.git") == "ssh://git@github.com/acme/shop"
    assert normalise("ssh://git@GITHUB.com:22/acme/shop.git") == "ssh://git@github.com/acme/shop"
    assert normalise("http://example.com:8080/x/") == "http://example.com:8080/x"
    assert normalise("/srv/git/shop.git/") == "/srv/git/shop"
    assert normalise("https://[::1/x") == "https://[::1/x"  # malformed: stripped, not raised
    keys = payload_repo_keys({"html_url": "https://github.com/acme/shop", "clone_url": "https://github.com/acme/shop.git",
                              "ssh_url": "git@github.com:acme/shop.git", "url": 5})
    assert keys == ["https://github.com/acme/shop", "ssh://git@github.com/acme/shop"]
    assert payload_repo_keys("https://github.com/acme/shop") == [] and payload_repo_keys(None) == []


def test_refs():
    assert parse_ref("refs/heads/feature/x").branch == "feature/x"
    assert parse_ref("refs/tags/v1.0").tag == "v1.0" and parse_ref("refs/tags/v1.0").branch is None
    assert parse_ref("main").branch is None


def test_github_signature_matches_githubs_documented_example():
    # https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries#testing-the-webhook-payload-validation
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert crypto.signature("It's a Secret to Everybody", b"Hello, World!") == expected
    assert crypto.signature_matches("It's a Secret to Everybody", b"Hello, World!", expected)
    upper_hex = "sha256=" + expected.removeprefix("sha256=").upper()
    assert crypto.signature_matches("It's a Secret to Everybody", b"Hello, World!", upper_hex)
    assert not crypto.signature_matches("It's a Secret to Everybody", b"Hello, World?", expected)
    assert not crypto.signature_matches("other", b"Hello, World!", expected)
    assert not crypto.signature_matches(None, b"x", expected) and not crypto.signature_matches("s", b"x", None)
    assert not crypto.signature_matches("s", b"x", "sha256=\u00e9\u00e9")


def test_tokens_are_stored_as_hashes_with_a_showable_prefix():
    token = crypto.new_token(crypto.DEPLOY_HOOK)
    assert token.startswith("shpdh_") and len(token) > 40
    assert crypto.token_prefix(token) == token[:12] and crypto.token_hash(token) != token
    assert crypto.same_hash(crypto.token_hash(token), crypto.token_hash(token))
    assert not crypto.same_hash(crypto.token_hash(token), None)
    assert crypto.new_token(crypto.DEPLOY_HOOK) != token and len(crypto.new_secret()) == 64


def test_secret_box_round_trip_and_wrong_key():
    key = Fernet.generate_key().decode()
    box = crypto.SecretBox(key)
    sealed = box.encrypt("s3cret")
    assert "s3cret" not in sealed and box.decrypt(sealed) == "s3cret"
    assert crypto.SecretBox(Fernet.generate_key().decode()).decrypt(sealed) is None
    assert box.decrypt(None) is None and box.decrypt("garbage") is None


def test_delivery_ids_and_kept_headers_never_carry_tokens():
    assert delivery_id({"X-GitHub-Delivery": "gh", "Idempotency-Key": "k"}) == "gh"
    assert delivery_id({"X-Gitlab-Event-UUID": "gl", "Idempotency-Key": "k"}) == "gl"
    assert delivery_id({"Idempotency-Key": " k "}) == "k"
    assert len(delivery_id({})) == 36 and delivery_id({}) != delivery_id({})
    with pytest.raises(BadDeliveryId):
        delivery_id({"Idempotency-Key": "x" * 201})
    headers = {"Authorization": "Bearer a", "X-Shipline-Token": "b", "X-Skipper-Token": "c", "Cookie": "d",
               "X-Deploy-Hook-Token": "e", "X-Gitlab-Token": "f", "X-Hub-Signature-256": "sha256=00",
               "X-GitHub-Event": "push", "User-Agent": "GitHub-Hookshot/1"}
    assert kept_headers(headers) == {"User-Agent": "GitHub-Hookshot/1", "X-GitHub-Event": "push",
                                     "X-Hub-Signature-256": "sha256=00"}
    # a request's own headers (read straight from its WSGI environ) keep exactly the same
    from werkzeug.datastructures import EnvironHeaders, Headers
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(
        method="POST", headers={**headers, "X-Forwarded-For": "203.0.113.9", "X-Request-Id": "r" * 2000},
        data=b"{}", content_type="application/json").get_environ()

    fast = kept_headers(EnvironHeaders(environ))
    assert fast == kept_headers(Headers(list(EnvironHeaders(environ))))  # the general path, case-insensitive
    assert fast["Content-Type"] == "application/json" and len(fast["X-Request-Id"]) == 1024
    assert not {"Authorization", "X-Shipline-Token", "Cookie", "X-Deploy-Hook-Token"} & set(fast)


def test_records_carry_the_exact_body_one_per_app():
    raw = "{\"a\": \"ü\"}".encode()
    assert encode_body(raw) == (raw.decode(), "utf8")
    assert encode_body(b"\xff\x00") == (base64.b64encode(b"\xff\x00").decode(), "base64")
    envs = records([3, 4], delivery="d-1", source="shipyard", route="/api/webhook", event="push",
                   headers={"X-GitHub-Event": "push", "X-Shipline-Token": "t"}, raw=raw, verification="hmac")
    assert [e.key for e in envs] == [b"3", b"4"] and len({e.id for e in envs}) == 2
    again = records([3], delivery="d-1", source="shipyard", route="/api/webhook", event="push", headers={},
                    raw=raw, verification="hmac")
    assert again[0].id == envs[0].id  # a redelivery carries the same envelope id
    decoded = codec.decode(codec.encode(envs[0]), strict=True)
    assert decoded.data.body.encode() == raw and decoded.correlationid == "d-1"
    assert "X-Shipline-Token" not in json.loads(codec.encode(envs[0]))["data"]["headers"]


def test_app_fields_name_the_bad_field():
    ok = validation.app_fields({"name": "shop", "namespace": "acme", "branch": "refs/heads/dev", "port": 80,
                                "build": {"dockerfile": "Dockerfile"}, "allow_unsigned": True}, partial=False)
    assert ok["branch"] == "dev" and ok["build"] == {"dockerfile": "Dockerfile"}
    cases = [({"namespace": "a"}, "name"), ({"name": "a", "namespace": "a", "port": True}, "port"),
             ({"name": "a", "namespace": "a", "health_path": "x"}, "health_path"),
             ({"name": "a", "namespace": "a", "allow_unsigned": "yes"}, "allow_unsigned"),
             ({"name": "a", "namespace": "a", "repo_url": "has space"}, "repo_url"),
             ({"name": "a", "namespace": "a", "image": "\ud800"}, "image"),
             ({"name": "a\x00", "namespace": "a"}, "name")]
    for doc, field in cases:
        with pytest.raises(validation.Invalid) as err:
            validation.app_fields(doc, partial=False)
        assert err.value.field == field
    with pytest.raises(validation.Invalid):
        validation.app_fields({}, partial=True)
    assert validation.app_fields({"image": None}, partial=True) == {"image": None}


def test_hook_bodies():
    assert validation.image_deploy({"image": "r/x:1", "commit": "abc"}) == ("r/x:1", "abc")
    with pytest.raises(validation.Invalid, match="image"):
        validation.image_deploy({"commit": "abc"})
    assert validation.image_tag({"imageTag": "1.2.0"}) == "1.2.0"
    for bad in ({"imageTag": ""}, {"imageTag": "a:b"}, {"imageTag": "-x"}, {}):
        with pytest.raises(validation.Invalid):
            validation.image_tag(bad)
    assert validation.job_environment({}) == {}
    assert validation.job_environment({"instanceEnvironmentVariables": [{"name": "A_1", "value": "x"}]}) == {"A_1": "x"}
    for bad_env in ([{"name": "A"}], [{"name": "A", "value": 1}], [{"name": "A", "value": "", "x": 1}], ["A=1"]):
        with pytest.raises(validation.Invalid):
            validation.job_environment({"instanceEnvironmentVariables": bad_env})
    assert validation.rollback_request({}) is None and validation.rollback_request({"revision": 2}) == 2
    assert validation.deploy_request({"commit": "abc"}) == (None, "abc")
