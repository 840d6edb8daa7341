"""Apply one batch of consumed records in ONE transaction with the offsets it consumed.

This is the exactly-once effect: the rows a batch folds and the ``offsets`` row of each
partition it read commit together or not at all, so a crash anywhere leaves the tables at a
batch boundary that the stored offsets describe exactly; a restart seeks there. Inside the
transaction:

* the ``offsets`` rows are locked (``FOR UPDATE``) and records below the stored offset are
  dropped: a second consumer that still holds a revoked partition cannot apply anything twice;
* events whose id is already in ``audit`` are skipped (the producers upstream are at-least-once
  and may re-send an identical record at a new offset);
* the folds' statements are recorded and sent in layers, many apps' rows per statement
  (``projections.writer.Layered``); the audit rows go in by COPY.

A record that cannot be decoded is rejected (before the commit). When the fast path fails,
the batch is retried record by record, each in a savepoint, so only the records that fail are
rejected (the caller dead-letters them) and the rest commit. ``SYSTEMIC`` errors (connection lost,
table missing, ...) are not a record's fault: they propagate, nothing is rejected, and the
caller re-seeks and retries. A record rejected because of a bug in a fold is not lost: the log
keeps it, and a rebuild with the fixed code folds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from projections.handlers import HANDLERS, audit_data
from projections.writer import Immediate, Layered
from shipline import codec
from shipline.envelope import Envelope

log = logging.getLogger(__name__)

AUDIT_COLUMNS = (
    'event_id, type, app_id, time, sequence, correlation_id, causation_id, source, data, topic, partition, "offset"'
)


Reject = Callable[[Any, str], None]


# errors that are the database's or the deployment's, never one record's: nothing is rejected,
# the caller retries the batch (a missing table, lost privileges, a read-only standby, a lost connection)
SYSTEMIC: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedColumn,
    psycopg.errors.InsufficientPrivilege,
    psycopg.errors.ReadOnlySqlTransaction,
)


class SchemaSwapped(RuntimeError):
    """The live schema was replaced by a rebuild since this connection looked at it."""


_RETRY: tuple[type[Exception], ...] = (*SYSTEMIC, SchemaSwapped)


@dataclass
class Result:
    applied: int = 0
    duplicates: int = 0
    stale: int = 0  # records below the stored offset (applied already, by us or another owner)
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset per (topic, partition)


def swap_lock_key(schema: str) -> str:
    """The advisory-lock name a rebuild holds exclusively while it swaps ``schema``."""
    return f"{schema}/swap"


def schema_generation(conn: psycopg.Connection[Any], schema: str) -> int | None:
    """The OID of the schema now called ``schema``: it changes when a rebuild swaps a new one in."""
    row = conn.execute("SELECT oid::bigint FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    return None if row is None else int(row[0])


def apply_batch(
    conn: psycopg.Connection[Any],
    schema: str,
    records: Sequence[Any],
    *,
    reject: Reject,
    generation: int | None = None,
    decoded: Sequence[Envelope | codec.InvalidRecord] | None = None,
) -> Result:
    """Fold ``records`` (confluent-kafka messages, in consumption order) into ``schema`` exactly once.

    ``decoded``, when given, is ``codec.decode`` of each record already done (the envelope, or the
    ``InvalidRecord`` it raised), in the same order: the rebuild decodes on its reader thread
    while this one waits for PostgreSQL.

    ``conn`` is in autocommit mode with ``search_path`` set to ``schema``. ``reject(record,
    reason)`` is called for every record that cannot be decoded or applied, before the commit
    (so a crash can only repeat a rejection, never lose one). When ``generation`` is given and
    the schema's OID differs, ``SchemaSwapped`` is raised and nothing is written.
    """
    result = Result()
    if decoded is None:
        decoded = decode_all(records)
    for rec in records:
        key = (rec.topic(), rec.partition())
        result.offsets[key] = max(result.offsets.get(key, 0), rec.offset() + 1)
    try:
        _transaction(conn, schema, records, result, reject, generation, decoded, careful=False)
    except _RETRY:
        raise
    except Exception as exc:  # noqa: BLE001 - any record's failure: find which, record by record
        log.warning("batch failed (%s); retrying record by record", exc)
        _transaction(conn, schema, records, result, reject, generation, decoded, careful=True)
    return result


def _reject(result: Result, reject: Reject, rec: Any, reason: str) -> None:
    if any(r is rec for r, _ in result.rejected):
        return
    result.rejected.append((rec, reason))
    reject(rec, reason)


def _transaction(
    conn: psycopg.Connection[Any],
    schema: str,
    records: Sequence[Any],
    result: Result,
    reject: Reject,
    generation: int | None,
    decoded: Sequence[Envelope | codec.InvalidRecord],
    *,
    careful: bool,
) -> None:
    result.applied = result.duplicates = result.stale = 0
    with conn.transaction():
        # the folds join their unnested rows to tables by primary key: a hash join over a seq scan
        # (what the planner picks for a thousand rows into a small table) grows with the table
        conn.execute("SET LOCAL enable_hashjoin = off")
        conn.execute("SET LOCAL enable_mergejoin = off")
        conn.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", (swap_lock_key(schema),))
        if generation is not None and schema_generation(conn, schema) != generation:
            raise SchemaSwapped(schema)
        stored = _lock_offsets(conn, list(result.offsets))
        fresh = _fresh(conn, records, stored, result, reject, decoded)
        with conn.cursor() as cur:
            if careful:
                _apply_carefully(conn, cur, fresh, result, reject)
            else:
                writer = Layered()
                for _, env in fresh:
                    handler = HANDLERS.get(env.type)
                    if handler is not None:
                        writer.app_id = env.app_id
                        handler(writer, env)
                with conn.pipeline():
                    writer.flush(cur)
                with cur.copy(f"COPY audit ({AUDIT_COLUMNS}) FROM STDIN") as copy:
                    for rec, env in fresh:
                        copy.write_row(_audit_row(rec, env))
                result.applied = len(fresh)
            cur.executemany(
                'INSERT INTO offsets (topic, partition, "offset") VALUES (%s, %s, %s)'
                ' ON CONFLICT (topic, partition) DO UPDATE SET "offset" = excluded."offset"'
                ' WHERE offsets."offset" < excluded."offset"',
                [(t, p, o) for (t, p), o in result.offsets.items()],
            )


def _lock_offsets(conn: psycopg.Connection[Any], keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    if not keys:
        return {}
    rows = conn.execute(
        'SELECT topic, partition, "offset" FROM offsets'
        " WHERE (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))"
        " ORDER BY topic, partition FOR UPDATE",
        ([t for t, _ in keys], [p for _, p in keys]),
    ).fetchall()
    return {(t, p): o for t, p, o in rows}


def _fresh(
    conn: psycopg.Connection[Any],
    records: Sequence[Any],
    stored: dict[tuple[str, int], int],
    result: Result,
    reject: Reject,
    decoded: Sequence[Envelope | codec.InvalidRecord],
) -> list[tuple[Any, Envelope]]:
    """The records not applied before (at or past the stored offset, with an unseen event id), decoded."""
    current = []
    for rec, env in zip(records, decoded, strict=True):
        if rec.offset() < stored.get((rec.topic(), rec.partition()), -1):
            result.stale += 1
            continue
        if isinstance(env, codec.InvalidRecord):
            _reject(result, reject, rec, env.reason)
        else:
            current.append((rec, env))
    if not current:
        return []
    ids = list({env.id for _, env in current})
    seen = {r[0] for r in conn.execute("SELECT event_id FROM audit WHERE event_id = ANY(%s)", (ids,))}
    fresh = []
    for rec, env in current:
        if env.id in seen:
            result.duplicates += 1
        else:
            seen.add(env.id)
            fresh.append((rec, env))
    return fresh


def decode_all(records: Sequence[Any]) -> list[Envelope | codec.InvalidRecord]:
    """``codec.decode`` of each record, the error in its place when it is invalid (see ``decoded``)."""
    out: list[Envelope | codec.InvalidRecord] = []
    for rec in records:
        try:
            out.append(codec.decode(rec.value()))
        except codec.InvalidRecord as exc:
            out.append(exc)
    return out


def _apply_carefully(
    conn: psycopg.Connection[Any],
    cur: psycopg.Cursor[Any],
    fresh: list[tuple[Any, Envelope]],
    result: Result,
    reject: Reject,
) -> None:
    writer = Immediate(cur)
    for rec, env in fresh:
        try:
            with conn.transaction():  # a savepoint: a failing record undoes only itself
                handler = HANDLERS.get(env.type)
                if handler is not None:
                    handler(writer, env)
                cur.execute(
                    f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    _audit_row(rec, env),
                )
            result.applied += 1
        except SYSTEMIC:
            raise
        except Exception as exc:  # noqa: BLE001 - this record's fault: reject it, keep the others
            _reject(result, reject, rec, f"{env.type} {env.id}: cannot apply: {exc}")


def _audit_row(rec: Any, env: Envelope) -> tuple[Any, ...]:
    return (
        env.id, env.type, env.app_id, env.time, env.sequence, env.correlationid, env.causationid, env.source,
        audit_data(env), rec.topic(), rec.partition(), rec.offset(),
    )
