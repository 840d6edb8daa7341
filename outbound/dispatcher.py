"""The dispatcher service: event log -> outbox -> signed HTTP requests.

It runs apart from every other service (its own process, consumer group, schema and threads), so
a slow or failing endpoint can delay other subscriptions only up to the per-endpoint limit, and
never a build or a deploy.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from psycopg import sql

from outbound import ingest, signing, ssrf
from outbound.options import Options, from_settings
from outbound.replay import Replayer
from outbound.retention import Pruner
from outbound.schema import MIGRATIONS
from outbound.sender import Sender
from outbound.store import Store
from outbound.transport import Transport
from shipline import codec, kafka
from shipline.codec import InvalidRecord
from shipline.config import Settings
from shipline.db import make_pool, migrate
from shipline.envelope import derive_id, wrap
from shipline.messages import SubscriptionDisabled

log = logging.getLogger(__name__)
NAME = "dispatcher"


class ConsumerFailed(RuntimeError):
    """The Kafka consumer hit a fatal error and cannot be used again."""


class Dispatcher:
    def __init__(self, settings: Settings, options: Options | None = None, **overrides: Any) -> None:
        self.settings = settings
        self.opts = options or from_settings(settings, **overrides)
        self.schema = settings.schema("outbound")
        self.topic = settings.topics.events
        self.stop_event = threading.Event()
        self.pool = make_pool(settings.db_url, schema=self.schema, min_size=2, max_size=12, name="outbound")
        migrate(self.pool, self.schema, MIGRATIONS)
        self.store = Store(self.pool, self.schema)
        self.producer = kafka.producer(settings.bootstrap_servers)
        key = settings.secret_key
        self.transport = Transport(ssrf.parse_networks(settings.outbound_allow))
        self.sender = Sender(self.store, self.transport, self.opts, lambda token: signing.decrypt(key, token))
        self.sender.on_disabled = self.report_disabled
        self.replayer = Replayer(settings, self.store, self.sender, self.stop_event)
        self.pruner = Pruner(self.store, self.opts.keep_days, self.stop_event, every=self.opts.prune_every,
                             first=self.opts.prune_first)
        self._threads: list[threading.Thread] = []
        self._lock_conn: psycopg.Connection[Any] | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def run(self, stop: threading.Event) -> int:
        """Consume until ``stop``; returns 0, or 1 when a worker thread died."""
        group = f"{self.settings.topic_prefix}-dispatcher"
        # static membership: a dispatcher restarted after a crash gets its partitions back at once
        # instead of waiting for the dead member's session to time out
        consumer = kafka.consumer(self.settings.bootstrap_servers, group, [self.topic], **{
            "partition.assignment.strategy": "range",
            "group.instance.id": f"{group}.{socket.gethostname()}",
            "session.timeout.ms": 15000,
        })
        consumer.subscribe([self.topic], on_assign=self._on_assign)
        code = 0
        try:
            if not self._sender_lock(stop):
                return 0
            self.sender.start()
            self._spawn("outbound-replay", self.replayer.run)
            self._spawn("outbound-listen", self._listen)
            self._spawn("outbound-prune", self.pruner.run)
            while not stop.is_set():
                if not self.sender.alive() or not all(t.is_alive() for t in self._threads):
                    log.error("a dispatcher thread died; exiting so the supervisor restarts us")
                    code = 1
                    break
                if self.sender.database_lost:
                    # Crash-only recovery: everything the dispatcher knows is durable (outbox rows,
                    # offsets, next-attempt times), so a fresh process after a PostgreSQL restart is
                    # simpler and safer than repairing every thread's connection state in place.
                    log.error("PostgreSQL went away; exiting so the supervisor restarts us")
                    code = 1
                    break
                msgs = consumer.consume(num_messages=500, timeout=0.2)
                if msgs:
                    self._process(consumer, msgs)
        except ConsumerFailed as exc:
            log.error("consumer failed (%s); exiting so the supervisor restarts us", exc)
            code = 1
        finally:
            self.stop_event.set()
            self.replayer.wake()
            self.sender.stop(timeout=4.0)
            try:
                consumer.close()
            except Exception:  # noqa: BLE001 - closing is best effort on the way out
                log.exception("closing the consumer")
            for t in self._threads:
                t.join(1.0)
            self.producer.flush(2)
            if self._lock_conn is not None:
                self._lock_conn.close()
            self.pool.close()
        return code

    def _spawn(self, name: str, target: Any) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _sender_lock(self, stop: threading.Event) -> bool:
        """One sending dispatcher per schema: a session advisory lock, freed when the process dies."""
        while not stop.is_set():
            conn = psycopg.connect(self.settings.db_url, autocommit=True)
            got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"{self.schema}.sender",)).fetchone()
            if got and got[0]:
                self._lock_conn = conn
                return True
            conn.close()
            log.info("another dispatcher sends for %s; waiting", self.schema)
            stop.wait(2.0)
        return False

    # ------------------------------------------------------------------------------ consuming

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        stored = self.store.stored_offsets(self.topic)
        for tp in partitions:
            tp.offset = stored.get(tp.partition, OFFSET_BEGINNING)
        consumer.assign(partitions)

    def _process(self, consumer: Consumer, msgs: list[Any]) -> None:
        good: list[tuple[Any, Any]] = []
        offsets: dict[int, int] = {}
        firsts: dict[int, int] = {}
        for msg in msgs:
            if msg.error():
                if msg.error().fatal():
                    # e.g. this static member was fenced after a broker restart: the consumer will
                    # never deliver again, so let the supervisor start a fresh process
                    raise ConsumerFailed(str(msg.error()))
                log.warning("consumer: %s", msg.error())
                continue
            firsts.setdefault(msg.partition(), msg.offset())
            offsets[msg.partition()] = msg.offset() + 1
            try:
                good.append((msg, codec.decode(msg.value())))
            except InvalidRecord as exc:
                kafka.dead_letter(self.producer, self.settings.topics.deadletter, msg, exc.reason, NAME)
        if not offsets:
            return
        try:
            lanes = self._apply(good, offsets)
        except psycopg.OperationalError:
            log.exception("database unavailable; reading the batch again shortly")
            for p, first in firsts.items():
                consumer.seek(TopicPartition(self.topic, p, first))
            time.sleep(1.0)
            return
        self.sender.poke(lanes)
        consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in offsets.items()], asynchronous=True)

    def _apply(self, good: list[tuple[Any, Any]], offsets: dict[int, int]) -> set[ingest.Lane]:
        now = datetime.now(UTC)
        try:
            with self.pool.connection() as conn, conn.transaction():
                lanes = ingest.apply(conn, self.store, self.opts, [env for _, env in good], now)
                self.store.save_offsets(conn, self.topic, offsets)
                return lanes
        except psycopg.OperationalError:
            raise
        except Exception:  # noqa: BLE001 - find the record that cannot be applied, dead-letter it alone
            log.exception("batch failed; applying record by record")
        lanes = set()
        with self.pool.connection() as conn, conn.transaction():
            for msg, env in good:
                try:
                    with conn.transaction():
                        lanes |= ingest.apply(conn, self.store, self.opts, [env], now)
                except psycopg.OperationalError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    kafka.dead_letter(self.producer, self.settings.topics.deadletter, msg,
                                      f"cannot apply: {type(exc).__name__}: {exc}", NAME)
            self.store.save_offsets(conn, self.topic, offsets)
        return lanes

    # ------------------------------------------------------------------------------ side channels

    def _listen(self) -> None:
        """Wake-ups from the API (redeliver, recover, replay) through LISTEN/NOTIFY."""
        while not self.stop_event.is_set():
            try:
                with psycopg.connect(self.settings.db_url, autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.store.channel)))
                    self.sender.rescan_soon()  # whatever was notified while we were not listening
                    self.replayer.wake()
                    while not self.stop_event.is_set():
                        for note in conn.notifies(timeout=0.5, stop_after=1):
                            if note.payload == "replay":
                                self.replayer.wake()
                            else:
                                self.sender.rescan_soon()
            except psycopg.Error:
                log.exception("listen connection lost")
                self.stop_event.wait(1.0)

    def report_disabled(self) -> None:
        """Publish a SubscriptionDisabled report for every disable not yet reported (streams sequences it)."""
        for sid, app_id, reason, disabled_at in self.store.unreported_disables():
            at = disabled_at.isoformat()
            env = wrap(SubscriptionDisabled(app_id=app_id, subscription_id=sid, reason=reason),
                       source="shipline/dispatcher", id=derive_id("subscription.disabled", sid, at))
            try:
                kafka.send_sync(self.producer, self.settings.topics.inbound, env)
            except kafka.NotDurable:
                log.warning("could not report subscription %s disabled yet; will retry", sid)
                return
            self.store.mark_reported(sid)


def main(settings: Settings, stop: threading.Event) -> int:
    return Dispatcher(settings).run(stop)
