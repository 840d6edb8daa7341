"""Replaying history to one subscription: read the event log again, queue only for that subscription.

A replay reads the events topic (kept forever) from the start, or from a little before the asked
time, up to its end when the replay began, keeps the subscription's app's events that match its
filter and are at or after the asked time or per-app sequence, and queues them for that
subscription alone with their original event ids. Other subscriptions are not touched. Events the
subscription already has pending stay as they are; ones it already got or gave up go again.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from outbound import events, ingest
from outbound.sender import Sender
from outbound.store import NewDelivery, Store, parse_time
from shipline import codec
from shipline.codec import InvalidRecord
from shipline.config import Settings

log = logging.getLogger(__name__)
TIME_MARGIN = 300.0  # seconds: Kafka's record timestamps and event times are taken apart in time
CHUNK = 500


class Replayer:
    def __init__(self, settings: Settings, store: Store, sender: Sender, stop: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.sender = sender
        self.stop = stop
        self._wake = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.store.fail_orphan_replays()
                job = self.store.next_replay()
            except Exception:  # noqa: BLE001 - the database may be away; try again shortly
                log.exception("replay: cannot read jobs")
                job = None
            if job is None:
                self._wake.wait(2.0)
                self._wake.clear()
                continue
            try:
                scanned, queued = self.replay(job)
                self.store.finish_replay(job["id"], "done" if not self.stop.is_set() else "pending", scanned, queued,
                                         None)
            except Exception as exc:  # noqa: BLE001 - a failed job is reported, not retried for ever
                log.exception("replay %s failed", job["id"])
                self.store.finish_replay(job["id"], "failed", 0, 0, str(exc)[:2000])

    def replay(self, job: dict[str, Any]) -> tuple[int, int]:
        topic = self.settings.topics.events
        app_id: int = job["app_id"]
        sid: str = job["subscription_id"]
        since_time: datetime | None = job["since_time"]
        since_sequence: int | None = job["since_sequence"]
        key = str(app_id).encode()
        consumer = Consumer({
            "bootstrap.servers": self.settings.bootstrap_servers,
            "group.id": f"{self.settings.topic_prefix}-replay-{job['id']}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "log_level": 3,
        })
        scanned = queued = 0
        try:
            partitions = list(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
            ends: dict[int, int] = {}
            starts: dict[int, int] = {}
            for p in partitions:
                lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                if hi > lo:
                    starts[p], ends[p] = lo, hi
            if since_time is not None and starts:
                ms = int((since_time.timestamp() - TIME_MARGIN) * 1000)
                found = consumer.offsets_for_times([TopicPartition(topic, p, ms) for p in starts], timeout=10)
                for tp in found:
                    starts[tp.partition] = tp.offset if tp.offset >= 0 else ends[tp.partition]
            todo = {p for p in starts if starts[p] < ends[p]}
            if not todo:
                return 0, 0
            consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
            rows: list[NewDelivery] = []
            envs = []
            while todo and not self.stop.is_set():
                for msg in consumer.consume(num_messages=500, timeout=0.5):
                    if msg.error():
                        continue
                    p, offset = msg.partition(), msg.offset() or 0
                    if p not in todo:
                        continue
                    if offset + 1 >= ends[p]:
                        todo.discard(p)
                    if offset >= ends[p] or msg.key() != key:
                        continue
                    scanned += 1
                    try:
                        env = codec.decode(msg.value())
                    except InvalidRecord:
                        continue
                    if env.app_id != app_id or not events.matches(job["events"], env.type):
                        continue
                    if env.type not in events.deliverable_types():
                        continue
                    if since_sequence is not None and (env.sequence is None or env.sequence < since_sequence):
                        continue
                    if since_time is not None and parse_time(env.time) < since_time:
                        continue
                    envs.append(env)
                if len(envs) >= CHUNK:
                    queued += self._queue(sid, envs, rows)
            queued += self._queue(sid, envs, rows)
        finally:
            consumer.close()
        self.sender.poke([(sid, app_id)])
        return scanned, queued

    def _queue(self, sid: str, envs: list[Any], rows: list[NewDelivery]) -> int:
        if not envs:
            return 0
        with self.store.pool.connection() as conn, conn.transaction():
            for env in envs:
                rows.append(ingest.new_delivery(sid, env, ingest.payload_for(conn, self.store, env)))
            self.store.queue_replayed(conn, rows)
        n = len(rows)
        self.sender.poke([(sid, envs[0].app_id)])
        envs.clear()
        rows.clear()
        return n
