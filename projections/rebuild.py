"""Rebuild the projections from offset 0 beside the live ones, then swap them in atomically.

``rebuild(settings)``:

1. creates ``<live>_next`` with the same migrations and replays the events topic into it with
   its own consumers (partitions assigned, no group offsets), up to the high watermarks
   captured at the start, through the very same ``apply_batch`` the live projector uses
   (records the live projector dead-lettered fail the same way here and are skipped). A big
   log is shared out by partition over one worker process per CPU (``SHIPLINE_REBUILD_WORKERS``);
2. builds the indexes it deferred, and computes the checksum of the new tables;
3. swaps: in ONE transaction holding the swap lock exclusively (the live projector takes it
   shared around every batch, so it pauses between batches), renames live -> ``<live>_old`` and
   ``<live>_next`` -> live, then drops the old schema. The projector notices the new schema,
   reconnects and folds the events that arrived since step 1 from the new stored offsets.

Readers keep answering throughout: until the swap they read the old tables, after it the new.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from projections.batch import apply_batch, decode_all, schema_generation, swap_lock_key
from projections.projector import migrate_schema
from projections.schema import TABLES, combine, table_checksum
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
        sums = _finish(settings, fresh, deferred)
        schema = fresh
        if swap:
            _swap(admin, live, fresh, old, keep_old=keep_old)
            schema = live
        admin.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"{live}/rebuild",))
    return RebuildResult(
        events=counts["events"], applied=counts["applied"], duplicates=counts["duplicates"],
        rejected=counts["rejected"], seconds=time.monotonic() - started, checksum=sums, swapped=swap, schema=schema,
    )


def _finish(settings: Settings, fresh: str, deferred: list[str]) -> dict[str, str]:
    """Build the deferred indexes, ANALYZE and checksum every table; return the checksums.

    Each step is a statement of its own on a connection of its own, two or more at a time
    (PostgreSQL runs each on one CPU; the tables are complete and nothing else writes them).
    Biggest first: ``audit`` holds a row per event.
    """
    def run(statement: str) -> None:
        with psycopg.connect(settings.db_url, autocommit=True, **connect_kwargs(fresh)) as conn:
            conn.execute(statement)  # type: ignore[arg-type]  # index definitions read from pg_indexes

    def sum_table(table: str) -> tuple[str, str]:
        with psycopg.connect(settings.db_url, autocommit=True) as conn:
            return table, table_checksum(conn, fresh, table)

    tables = sorted(TABLES, key=lambda t: t != "audit")
    threads = max(2, settings.rebuild_workers or _cpus())
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rebuild-finish") as pool:
        sums = [pool.submit(sum_table, t) for t in tables]
        steps = [pool.submit(run, d) for d in sorted(deferred, key=lambda d: " audit " not in d)]
        steps += [pool.submit(run, f"ANALYZE {t}") for t in tables]
        for step in steps:
            step.result()
        return combine(dict(f.result() for f in sums))


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


Marks = dict[int, tuple[int, int]]  # partition -> (low, high) watermarks captured at the start
Report = Callable[[dict[int, int]], None]  # the next offset of each partition replayed so far

# below this many events an automatic worker count stays at one: starting a process costs ~1s
PARALLEL_FROM = 50_000


def _replay(
    settings: Settings,
    target: psycopg.Connection[Any],
    fresh: str,
    topic: str,
    progress: TextIO | None,
    batch_size: int,
    stall_timeout: float,
) -> dict[str, int]:
    """Replay every partition up to its watermark into ``fresh``, in one or several processes.

    Partitions are independent here: a record's key is its app id, every fold touches only its
    app's rows, and each partition has its own ``offsets`` row, so processes that share the
    partitions out never write the same row. Python (decoding, folding) is what limits one
    process, so a second process on a second CPU does ~1.5x the work while PostgreSQL keeps up.
    """
    marks = _watermarks(settings, topic)
    total = sum(high - low for low, high in marks.values())
    todo = sorted(p for p, (low, high) in marks.items() if high > low)
    workers = _worker_count(settings, len(todo), total)
    bar = ProgressBar(total, progress)

    def report(done: dict[int, int]) -> None:
        bar.update(sum(done.get(p, marks[p][0]) - marks[p][0] for p in marks))

    shares = [{p: marks[p] for p in todo[i::workers]} for i in range(workers)]
    if workers == 1:
        results = [_replay_partitions(settings, target, fresh, topic, shares[0], batch_size, stall_timeout, report)]
    else:
        results = _run_workers(settings, fresh, topic, shares, batch_size, stall_timeout, report)
    counts = {key: sum(r[key] for r in results) for key in ("applied", "duplicates", "rejected")}
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


def _consumer(settings: Settings) -> Consumer:
    return Consumer(
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


def _watermarks(settings: Settings, topic: str) -> Marks:
    consumer = _consumer(settings)
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise RebuildError(f"cannot read topic {topic}: {meta.error if meta else 'missing'}")
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in meta.partitions}
    finally:
        consumer.close()


def _worker_count(settings: Settings, partitions: int, total: int) -> int:
    """``SHIPLINE_REBUILD_WORKERS`` when set; else one per CPU for a log worth the start-up."""
    if settings.rebuild_workers > 0:
        wanted = settings.rebuild_workers
    elif total < PARALLEL_FROM:
        wanted = 1
    else:
        wanted = _cpus()
    return max(1, min(wanted, partitions))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _replay_partitions(
    settings: Settings,
    target: psycopg.Connection[Any],
    fresh: str,
    topic: str,
    marks: Marks,
    batch_size: int,
    stall_timeout: float,
    report: Report,
) -> dict[str, int]:
    """Replay ``marks``' partitions (each from its low to its high watermark) into ``fresh``."""
    counts = {"applied": 0, "duplicates": 0, "rejected": 0}
    if not marks:
        return counts
    # a worker orphaned by a killed rebuild must not write into the fresh schema of the next one
    generation = schema_generation(target, fresh)
    consumer = _consumer(settings)
    try:
        done_at = {p: low for p, (low, _) in marks.items()}  # next offset per partition, for progress
        remaining = set(marks)
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
                result = apply_batch(target, fresh, records, reject=skip, decoded=decoded, generation=generation)
                counts["applied"] += result.applied
                counts["duplicates"] += result.duplicates
                report(done)
        finally:
            stop.set()
            reader.join(5)  # before the consumer is closed: it is not safe to close under a consume
        return counts
    finally:
        consumer.close()


