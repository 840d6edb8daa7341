"""Rebuild the projections from offset 0 beside the live ones, then swap them in atomically.

``rebuild(settings)``:

1. creates ``<live>_next`` with the same migrations and replays the events topic into it with
   its own consumer (all partitions assigned, no group offsets), up to the high watermarks
   captured at the start, through the very same ``apply_batch`` the live projector uses
   (records the live projector dead-lettered fail the same way here and are skipped);
2. computes the checksum of the new tables;
3. swaps: in ONE transaction holding the swap lock exclusively (the live projector takes it
   shared around every batch, so it pauses between batches), renames live -> ``<live>_old`` and
   ``<live>_next`` -> live, then drops the old schema. The projector notices the new schema,
   reconnects and folds the events that arrived since step 1 from the new stored offsets.

Readers keep answering throughout: until the swap they read the old tables, after it the new.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from projections.batch import apply_batch, decode_all, swap_lock_key
from projections.projector import migrate_schema
from projections.schema import TABLES, checksum
from shipline.config import Settings
from shipline.db import connect_kwargs, validate_schema

log = logging.getLogger(__name__)


READ_AHEAD = 2  # decoded batches the reader thread may hold ready


class RebuildError(RuntimeError):
    pass


@dataclass
class RebuildResult:
    events: int  # records replayed (offsets covered), including skipped ones
    applied: int
    duplicates: int
    rejected: int
    seconds: float
    checksum: dict[str, str]
    swapped: bool
    schema: str  # where the rebuilt tables are now

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class ProgressBar:
    """``rebuild [#####-----]  52%  520,000/1,000,000  24,310/s  ETA 19s`` on a stream (stderr)."""

    def __init__(self, total: int, stream: TextIO | None, width: int = 30) -> None:
        self.total = total
        self.stream = stream
        self.width = width
        self.started = time.monotonic()
        self._last = 0.0
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())

    def update(self, done: int, *, final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not final and now - self._last < (0.2 if self._tty else 5.0):
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        frac = 1.0 if self.total == 0 else min(done / self.total, 1.0)
        filled = int(frac * self.width)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = (
            f"rebuild [{'#' * filled}{'-' * (self.width - filled)}] {frac:4.0%}  {done:,}/{self.total:,} events"
            f"  {rate:,.0f}/s  " + (f"{elapsed:.1f}s" if final else f"ETA {eta:.0f}s")
        )
        if self._tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def names(live: str) -> tuple[str, str]:
    """(fresh, old) schema names beside ``live``."""
    fresh, old = f"{live}_next", f"{live}_old"
    validate_schema(fresh)
    validate_schema(old)
    return fresh, old


def rebuild(
    settings: Settings,
    *,
    swap: bool = True,
    keep_old: bool = False,
    progress: TextIO | None | str = "stderr",
    batch_size: int = 5000,
    stall_timeout: float = 120.0,
) -> RebuildResult:
    """Replay the events topic into fresh tables and (``swap``) make them the live ones.

    ``progress`` is where the progress bar goes: ``"stderr"`` (the default: whatever
    ``sys.stderr`` is at call time), a stream, or None for no bar.
    """
    stream = sys.stderr if isinstance(progress, str) else progress
    live = settings.schema("projections")
    fresh, old = names(live)
    topic = settings.topics.events
    started = time.monotonic()
    with psycopg.connect(settings.db_url, autocommit=True) as admin:
        got = admin.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (f"{live}/rebuild",)).fetchone()
        if not got or not got[0]:
            raise RebuildError(f"another rebuild of {live} is running")
        admin.execute(f"DROP SCHEMA IF EXISTS {fresh} CASCADE")
        migrate_schema(settings, fresh)
        with psycopg.connect(settings.db_url, autocommit=True, **connect_kwargs(fresh)) as target:
            # a crash mid-rebuild throws the schema away anyway: no need to wait for the WAL flush
            target.execute("SET synchronous_commit = off")
            deferred = _defer_indexes(target, fresh)
            counts = _replay(settings, target, fresh, topic, stream, batch_size, stall_timeout)
            for statement in deferred:
                target.execute(statement)  # type: ignore[arg-type]  # definitions read from pg_indexes
            for table in TABLES:
                target.execute(f"ANALYZE {table}")
            sums = checksum(target, fresh)
        schema = fresh
        if swap:
            _swap(admin, live, fresh, old, keep_old=keep_old)
            schema = live
        admin.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"{live}/rebuild",))
    return RebuildResult(
        events=counts["events"], applied=counts["applied"], duplicates=counts["duplicates"],
        rejected=counts["rejected"], seconds=time.monotonic() - started, checksum=sums, swapped=swap, schema=schema,
    )


def _defer_indexes(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """Drop the non-unique indexes of a fresh schema; return their definitions to build after the load.

    Building an index once over the loaded rows is much cheaper than maintaining it row by row.
    Unique indexes stay: the folds look rows up by them (and they keep their constraints).
    """
    rows = conn.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND NOT i.indisunique ORDER BY c.relname",
        (schema,),
    ).fetchall()
    for name, _ in rows:
        conn.execute(f"DROP INDEX {schema}.{name}")
    return [definition for _, definition in rows]


