"""Every SQL statement of the outbound schema, in one place.

Table names are qualified with the schema (validated identifier), so the same store works on the
dispatcher's pool and on the web app's shared pool that has no search_path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any

from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shipline.db import delete_older, validate_schema

DELIVERY_COLUMNS = (
    "id, subscription_id, app_id, event_id, event_type, event_name, event_sequence, event_time, status, round,"
    " tries, attempts, next_attempt_at, last_attempt_at, last_status, last_error, delivered_at, failed_at,"
    " origin, created_at"
)
SUBSCRIPTION_COLUMNS = (
    "id, app_id, url, events, description, enabled, disabled_reason, disabled_at, failing_since,"
    " previous_secret_expires_at, created_at, updated_at"
)
PRUNED_TABLES = ("pushes", "builds")  # join caches kept for SHIPLINE_OUTBOUND_KEEP_DAYS (outbound.retention)
UPDATABLE = {"url", "events", "description", "enabled", "secret_encrypted", "previous_secret_expires_at"}


def ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass(frozen=True)
class NewDelivery:
    id: str
    subscription_id: str
    app_id: int
    event_id: str
    event_type: str
    event_name: str
    event_sequence: int | None
    event_time: datetime
    payload: bytes
    status: str = "pending"
    last_error: str | None = None


@dataclass(frozen=True)
class SendingSubscription:
    id: str
    app_id: int
    url: str
    secret_encrypted: str
    previous_secret_encrypted: str | None
    previous_secret_expires_at: datetime | None
    active: bool


@dataclass(frozen=True)
class Pending:
    id: str
    event_id: str
    event_name: str
    payload: bytes
    round: int
    tries: int
    attempts: int
    next_attempt_at: float


@dataclass(frozen=True)
class AttemptRecord:
    delivery_id: str
    subscription_id: str
    round: int
    attempt: int  # number of this attempt over the delivery's life
    started_at: float
    duration: float
    status_code: int | None
    error: str | None
    response_body: str | None


class Store:
    def __init__(self, pool: ConnectionPool, schema: str) -> None:
        self.pool = pool
        self.schema = validate_schema(schema)
        self.channel = f"{schema}_wake"[:63]

    @cache  # noqa: B019 - one Store per schema, few distinct statements
    def q(self, text: str) -> str:
        return text.replace("{s}", self.schema)

    # ------------------------------------------------------------------ ingest (inside a transaction)

    def subscriptions_for(self, conn: Connection[Any], app_ids: Iterable[int]) -> dict[int, dict[str, dict[str, Any]]]:
        rows = conn.execute(
            self.q("SELECT id, app_id, events, enabled FROM {s}.subscriptions"
                   " WHERE app_id = ANY(%s) AND deleted_at IS NULL"),
            (list(app_ids),),
        ).fetchall()
        out: dict[int, dict[str, dict[str, Any]]] = {}
        for sid, app_id, events, enabled in rows:
            out.setdefault(app_id, {})[sid] = {"events": list(events), "enabled": enabled}
        return out

    def create_subscription(self, conn: Connection[Any], *, id: str, app_id: int, url: str, events: list[str],
                            secret_encrypted: str, description: str, at: datetime, event_id: str) -> None:
        conn.execute(
            self.q("INSERT INTO {s}.subscriptions (id, app_id, url, events, description, secret_encrypted,"
                   " created_at, updated_at, event_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                   " ON CONFLICT (id) DO NOTHING"),
            (id, app_id, url, events, description, secret_encrypted, at, at, event_id),
        )

    def update_subscription(self, conn: Connection[Any], sid: str, app_id: int, changes: dict[str, Any],
                            at: datetime, rotation: float) -> dict[str, Any] | None:
        """Apply the known keys of a subscription.updated event; returns the row's new state."""
        row = conn.execute(
            self.q("SELECT secret_encrypted, enabled FROM {s}.subscriptions"
                   " WHERE id = %s AND app_id = %s AND deleted_at IS NULL FOR UPDATE"),
            (sid, app_id),
        ).fetchone()
        if row is None:
            return None
        sets: list[str] = ["updated_at = %s"]
        params: list[Any] = [at]
        for key in ("url", "description"):
            if isinstance(changes.get(key), str):
                sets.append(f"{key} = %s")
                params.append(changes[key])
        if isinstance(changes.get("events"), list):
            sets.append("events = %s")
            params.append([str(e) for e in changes["events"]])
        if isinstance(changes.get("secret_encrypted"), str) and changes["secret_encrypted"] != row[0]:
            expires = changes.get("previous_secret_expires_at")
            until = parse_time(expires) if isinstance(expires, str) else ts(at.timestamp() + rotation)
            sets += ["previous_secret_encrypted = secret_encrypted", "previous_secret_expires_at = %s",
                     "secret_encrypted = %s"]
            params += [until, changes["secret_encrypted"]]
        if changes.get("enabled") is True and not row[1]:
            sets += ["enabled = true", "disabled_reason = NULL", "disabled_at = NULL", "failing_since = NULL",
                     "disable_reported = true"]
        elif changes.get("enabled") is False and row[1]:
            sets += ["enabled = false", "disabled_reason = 'disabled by an operator'", "disabled_at = %s"]
            params.append(at)
        params.append(sid)
        conn.execute(self.q(f"UPDATE {{s}}.subscriptions SET {', '.join(sets)} WHERE id = %s"), params)
        if changes.get("enabled") is False:
            self.fail_pending(conn, sid, "subscription disabled")
        got = conn.execute(self.q("SELECT events, enabled FROM {s}.subscriptions WHERE id = %s"), (sid,)).fetchone()
        assert got is not None
        return {"events": list(got[0]), "enabled": got[1]}

    def delete_subscription(self, conn: Connection[Any], sid: str, app_id: int, at: datetime) -> bool:
        cur = conn.execute(
            self.q("UPDATE {s}.subscriptions SET deleted_at = %s, updated_at = %s"
                   " WHERE id = %s AND app_id = %s AND deleted_at IS NULL"),
            (at, at, sid, app_id),
        )
        if cur.rowcount:
            self.fail_pending(conn, sid, "subscription deleted")
        return bool(cur.rowcount)

    def disable_subscription(self, conn: Connection[Any], sid: str, reason: str, at: datetime,
                             reported: bool) -> bool:
        """Disable (idempotent); True when this call disabled it."""
        cur = conn.execute(
            self.q("UPDATE {s}.subscriptions SET enabled = false, disabled_reason = %s, disabled_at = %s,"
                   " updated_at = %s, disable_reported = %s WHERE id = %s AND enabled AND deleted_at IS NULL"),
            (reason, at, at, reported, sid),
        )
        if cur.rowcount:
            self.fail_pending(conn, sid, f"subscription disabled: {reason}")
        elif reported:
            conn.execute(self.q("UPDATE {s}.subscriptions SET disable_reported = true WHERE id = %s"), (sid,))
        return bool(cur.rowcount)

    def fail_pending(self, conn: Connection[Any], sid: str, reason: str) -> None:
        conn.execute(
            self.q("UPDATE {s}.deliveries SET status = 'failed', failed_at = now(), last_error = %s, round = round + 1"
                   " WHERE subscription_id = %s AND status = 'pending'"),
            (reason, sid),
        )

    def upsert_app(self, conn: Connection[Any], app_id: int, fields: dict[str, Any]) -> None:
        conn.execute(
            self.q("INSERT INTO {s}.apps (app_id, name, namespace, repo_url, build) VALUES (%s, %s, %s, %s, %s)"
                   " ON CONFLICT (app_id) DO UPDATE SET"
                   " name = COALESCE(EXCLUDED.name, apps.name),"
                   " namespace = COALESCE(EXCLUDED.namespace, apps.namespace),"
                   " repo_url = COALESCE(EXCLUDED.repo_url, apps.repo_url),"
                   " build = COALESCE(EXCLUDED.build, apps.build)"),
            (app_id, fields.get("name"), fields.get("namespace"), fields.get("repo_url"),
             json.dumps(fields["build"]) if isinstance(fields.get("build"), dict) else None),
        )

    def save_push(self, conn: Connection[Any], delivery_id: str, app_id: int, repository: dict[str, Any],
                  author: dict[str, Any]) -> None:
        conn.execute(
            self.q("INSERT INTO {s}.pushes (delivery_id, app_id, repository, author) VALUES (%s, %s, %s, %s)"
                   " ON CONFLICT (delivery_id) DO NOTHING"),
            (delivery_id, app_id, json.dumps(repository), json.dumps(author)),
        )

    def save_build(self, conn: Connection[Any], app_id: int, build: int, fields: dict[str, Any]) -> None:
        conn.execute(
            self.q("INSERT INTO {s}.builds (app_id, build, commit, message, author, ref, repo_url, delivery_id,"
                   " queued_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (app_id, build) DO NOTHING"),
            (app_id, build, fields["commit"], fields["message"], fields["author"], fields["ref"],
             fields["repo_url"], fields["delivery_id"], fields["queued_at"]),
        )

    def build_context(self, conn: Connection[Any], app_id: int, build: int, known_build: dict[str, Any] | None = None,
                      known_push: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a build_finish payload joins: the build.queued row, the app, and the push.

        ``known_build`` / ``known_push`` (a replay took them from the log) stand in for the rows,
        which may have been pruned; what is not passed is read here.
        """
        cur = conn.cursor(row_factory=dict_row)
        b = known_build
        if b is None:
            b = cur.execute(self.q("SELECT * FROM {s}.builds WHERE app_id = %s AND build = %s"),
                            (app_id, build)).fetchone()
        a = cur.execute(self.q("SELECT * FROM {s}.apps WHERE app_id = %s"), (app_id,)).fetchone()
        p = known_push
        if p is None and b is not None:
            p = cur.execute(self.q("SELECT repository, author FROM {s}.pushes WHERE delivery_id = %s"),
                            (b["delivery_id"],)).fetchone()
        return {"build": b, "app": a, "push": p}

    def prune(self, days: float, batch: int = 10_000) -> dict[str, int]:
        """Delete the pushes and builds seen more than ``days`` ago; returns how many, per table.

        Each batch is its own short transaction, so a large backlog never holds many row locks or
        runs long next to the ingest's inserts. A build finishing after its rows are gone still
        gets a payload: ``payloads.build_finish`` leaves what it cannot join null (a replay joins
        what it reads from the log instead).
        """
        return {
            table: delete_older(self.pool.connection, self.q(f"{{s}}.{table}"), "seen_at", days, batch)
            for table in PRUNED_TABLES
        }

    def insert_deliveries(self, conn: Connection[Any], rows: Sequence[NewDelivery], now: datetime) -> None:
        if not rows:
            return
        with conn.cursor() as cur:
            cur.executemany(
                self.q("INSERT INTO {s}.deliveries (id, subscription_id, app_id, event_id, event_type, event_name,"
                       " event_sequence, event_time, payload, status, last_error, next_attempt_at, failed_at)"
                       " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                       " ON CONFLICT (subscription_id, event_id) DO NOTHING"),
                [(r.id, r.subscription_id, r.app_id, r.event_id, r.event_type, r.event_name, r.event_sequence,
                  r.event_time, r.payload, r.status, r.last_error, now, now if r.status == "failed" else None)
                 for r in rows],
            )

    def save_offsets(self, conn: Connection[Any], topic: str, offsets: dict[int, int]) -> None:
        with conn.cursor() as cur:
            cur.executemany(
                self.q("INSERT INTO {s}.consumed (topic, partition, next_offset) VALUES (%s, %s, %s)"
                       " ON CONFLICT (topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset"),
                [(topic, p, o) for p, o in offsets.items()],
            )

    def stored_offsets(self, topic: str) -> dict[int, int]:
        with self.pool.connection() as conn:
            rows = conn.execute(self.q("SELECT partition, next_offset FROM {s}.consumed WHERE topic = %s"),
                                (topic,)).fetchall()
        return {p: o for p, o in rows}

    # ------------------------------------------------------------------------------------ sending

    def sending_subscription(self, sid: str) -> SendingSubscription | None:
        with self.pool.connection() as conn:
            row = conn.execute(
                self.q("SELECT id, app_id, url, secret_encrypted, previous_secret_encrypted,"
                       " previous_secret_expires_at, enabled AND deleted_at IS NULL FROM {s}.subscriptions"
                       " WHERE id = %s"),
                (sid,),
            ).fetchone()
        return SendingSubscription(*row) if row else None

    def next_pending(self, sid: str, app_id: int, exclude: Sequence[str], limit: int) -> list[Pending]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                self.q("SELECT id::text, event_id, event_name, payload, round, tries, attempts,"
                       " extract(epoch FROM next_attempt_at)::float8 FROM {s}.deliveries"
                       " WHERE subscription_id = %s AND app_id = %s AND status = 'pending'"
                       " AND NOT (id = ANY(%s::uuid[]))"
                       " ORDER BY event_sequence NULLS LAST, seq LIMIT %s"),
                (sid, app_id, list(exclude), limit),
            ).fetchall()
        return [Pending(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7]) for r in rows]

    def pending_lanes(self) -> list[tuple[str, int, float]]:
        """(subscription, app, when its head is due) of every lane with something pending.

        The head's time, not the earliest of the lane: rows behind a head that waits for its retry
        are due on paper but must not wake the lane.
        """
        with self.pool.connection() as conn:
            rows = conn.execute(
                self.q("SELECT DISTINCT ON (subscription_id, app_id) subscription_id, app_id,"
                       " extract(epoch FROM next_attempt_at)::float8 FROM {s}.deliveries WHERE status = 'pending'"
                       " ORDER BY subscription_id, app_id, event_sequence NULLS LAST, seq"),
            ).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def record_successes(self, items: Sequence[tuple[AttemptRecord, float]]) -> None:
        """(attempt, finished_at) for successful attempts, in one transaction."""
        if not items:
            return
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                self.q("UPDATE {s}.deliveries SET status = 'succeeded', delivered_at = %s, last_attempt_at = %s,"
                       " last_status = %s, last_error = NULL, tries = tries + 1, attempts = attempts + 1"
                       " WHERE id = %s AND round = %s AND status = 'pending'"),
                [(ts(done), ts(a.started_at), a.status_code, a.delivery_id, a.round) for a, done in items],
            )
            self._insert_attempts(cur, [(a, "succeeded", None, None) for a, _ in items])
            cur.execute(
                self.q("UPDATE {s}.subscriptions SET failing_since = NULL"
                       " WHERE id = ANY(%s) AND failing_since IS NOT NULL"),
                (sorted({a.subscription_id for a, _ in items}),),
            )

    def _insert_attempts(self, cur: Any, rows: Sequence[tuple[AttemptRecord, str, float | None, float | None]]) -> None:
        cur.executemany(
            self.q("INSERT INTO {s}.attempts (delivery_id, subscription_id, attempt, round, started_at, duration_ms,"
                   " status_code, error, response_body, outcome, next_attempt_at, delay)"
                   " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"),
            [(a.delivery_id, a.subscription_id, a.attempt, a.round, ts(a.started_at), a.duration * 1000.0,
              a.status_code, a.error, a.response_body, outcome, ts(at) if at is not None else None, delay)
             for a, outcome, at, delay in rows],
        )

    def mark_failing(self, conn: Connection[Any], sid: str, at: float) -> float:
        """Start (or keep) the subscription's failure clock; returns when it started failing."""
        row = conn.execute(
            self.q("UPDATE {s}.subscriptions SET failing_since = COALESCE(failing_since, %s) WHERE id = %s"
                   " RETURNING extract(epoch FROM failing_since)::float8"),
            (ts(at), sid),
        ).fetchone()
        return float(row[0]) if row else at

    def record_retry(self, conn: Connection[Any], a: AttemptRecord, at: float, delay: float) -> None:
        conn.execute(
            self.q("UPDATE {s}.deliveries SET tries = tries + 1, attempts = attempts + 1, next_attempt_at = %s,"
                   " last_attempt_at = %s, last_status = %s, last_error = %s"
                   " WHERE id = %s AND round = %s AND status = 'pending'"),
            (ts(at), ts(a.started_at), a.status_code, a.error, a.delivery_id, a.round),
        )
        with conn.cursor() as cur:
            self._insert_attempts(cur, [(a, "retry", at, delay)])

    def record_given_up(self, conn: Connection[Any], a: AttemptRecord, outcome: str, reason: str) -> None:
        conn.execute(
            self.q("UPDATE {s}.deliveries SET status = 'failed', failed_at = now(), tries = tries + 1,"
                   " attempts = attempts + 1, last_attempt_at = %s, last_status = %s, last_error = %s"
                   " WHERE id = %s AND round = %s AND status = 'pending'"),
            (ts(a.started_at), a.status_code, reason if a.error is None else f"{a.error}; {reason}",
             a.delivery_id, a.round),
        )
        with conn.cursor() as cur:
            self._insert_attempts(cur, [(a, outcome, None, None)])

    def unreported_disables(self) -> list[tuple[str, int, str, datetime]]:
        with self.pool.connection() as conn:
            rows = conn.execute(
                self.q("SELECT id, app_id, disabled_reason, disabled_at FROM {s}.subscriptions"
                       " WHERE NOT enabled AND NOT disable_reported AND deleted_at IS NULL"),
            ).fetchall()
        return [(r[0], r[1], r[2] or "", r[3]) for r in rows]

    def mark_reported(self, sid: str) -> None:
        with self.pool.connection() as conn:
            conn.execute(self.q("UPDATE {s}.subscriptions SET disable_reported = true WHERE id = %s"), (sid,))

    # ------------------------------------------------------------------------ manual actions (API)

    def notify(self, conn: Connection[Any], payload: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    def redeliver(self, delivery_id: str) -> dict[str, Any] | None:
        with self.pool.connection() as conn, conn.transaction():
            row = conn.execute(
                self.q("UPDATE {s}.deliveries d SET status = 'pending', round = round + 1, tries = 0,"
                       " next_attempt_at = now(), failed_at = NULL, seq = nextval(pg_get_serial_sequence(%s, 'seq'))"
                       " FROM {s}.subscriptions s WHERE d.id = %s AND s.id = d.subscription_id"
                       " AND s.deleted_at IS NULL RETURNING d.id::text, d.subscription_id, d.app_id, s.enabled"),
                (f"{self.schema}.deliveries", delivery_id),
            ).fetchone()
            if row is None:
                return None
            self.notify(conn, "lanes")
        return {"id": row[0], "subscription_id": row[1], "app_id": row[2], "status": "pending",
                "subscription_enabled": row[3]}

    def recover(self, sid: str, since: datetime) -> int:
        with self.pool.connection() as conn, conn.transaction():
            cur = conn.execute(
                self.q("UPDATE {s}.deliveries SET status = 'pending', round = round + 1, tries = 0,"
                       " next_attempt_at = now(), failed_at = NULL, seq = nextval(pg_get_serial_sequence(%s, 'seq'))"
                       " WHERE subscription_id = %s AND status = 'failed' AND failed_at >= %s"),
                (f"{self.schema}.deliveries", sid, since),
            )
            self.notify(conn, "lanes")
            return cur.rowcount

    def request_replay(self, replay_id: str, sid: str, since_time: datetime | None,
                       since_sequence: int | None) -> None:
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(
                self.q("INSERT INTO {s}.replays (id, subscription_id, since_time, since_sequence)"
                       " VALUES (%s, %s, %s, %s)"),
                (replay_id, sid, since_time, since_sequence),
            )
            self.notify(conn, "replay")

    def replay(self, replay_id: str) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(
                self.q("SELECT id::text, subscription_id, since_time, since_sequence, status, requested_at,"
                       " finished_at, scanned, queued, error FROM {s}.replays WHERE id = %s"),
                (replay_id,),
            ).fetchone()

    def next_replay(self) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(
                self.q("SELECT r.id::text, r.subscription_id, r.since_time, r.since_sequence, s.app_id, s.events"
                       " FROM {s}.replays r JOIN {s}.subscriptions s ON s.id = r.subscription_id"
                       " WHERE r.status IN ('pending', 'running') ORDER BY r.requested_at LIMIT 1"),
            ).fetchone()

    def finish_replay(self, replay_id: str, status: str, scanned: int, queued: int, error: str | None) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                self.q("UPDATE {s}.replays SET status = %s, finished_at = now(), scanned = %s, queued = %s,"
                       " error = %s WHERE id = %s"),
                (status, scanned, queued, error, replay_id),
            )

    def fail_orphan_replays(self) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                self.q("UPDATE {s}.replays r SET status = 'failed', finished_at = now(),"
                       " error = 'subscription not found' WHERE status IN ('pending', 'running')"
                       " AND NOT EXISTS (SELECT 1 FROM {s}.subscriptions s WHERE s.id = r.subscription_id)"),
            )

    def queue_replayed(self, conn: Connection[Any], rows: Sequence[NewDelivery]) -> None:
        """Replayed deliveries: new ones are inserted; ones the subscription already had go again."""
        with conn.cursor() as cur:
            cur.executemany(
                self.q("INSERT INTO {s}.deliveries (id, subscription_id, app_id, event_id, event_type, event_name,"
                       " event_sequence, event_time, payload, next_attempt_at, origin)"
                       " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now(), 'replay')"
                       " ON CONFLICT (subscription_id, event_id) DO UPDATE SET status = 'pending',"
                       " round = deliveries.round + 1, tries = 0, next_attempt_at = now(), failed_at = NULL,"
                       " origin = 'replay' WHERE deliveries.status <> 'pending'"),
                [(r.id, r.subscription_id, r.app_id, r.event_id, r.event_type, r.event_name, r.event_sequence,
                  r.event_time, r.payload) for r in rows],
            )

    # ------------------------------------------------------------------------------------ reading

    def subscription(self, sid: str) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(
                self.q(f"SELECT {SUBSCRIPTION_COLUMNS} FROM {{s}}.subscriptions WHERE id = %s AND deleted_at IS NULL"),
                (sid,),
            ).fetchone()

    def subscriptions(self, app_id: int) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(
                self.q(f"SELECT {SUBSCRIPTION_COLUMNS} FROM {{s}}.subscriptions"
                       " WHERE app_id = %s AND deleted_at IS NULL ORDER BY created_at, id"),
                (app_id,),
            ).fetchall()

    def deliveries(self, sid: str, status: str | None, limit: int, before: int | None) -> list[dict[str, Any]]:
        where = ["subscription_id = %s"]
        params: list[Any] = [sid]
        if status:
            where.append("status = %s")
            params.append(status)
        if before is not None:
            where.append("seq < %s")
            params.append(before)
        params.append(limit)
        with self.pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(
                self.q(f"SELECT seq, {DELIVERY_COLUMNS} FROM {{s}}.deliveries WHERE {' AND '.join(where)}"
                       " ORDER BY seq DESC LIMIT %s"),
                params,
            ).fetchall()

    def delivery(self, delivery_id: str) -> dict[str, Any] | None:
        with self.pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(
                self.q(f"SELECT seq, {DELIVERY_COLUMNS}, payload FROM {{s}}.deliveries WHERE id = %s"),
                (delivery_id,),
            ).fetchone()

    def attempts(self, delivery_id: str) -> list[dict[str, Any]]:
        with self.pool.connection() as conn:
            return conn.cursor(row_factory=dict_row).execute(
                self.q("SELECT attempt, round, started_at, duration_ms, status_code, error, response_body, outcome,"
                       " next_attempt_at, delay FROM {s}.attempts WHERE delivery_id = %s ORDER BY id"),
                (delivery_id,),
            ).fetchall()
