"""The live projector: a consumer group folding ``events`` into the projections schema.

Positions live in PostgreSQL, not in Kafka: on every (re)assignment the projector seeks to the
offsets stored with the rows (``offsets`` table), and each batch writes rows and offsets in one
transaction (``projections.batch``). Kafka's committed offsets are written too, asynchronously,
only so lag tools show something; they are never read back.

A rebuild (``projections.rebuild``) may swap a new schema in under the projector's feet. Each
batch checks the schema's identity under a shared advisory lock the swap takes exclusively; on a
change (or every second while idle) the projector reconnects and seeks to the new schema's
stored offsets, so the events the rebuild did not cover are folded into it too.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from projections.batch import SYSTEMIC, SchemaSwapped, apply_batch, schema_generation
from projections.schema import MIGRATIONS
from shipline import kafka
from shipline.config import Settings
from shipline.db import connect_kwargs, make_pool, migrate

log = logging.getLogger(__name__)

CONSUMER_NAME = "projector"
IDLE_CHECK = 1.0  # seconds between schema-swap checks while no records arrive


def migrate_schema(settings: Settings, schema: str | None = None) -> None:
    """Create or upgrade the projections schema (versioned; safe to run from several processes)."""
    pool = make_pool(settings.db_url, min_size=1, max_size=1)
    try:
        migrate(pool, schema or settings.schema("projections"), MIGRATIONS)
    finally:
        pool.close()


def stored_offsets(conn: psycopg.Connection[Any], topic: str, schema: str | None = None) -> dict[int, int]:
    """partition -> next offset to read, as committed with the rows (qualified when ``schema`` is given)."""
    table = f"{schema}.offsets" if schema else "offsets"
    rows = conn.execute(f'SELECT partition, "offset" FROM {table} WHERE topic = %s', (topic,)).fetchall()
    return {int(p): int(o) for p, o in rows}


def lag(settings: Settings, conn: psycopg.Connection[Any], schema: str | None = None) -> int:
    """Records on the events topic not yet folded into ``schema`` (default: the live projections)."""
    topic = settings.topics.events
    stored = stored_offsets(conn, topic, schema or settings.schema("projections"))
    probe = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"{topic}-lag", "log_level": 3})
    try:
        meta = probe.list_topics(topic, timeout=10).topics[topic]
        behind = 0
        for p in meta.partitions:
            low, high = probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            behind += max(0, high - max(low, stored.get(p, low)))
        return behind
    finally:
        probe.close()


class Projector:
    """One member of the ``<topic prefix>-projector`` group; ``run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        settings: Settings,
        *,
        group: str | None = None,
        schema: str | None = None,
        batch_size: int = 2000,
        producer: Any = None,
    ) -> None:
        self.settings = settings
        self.schema = schema or settings.schema("projections")
        self.topic = settings.topics.events
        self.group = group or f"{settings.topic_prefix}-projector"
        self.batch_size = batch_size
        self._producer = producer
        self._reject_to: Any = producer
        self._conn: psycopg.Connection[Any] | None = None
        self._generation: int | None = None
        self._assigned: set[int] = set()
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        migrate_schema(self.settings, self.schema)
        producer = self._producer or kafka.producer(self.settings.bootstrap_servers)
        self._reject_to = producer
        self._connect()
        consumer = kafka.consumer(
            self.settings.bootstrap_servers,
            self.group,
            [self.topic],
            **{
                "fetch.wait.max.ms": 100,
                # a member killed with -9 holds its partitions until its session expires: keep it short
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 2000,
            },
        )
        consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        last_check = time.monotonic()
        try:
            while not stop.is_set():
                msgs = consumer.consume(self.batch_size, timeout=0.2)
                records = []
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.fatal():  # an unusable consumer: a fresh process recovers
                            raise RuntimeError(f"Kafka consumer failed: {err}")
                        log.warning("consumer error: %s", err)
                    else:
                        records.append(msg)
                if records:
                    self._process(consumer, records)
                    last_check = time.monotonic()
                elif time.monotonic() - last_check > IDLE_CHECK:
                    last_check = time.monotonic()
                    self._check_swapped(consumer)
        finally:
            try:
                consumer.close()
            finally:
                if self._conn is not None:
                    self._conn.close()
                if self._producer is None:
                    producer.flush(5)

    def _process(self, consumer: Consumer, records: list[Any]) -> None:
        try:
            assert self._conn is not None
            result = apply_batch(
                self._conn, self.schema, records, reject=self._dead_letter, generation=self._generation
            )
        except SchemaSwapped:
            log.info("projections schema %s was swapped by a rebuild; re-seeking", self.schema)
            self._recover(consumer)
            return
        except SYSTEMIC as exc:
            log.warning("database error, will re-seek and retry: %s", exc)
            self._stop.wait(1.0)
            self._recover(consumer)
            return
        if result.duplicates or result.stale:
            log.info("skipped %d duplicate and %d already-applied records", result.duplicates, result.stale)
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in result.offsets.items()], asynchronous=True
            )
        except KafkaException:
            pass  # informational only: positions are the ones stored in PostgreSQL

    def _dead_letter(self, msg: Any, reason: str) -> None:
        log.warning("dead-lettering %s/%s/%s: %s", msg.topic(), msg.partition(), msg.offset(), reason)
        kafka.dead_letter(self._reject_to, self.settings.topics.deadletter, msg, reason, CONSUMER_NAME)

    # ------------------------------------------------------------------ positions & swaps

    def _connect(self) -> None:
        """(Re)open the connection, retrying while PostgreSQL is unreachable and ``stop`` is unset."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        delay = 0.5
        while True:
            try:
                conn = psycopg.connect(self.settings.db_url, autocommit=True, **connect_kwargs(self.schema))
                self._generation = schema_generation(conn, self.schema)
                self._conn = conn
                return
            except psycopg.OperationalError as exc:
                if self._stop.is_set():
                    raise
                log.warning("cannot reach PostgreSQL (%s); retrying in %.1fs", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _recover(self, consumer: Consumer) -> None:
        """Reconnect and seek every assigned partition to the offsets stored with the rows."""
        self._connect()
        self._seek_stored(consumer, sorted(self._assigned))

    def _check_swapped(self, consumer: Consumer) -> None:
        try:
            assert self._conn is not None
            if schema_generation(self._conn, self.schema) == self._generation:
                return
            log.info("projections schema %s was swapped by a rebuild; re-seeking", self.schema)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            log.warning("database error while idle: %s", exc)
        self._recover(consumer)

    def _positions(self, partitions: list[int]) -> list[TopicPartition]:
        """Where to resume each partition: its stored offset, or the beginning when none is stored.

        A schema dropped by hand is recreated here, and then everything is folded again from 0.
        """
        while True:
            try:
                assert self._conn is not None
                if self._generation is None:
                    log.warning("projections schema %s is missing: recreating it", self.schema)
                    migrate_schema(self.settings, self.schema)
                    self._connect()
                stored = stored_offsets(self._conn, self.topic)
                return [TopicPartition(self.topic, p, stored.get(p, OFFSET_BEGINNING)) for p in partitions]
            except SYSTEMIC as exc:
                if self._stop.is_set():
                    raise
                log.warning("cannot read stored offsets (%s); retrying", exc)
                self._stop.wait(1.0)
                self._connect()

    def _seek_stored(self, consumer: Consumer, partitions: list[int]) -> None:
        if not partitions:
            return
        tps = self._positions(partitions)
        try:
            for tp in tps:
                consumer.seek(tp)
        except KafkaException:
            # not fetching yet (just assigned): re-assign at the stored offsets instead
            consumer.incremental_unassign([TopicPartition(self.topic, p) for p in partitions])
            consumer.incremental_assign(tps)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        tps = self._positions(numbers)
        consumer.incremental_assign(tps)
        self._assigned.update(numbers)
        log.info("assigned %s at %s", numbers, {tp.partition: tp.offset for tp in tps})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_unassign(partitions)
        self._assigned.difference_update(tp.partition for tp in partitions)


def main(settings: Settings, stop: threading.Event) -> int:
    # the rebuild's workers fold through the same apply_batch: collecting cycles every 50,000
    # allocations instead of 700 made them ~15% faster (see projections.rebuild._worker)
    gc.set_threshold(50_000, 20, 20)
    Projector(settings).run(stop)
    return 0
