"""Replaying history to one subscription: read the event log again, queue only for that subscription.

A replay reads the events topic (kept forever) from the start, or from a little before the asked
time, up to its end when the replay began, keeps the subscription's app's events that match its
filter and are at or after the asked time or per-app sequence, and queues them for that
subscription alone with their original event ids. Other subscriptions are not touched. Events the
subscription already has pending stay as they are; ones it already got or gave up go again.

Payloads are computed again, with the live path's functions (``ingest.payload_for``). A
``build_finish`` joins the build.queued and the GitHub push it came from; the dispatcher's
``pushes`` and ``builds`` rows are pruned after ``SHIPLINE_OUTBOUND_KEEP_DAYS``, but both events
precede the build.finished in the app's partition, so the replay keeps them from the log it reads
(``LogJoins``: this app only, a build's entries dropped once its build.finished went by, at most
``MAX_PENDING`` of each) and joins those, reading the store only for what it did not see. A
replay from a time starts reading ``TIME_MARGIN`` before it: a build.finished near the start may
have its push and build.queued before that, and then only the store has them, that is while they
are younger than the keep period; older ones get the nulls a live build_finish would.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from outbound import events, ingest
from outbound.sender import Sender
from outbound.store import NewDelivery, Store, parse_time
from shipline import codec
from shipline import messages as m
from shipline.codec import InvalidRecord
from shipline.config import Settings
from shipline.envelope import Envelope

log = logging.getLogger(__name__)
TIME_MARGIN = 300.0  # seconds: Kafka's record timestamps and event times are taken apart in time
CHUNK = 500
MAX_PENDING = 1000  # pushes, and queued builds, a replay keeps waiting for their build.finished

Joined = tuple[dict[str, Any] | None, dict[str, Any] | None]  # (builds row, pushes row) from the log


class LogJoins:
    """What replayed ``build_finish`` payloads join, taken from the events the replay reads.

    Fed every event of the one app being replayed, in log order, before the subscription's filter
    and asked time or sequence are applied: a push and build.queued that are not replayed
    themselves are still joined into a build.finished that is. Entries have the shapes of the
    store's rows and are built by the live path's functions (``ingest.pushed``,
    ``ingest.queued_build``); a build's entries are dropped when its build.finished is seen. Builds
    that never finish and pushes that never got a build would stay, so each map holds at most
    ``limit`` entries and forgets its oldest beyond that (``dropped`` counts them); a
    build.finished whose entries are gone joins the store's rows.
    """

    def __init__(self, limit: int = MAX_PENDING) -> None:
        self.limit = limit
        self.pushes: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.builds: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.dropped = 0

    def see(self, env: Envelope) -> Joined:
        """Keep a push or build.queued; for a build.finished, hand over (and forget) what it joins."""
        d = env.data
        if isinstance(d, m.DeliveryAccepted):
            found = ingest.pushed(env)
            if found:
                self._keep(self.pushes, found[0], {"repository": found[1], "author": found[2]})
        elif isinstance(d, m.BuildQueued):
            self._keep(self.builds, d.build, ingest.queued_build(env))
        elif isinstance(d, m.BuildFinished):
            build = self.builds.pop(d.build, None)
            push = self.pushes.pop(build["delivery_id"], None) if build is not None else None
            return build, push
        return None, None

    def _keep(self, kept: OrderedDict[Any, dict[str, Any]], key: Any, row: dict[str, Any]) -> None:
        if key in kept:  # the first one wins, as the store's ON CONFLICT DO NOTHING
            return
        kept[key] = row
        if len(kept) > self.limit:
            kept.popitem(last=False)
            self.dropped += 1


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
            envs: list[tuple[Envelope, Joined]] = []
            joins = LogJoins()
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
                    if env.app_id != app_id:
                        continue
                    joined = joins.see(env)
                    if not events.matches(job["events"], env.type):
                        continue
                    if env.type not in events.deliverable_types():
                        continue
                    if since_sequence is not None and (env.sequence is None or env.sequence < since_sequence):
                        continue
                    if since_time is not None and parse_time(env.time) < since_time:
                        continue
                    envs.append((env, joined))
                if len(envs) >= CHUNK:
                    queued += self._queue(sid, envs, rows)
            queued += self._queue(sid, envs, rows)
            if joins.dropped:
                log.info("replay %s: forgot %d pushes or queued builds read from the log (over %d waiting for"
                         " their build.finished); those builds joined the stored rows", job["id"], joins.dropped,
                         joins.limit)
        finally:
            consumer.close()
        self.sender.poke([(sid, app_id)])
        return scanned, queued

    def _queue(self, sid: str, envs: list[tuple[Envelope, Joined]], rows: list[NewDelivery]) -> int:
        if not envs:
            return 0
        with self.store.pool.connection() as conn, conn.transaction():
            for env, (build, push) in envs:
                rows.append(ingest.new_delivery(sid, env, ingest.payload_for(conn, self.store, env, build, push)))
            self.store.queue_replayed(conn, rows)
        n = len(rows)
        self.sender.poke([(sid, envs[0][0].app_id)])
        envs.clear()
        rows.clear()
        return n