def _run_workers(
    settings: Settings,
    fresh: str,
    topic: str,
    shares: list[Marks],
    batch_size: int,
    stall_timeout: float,
    report: Report,
) -> list[dict[str, int]]:
    """Run ``_worker`` once per share in its own process; relay progress; fail if any fails.

    Processes are spawned, not forked: the parent holds open PostgreSQL and Kafka clients that a
    forked child must never touch.
    """
    ctx = multiprocessing.get_context("spawn")
    messages: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, name=f"rebuild-worker-{i}", daemon=True,
                    args=(settings, fresh, topic, share, batch_size, stall_timeout, i, messages, os.getpid()))
        for i, share in enumerate(shares)
    ]
    for proc in procs:
        proc.start()
    done: dict[int, int] = {}
    results: dict[int, dict[str, int]] = {}
    try:
        while len(results) < len(procs):
            try:
                kind, worker, payload = messages.get(timeout=0.5)
            except queue.Empty:
                dead = [p for i, p in enumerate(procs) if i not in results and not p.is_alive()]
                if dead:  # gone without a word: killed, or crashed below Python
                    raise RebuildError(f"{dead[0].name} exited with code {dead[0].exitcode}") from None
                continue
            if kind == "progress":
                done.update(payload)
                report(done)
            elif kind == "done":
                results[worker] = payload
            else:
                raise RebuildError(f"rebuild-worker-{worker} failed: {payload}")
    finally:
        for proc in procs:
            if proc.is_alive() and len(results) < len(procs):
                proc.terminate()
        for proc in procs:
            proc.join(10)
        messages.close()
    return [results[i] for i in range(len(procs))]


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a rebuild killed with -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above: nothing to work for
        os._exit(1)


def _worker(
    settings: Settings, fresh: str, topic: str, marks: Marks, batch_size: int, stall_timeout: float, worker: int,
    messages: Any, parent: int,
) -> None:
    """A worker process: replay ``marks``' partitions on its own connection and consumer."""
    _die_with_parent(parent)
    # a few dozen objects per record (records, envelopes, rows): at the default threshold of 700
    # the cyclic collector ran many times a second; reference counting still frees them at once
    # (bench.projections, 300,000 events: ~24,000-27,700/s -> ~31,000-32,000/s)
    gc.set_threshold(50_000, 20, 20)
    try:
        with psycopg.connect(settings.db_url, autocommit=True, **connect_kwargs(fresh)) as target:
            target.execute("SET synchronous_commit = off")
            got = _replay_partitions(
                settings, target, fresh, topic, marks, batch_size, stall_timeout,
                lambda done: messages.put(("progress", worker, dict(done))),
            )
        messages.put(("done", worker, got))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the rebuild
        messages.put(("error", worker, f"{type(exc).__name__}: {exc}"))
    finally:
        messages.close()
        messages.join_thread()  # everything put is flushed to the pipe before the process ends


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
