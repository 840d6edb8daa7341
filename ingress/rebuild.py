"""Rebuilding the credentials store from the log.

The store is only a cache of the request records the ingress published (see ``ingress.store``):
if it is lost, or a crash fell between a Kafka ack and the store write, fold the inbound topic
into it again::

    rebuild_store(pool, settings, read_inbound(settings))

Records other than ingress requests are skipped, as are records that do not decode.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from psycopg_pool import ConnectionPool

from ingress.local_index import LocalIndex
from ingress.store import HANDLERS, TABLES, Store
from shipline import codec
from shipline.config import Settings
from shipline.envelope import Envelope

log = logging.getLogger("ingress")


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> Iterator[tuple[int, int, bytes | None]]:
    """Every record of ``topic`` up to its end when called: (partition, offset, value)."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"shipline-ingress-reader-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "log_level": 3,
    })
    try:
        meta = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted(meta.topics[topic].partitions)
        deadline = time.monotonic() + timeout
        ends = {p: _end_offset(consumer, topic, p, deadline) for p in partitions}
        wanted = {p: end for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in wanted])
        while wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end in {timeout}s")
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            if partition in wanted:
                yield partition, offset, msg.value()
                if offset + 1 >= wanted[partition]:
                    del wanted[partition]
    finally:
        consumer.close()


def _end_offset(consumer: Consumer, topic: str, partition: int, deadline: float) -> int:
    """The high watermark, retried while a new topic's partition has no leader yet."""
    while True:
        try:
            return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_inbound(settings: Settings, timeout: float = 60.0) -> Iterator[Envelope]:
    for partition, offset, value in read_topic(settings.bootstrap_servers, settings.topics.inbound, timeout):
        try:
            yield codec.decode(value)
        except codec.InvalidRecord as exc:
            log.warning("skipping %s:%d:%d: %s", settings.topics.inbound, partition, offset, exc.reason)


def rebuild_store(pool: ConnectionPool, settings: Settings, envelopes: Iterable[Envelope]) -> int:
    """Replace the store's contents by the fold of ``envelopes`` (in log order per app); returns
    how many request records were applied. Runs in one transaction (TRUNCATE locks the tables, so
    concurrent requests wait for the new store rather than see a half-built one)."""
    store = Store(pool, settings.schema("ingress"))
    store.migrate()
    s = f'"{store.schema}"'
    applied = 0
    with store.transaction() as conn:
        conn.execute(f"TRUNCATE {', '.join(f'{s}.{t}' for t in TABLES)}")  # type: ignore[arg-type]
        for env in envelopes:
            if type(env.data) in HANDLERS:
                store.apply(conn, env)
                applied += 1
        conn.execute(
            f"SELECT setval('{s}.app_ids', GREATEST((SELECT max(id) FROM {s}.apps),"  # type: ignore[arg-type]
            f" (SELECT last_value FROM {s}.app_ids), 1))"
        )
    LocalIndex.of(settings).bump()  # this host's ingress processes reload their snapshots now
    return applied
