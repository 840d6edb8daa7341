"""The dispatcher on the real broker and database, delivering to a real local HTTP receiver."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import psycopg
import pytest
import standardwebhooks

from outbound import signing
from outbound.testing import EventLog, Receiver, Received, Running, wait_until
from shipline import codec
from shipline.config import load
from shipline.messages import BuildFinished, BuildQueued, Deployed, SubscriptionUpdated

pytestmark = pytest.mark.integration


def tuned(settings: Any, **env: str) -> Any:
    return load({**settings.env, **env})


def rows(settings: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.db_url) as conn:
        return conn.execute(query.replace("{s}", settings.schema("outbound")), params).fetchall()


def deployed(app_id: int, revision: int) -> Deployed:
    return Deployed(app_id=app_id, revision=revision, image=f"app{app_id}:r{revision}", commit="c" * 40,
                    instances=["i1"], duration=1.5, url="http://127.0.0.1:8000")


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_signed_deliveries_verify_with_standardwebhooks_and_hex_hmac_also_during_rotation(settings, receiver):
    log = EventLog(settings)
    sid, secret = log.subscribe(7, receiver.url(), ["build_finish", "deployed"])
    with Running(settings):
        queued, finished, dep = log.emit(
            BuildQueued(app_id=7, build=14, commit="88d543e3", message="Revert test commit", author="grosskur",
                        ref="refs/heads/main", delivery_id="d-1", repo_url="https://github.com/grosskur/docker-hello"),
            BuildFinished(app_id=7, build=14, commit="88d543e3", status="succeeded", exit_code=0, image_id="4cdd98",
                          tags=["shipline.local/grosskur/docker-hello:latest"], duration=200.0, log="", log_path=""),
            deployed(7, 1),
        )
        got = wait_until(lambda: len(receiver.received()) >= 2 and receiver.received(), what="two deliveries")
        assert [r.headers["x-shipline-event"] for r in got] == ["build_finish", "deployed"]
        for req in got:
            h = req.headers
            assert h["content-type"] == "application/json"
            assert h["user-agent"].startswith("Shipline-Hookshot/")
            assert standardwebhooks.Webhook(secret).verify(req.body, h)
            expected = hmac.new(secret.encode(), req.body, hashlib.sha256).hexdigest()
            assert h["x-shipline-signature"] == f"sha256={expected}"
            assert h["webhook-id"] == h["x-shipline-delivery"]
        shipway = got[0].json()
        assert set(shipway) == {"build", "commit", "image_tags", "images", "repository"}
        assert shipway["build"]["build_num"] == 14 and shipway["build"]["status"] == "succeeded"
        assert set(shipway["build"]) == {"build_num", "created_at", "dockerfile_dir", "exit_code", "status",
                                         "finished_at", "updated_at"}
        assert shipway["commit"] == {"author": {"login": "grosskur", "name": "grosskur"},
                                     "message": "Revert test commit", "sha": "88d543e3"}
        assert shipway["image_tags"] == [{"full_name": "shipline.local/grosskur/docker-hello:latest",
                                          "id": "4cdd98", "name": "latest"}]
        assert shipway["images"] == [{"id": "4cdd98", "pushed": False}]
        assert shipway["repository"]["clone_url"] == "https://github.com/grosskur/docker-hello.git"
        assert shipway["repository"]["owner"]["login"] == "grosskur"
        assert got[0].headers["x-shipline-event-id"] == finished.id
        assert got[1].json() == codec.to_dict(dep)
        assert got[1].json()["id"] == dep.id

        # rotation: the next delivery verifies with the new secret and with the old one
        new_secret = signing.generate()
        log.emit(SubscriptionUpdated(app_id=7, subscription_id=sid, changes={
            "secret_encrypted": signing.encrypt(settings.secret_key, new_secret)}))
        log.emit(deployed(7, 2))
        third = wait_until(lambda: len(receiver.received()) >= 3 and receiver.received()[2], what="third delivery")
        assert len(third.headers["webhook-signature"].split(" ")) == 2
        assert standardwebhooks.Webhook(new_secret).verify(third.body, third.headers)
        assert standardwebhooks.Webhook(secret).verify(third.body, third.headers)
        assert third.headers["x-shipline-signature"] == "sha256=" + hmac.new(
            new_secret.encode(), third.body, hashlib.sha256).hexdigest()
        assert third.headers["x-shipline-signature-previous"] == "sha256=" + hmac.new(
            secret.encode(), third.body, hashlib.sha256).hexdigest()
        with pytest.raises(standardwebhooks.WebhookVerificationError):
            standardwebhooks.Webhook(signing.generate()).verify(third.body, third.headers)
