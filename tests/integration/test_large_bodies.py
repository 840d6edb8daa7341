"""Bodies up to SHIPLINE_MAX_BODY, not only up to Kafka's default 1 MB record, go through the log.

A large push (GitHub sends up to 25 MB) is accepted, stored byte for byte in ``inbound``, and
decided by streams into ``delivery.accepted`` (which carries the body) and ``build.queued``. Topics
created by an older version are brought to the declared record limit at start.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from shipline.codec import MAX_RECORD
from shipline.messages import DeliveryAccepted
from shipline.topics import Topics, delete_prefixed, ensure_topics
from tests.integration.test_ingress_kit import github_headers, ingress, push_payload  # noqa: F401 - fixture
from tests.integration.test_streams_kit import Reader, Worker

pytestmark = pytest.mark.integration


def _record_limit(admin: AdminClient, topic: str) -> str:
    res = ConfigResource(ResourceType.TOPIC, topic)
    deadline = time.monotonic() + 30
    while True:  # a topic just created is not known to every part of the broker at once
        try:
            return str(admin.describe_configs([res])[res].result(timeout=30)["max.message.bytes"].value)
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_existing_topics_are_brought_to_the_declared_record_limit(kafka_bootstrap: str) -> None:
    topics = Topics(f"old{uuid.uuid4().hex[:8]}")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    try:  # an inbound topic as an older version created it: Kafka's default record limit
        admin.create_topics([NewTopic(topics.inbound, num_partitions=6, replication_factor=1)])[
            topics.inbound].result(timeout=30)
        assert int(_record_limit(admin, topics.inbound)) < 2 * 1024 * 1024
        ensure_topics(kafka_bootstrap, topics, partitions=6)
        for topic in (topics.inbound, topics.events, topics.deadletter):
            assert _record_limit(admin, topic) == str(MAX_RECORD), topic
    finally:
        delete_prefixed(kafka_bootstrap, topics.prefix)


def test_a_push_of_several_megabytes_is_accepted_and_decided(settings, ingress) -> None:  # noqa: F811
    app = ingress.register(repo_url="https://github.com/acme/shop")
    payload = push_payload()
    # a push of many commits: GitHub's payloads grow with them
    payload["commits"] = [dict(payload["commits"][0], id=f"{n:040x}", message="m" * 3000) for n in range(1500)]
    raw = json.dumps(payload).encode()
    assert len(raw) > 4 * 1024 * 1024
    delivery = str(uuid.uuid4())
    resp = ingress.client.post(f"/api/v1/webhooks/github/{app['id']}", data=raw,
                               headers=github_headers(raw, app["github_secret"], "push", delivery))
    assert resp.status_code == 201, resp.get_json()
    (record,) = ingress.deliveries()
    assert record.data.body.encode() == raw  # byte for byte

    t = settings.topics
    reader = Reader(settings, [t.events])
    worker = Worker(settings, "large")
    try:
        reader.until(lambda: {"delivery.accepted", "build.queued"} <= {e.type for e in reader.envelopes(t.events)},
                     "the large push decided", workers=[worker])
        accepted = next(e.data for e in reader.envelopes(t.events) if e.type == "delivery.accepted")
        assert isinstance(accepted, DeliveryAccepted) and accepted.delivery_id == delivery
        assert accepted.body.encode() == raw
    finally:
        worker.stop()
        reader.close()