def _replay(
    settings: Settings,
    target: psycopg.Connection[Any],
    fresh: str,
    topic: str,
    progress: TextIO | None,
    batch_size: int,
    stall_timeout: float,
) -> dict[str, int]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{settings.topic_prefix}-rebuild",  # never joined nor committed: assign() only
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "queued.min.messages": 200000,
            "log_level": 3,
        }
    )
    counts = {"events": 0, "applied": 0, "duplicates": 0, "rejected": 0}
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise RebuildError(f"cannot read topic {topic}: {meta.error if meta else 'missing'}")
        marks = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in meta.partitions}
        total = sum(high - low for low, high in marks.values())
        done_at = {p: low for p, (low, _) in marks.items()}  # next offset per partition, for progress
        remaining = {p for p, (low, high) in marks.items() if high > low}
        bar = ProgressBar(total, progress)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(remaining)])

        def skip(rec: Any, reason: str) -> None:  # the live projector dead-lettered it already
            counts["rejected"] += 1

        # The reader thread consumes and decodes the next batches while this thread waits for
        # PostgreSQL to apply the current one (decoding is a third of the rebuild's Python time,
        # and the wait for PostgreSQL about as long; both threads share one GIL, which psycopg
        # and librdkafka release while they wait).
        batches: queue.Queue[tuple[list[Any], list[Any], dict[int, int]] | BaseException | None] = queue.Queue(
            maxsize=READ_AHEAD
        )
        stop = threading.Event()

        def hand_over(item: tuple[list[Any], list[Any], dict[int, int]] | BaseException | None) -> None:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        def read() -> None:
            try:
                last_seen = time.monotonic()
                while remaining and not stop.is_set():
                    msgs = consumer.consume(batch_size, timeout=0.5)
                    records = []
                    for msg in msgs:
                        p, offset, err = msg.partition() or 0, msg.offset() or 0, msg.error()
                        if err is not None:
                            if err.code() == KafkaError._PARTITION_EOF:
                                if offset >= marks[p][1]:
                                    remaining.discard(p)
                                continue
                            raise RebuildError(f"consumer error: {err}")
                        if offset >= marks[p][1]:  # past the snapshot: the live projector's business
                            remaining.discard(p)
                            continue
                        records.append(msg)
                        done_at[p] = offset + 1
                        if done_at[p] >= marks[p][1]:
                            remaining.discard(p)
                    if records:
                        last_seen = time.monotonic()
                        hand_over((records, decode_all(records), dict(done_at)))
                    elif time.monotonic() - last_seen > stall_timeout:
                        raise RebuildError(
                            f"no records for {stall_timeout:.0f}s; partitions {sorted(remaining)} unfinished"
                        )
                hand_over(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the applying thread, raised there
                hand_over(exc)

        reader = threading.Thread(target=read, name="rebuild-reader", daemon=True)
        reader.start()
        try:
            while True:
                item = batches.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                records, decoded, done = item
                result = apply_batch(target, fresh, records, reject=skip, decoded=decoded)
                counts["applied"] += result.applied
                counts["duplicates"] += result.duplicates
                counts["events"] = sum(done[p] - marks[p][0] for p in marks)
                bar.update(counts["events"])
        finally:
            stop.set()
            reader.join(5)  # before the consumer is closed: it is not safe to close under a consume
        counts["events"] = total
        bar.update(total, final=True)
        # every partition ends exactly at its snapshot watermark (past trailing control records too)
        with target.transaction(), target.cursor() as cur:
            cur.executemany(
                'INSERT INTO offsets (topic, partition, "offset") VALUES (%s, %s, %s)'
                ' ON CONFLICT (topic, partition) DO UPDATE'
                ' SET "offset" = GREATEST(offsets."offset", excluded."offset")',
                [(topic, p, high) for p, (low, high) in marks.items() if high > low],
            )
        return counts
    finally:
        consumer.close()


def swap_in(settings: Settings, *, keep_old: bool = False) -> None:
    """Make the tables a ``rebuild(swap=False)`` left in ``<live>_next`` the live ones."""
    live = settings.schema("projections")
    fresh, old = names(live)
    with psycopg.connect(settings.db_url, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (fresh,)).fetchone():
            raise RebuildError(f"no rebuilt schema {fresh} to swap in")
        _swap(admin, live, fresh, old, keep_old=keep_old)


def _swap(admin: psycopg.Connection[Any], live: str, fresh: str, old: str, *, keep_old: bool) -> None:
    """Rename live -> old and fresh -> live in one transaction, under the exclusive swap lock."""
    admin.execute(f"DROP SCHEMA IF EXISTS {old} CASCADE")
    with admin.transaction():
        admin.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (swap_lock_key(live),))
        exists = admin.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (live,)).fetchone()
        if exists:
            admin.execute(f"ALTER SCHEMA {live} RENAME TO {old}")
        admin.execute(f"ALTER SCHEMA {fresh} RENAME TO {live}")
    log.info("swapped rebuilt projections into %s", live)
    if not keep_old:
        admin.execute(f"DROP SCHEMA IF EXISTS {old} CASCADE")
