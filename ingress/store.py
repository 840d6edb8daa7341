"""The ingress's credentials store: a cache of the request records it published, in PostgreSQL.

Schema ``<SHIPLINE_DB_SCHEMA>_ingress`` holds what verification needs and nothing else: the apps'
routing fields and Fernet-encrypted GitHub secrets, deploy-hook and webhook-token SHA-256 hashes,
and the delivery ids already accepted. Every row is written *after* Kafka acknowledged the
request record it comes from, by the same ``apply`` that ``ingress.rebuild.rebuild_store`` uses
to fold the inbound topic, so the store can always be rebuilt from the log. Only the app id
sequence is not in the log as such; a rebuild moves it past the highest app id folded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from ingress.repos import normalise
from ingress.validation import storable
from shipline import messages as m
from shipline.db import delete_older, migrate, validate_schema
from shipline.envelope import Envelope

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE SEQUENCE app_ids;
        CREATE TABLE apps (
            id bigint PRIMARY KEY,
            name text NOT NULL,
            namespace text NOT NULL,
            repo_url text,
            repo_key text,
            branch text NOT NULL,
            image text,
            kind text NOT NULL,
            allow_unsigned boolean NOT NULL,
            secret_encrypted text,
            registered_at timestamptz NOT NULL,
            deleted_at timestamptz
        );
        CREATE INDEX apps_by_repo ON apps (repo_key) WHERE deleted_at IS NULL;
        CREATE INDEX apps_by_name ON apps (namespace, name) WHERE deleted_at IS NULL;
        CREATE TABLE deploy_hooks (
            hook_id text PRIMARY KEY,
            app_id bigint NOT NULL,
            name text NOT NULL,
            token_hash text NOT NULL UNIQUE,
            token_prefix text NOT NULL,
            created_at timestamptz NOT NULL,
            last_used_at timestamptz,
            deleted_at timestamptz
        );
        CREATE TABLE webhook_tokens (
            app_id bigint PRIMARY KEY,
            token_hash text NOT NULL,
            token_prefix text NOT NULL,
            created_at timestamptz NOT NULL,
            last_used_at timestamptz
        );
        CREATE TABLE seen_deliveries (
            app_id bigint NOT NULL,
            delivery_id text NOT NULL,
            received_at timestamptz NOT NULL,
            PRIMARY KEY (app_id, delivery_id)
        );
        """,
    ),
    (2, "CREATE INDEX seen_deliveries_by_age ON seen_deliveries (received_at);"),
]
TABLES = ("apps", "deploy_hooks", "webhook_tokens", "seen_deliveries")


@dataclass(frozen=True)
class App:
    """What the inbound routes need to know about a live app."""

    id: int
    name: str
    namespace: str
    repo_key: str | None
    branch: str
    image: str | None
    kind: str
    allow_unsigned: bool
    secret_encrypted: str | None
    token_hash: str | None  # the per-app webhook token, when enabled
    seen: bool  # the delivery id asked about was already accepted for this app


_APP_COLUMNS = """a.id, a.name, a.namespace, a.repo_key, a.branch, a.image, a.kind, a.allow_unsigned,
    a.secret_encrypted, w.token_hash,
    EXISTS (SELECT 1 FROM {s}.seen_deliveries d WHERE d.app_id = a.id AND d.delivery_id = %(delivery)s)"""
_APP_FROM = "FROM {s}.apps a LEFT JOIN {s}.webhook_tokens w ON w.app_id = a.id"

# UpdateApp changes the store keeps (the rest of an app's configuration is streams' business).
_UPDATABLE = ("name", "namespace", "repo_url", "branch", "image", "kind", "allow_unsigned")

Apply = Callable[[Any, psycopg.Connection[Any], Envelope], None]


class Store:
    def __init__(self, pool: ConnectionPool, schema: str) -> None:
        self.pool = pool
        self.schema = validate_schema(schema)
        s = f'"{self.schema}"'
        self._s = s
        select = f"SELECT {_APP_COLUMNS} {_APP_FROM}".format(s=s)
        self._by_id = f"{select} WHERE a.id = %(id)s AND a.deleted_at IS NULL"
        self._by_repo = f"{select} WHERE a.repo_key = ANY(%(keys)s) AND a.deleted_at IS NULL ORDER BY a.id"
        self._by_name = (
            f"{select} WHERE a.namespace = %(namespace)s AND a.name = %(name)s AND a.deleted_at IS NULL"
            " ORDER BY a.id DESC LIMIT 1"
        )
        self._by_hook = (
            f"SELECT h.hook_id, h.token_hash, {_APP_COLUMNS} {_APP_FROM} JOIN {s}.deploy_hooks h ON h.app_id = a.id"
            " WHERE h.token_hash = %(hash)s AND h.deleted_at IS NULL AND a.deleted_at IS NULL"
        ).format(s=s)

    def migrate(self) -> None:
        migrate(self.pool, self.schema, MIGRATIONS)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def _autocommit(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in autocommit, for the hot path's single statements: one round trip
        each instead of BEGIN, statement, COMMIT. The shared pool's default is restored on return."""
        with self.pool.connection() as conn:
            conn.autocommit = True
            try:
                yield conn
            finally:
                if not conn.closed:
                    conn.autocommit = False

    # ------------------------------------------------------------------------------- reads

    def _one(self, query: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        if not all(_storable(v) for v in params.values()):
            return None  # a key PostgreSQL cannot even hold matches no row
        with self._autocommit() as conn:
            return conn.execute(query, params).fetchone()  # type: ignore[arg-type]

    def app(self, app_id: int, delivery_id: str = "") -> App | None:
        row = self._one(self._by_id, {"id": app_id, "delivery": delivery_id})
        return App(*row) if row else None

    def apps_by_repo(self, keys: list[str], delivery_id: str) -> list[App]:
        keys = [k for k in keys if storable(k)]
        if not keys:
            return []
        with self._autocommit() as conn:
            rows = conn.execute(self._by_repo, {"keys": keys, "delivery": delivery_id}).fetchall()  # type: ignore[arg-type]
        return [App(*row) for row in rows]

    def app_by_name(self, namespace: str, name: str, delivery_id: str) -> App | None:
        row = self._one(self._by_name, {"namespace": namespace, "name": name, "delivery": delivery_id})
        return App(*row) if row else None

    def hook_by_token(self, token_hash: str, delivery_id: str) -> tuple[str, str, App] | None:
        """(hook id, stored hash, app) of a live deploy hook of a live app."""
        row = self._one(self._by_hook, {"hash": token_hash, "delivery": delivery_id})
        return (row[0], row[1], App(*row[2:])) if row else None

    def deploy_hook_app(self, hook_id: str) -> int | None:
        row = self._one(
            f"SELECT app_id FROM {self._s}.deploy_hooks WHERE hook_id = %(id)s AND deleted_at IS NULL", {"id": hook_id}
        )
        return int(row[0]) if row else None

    def webhook_token(self, app_id: int) -> dict[str, Any] | None:
        row = self._one(
            f"SELECT token_prefix, created_at, last_used_at FROM {self._s}.webhook_tokens WHERE app_id = %(id)s",
            {"id": app_id},
        )
        if row is None:
            return None
        return {"token_prefix": row[0], "created_at": row[1], "last_used_at": row[2]}

    def name_taken(self, conn: psycopg.Connection[Any], namespace: str, name: str, other_than: int | None) -> bool:
        row = conn.execute(
            f"SELECT 1 FROM {self._s}.apps WHERE namespace = %s AND name = %s AND deleted_at IS NULL"  # type: ignore[arg-type]
            " AND id IS DISTINCT FROM %s",
            (namespace, name, other_than),
        ).fetchone()
        return row is not None

    def lock_name(self, conn: psycopg.Connection[Any], namespace: str, name: str) -> None:
        """Serialise concurrent registrations and renames to one (namespace, name)."""
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{self.schema}/{namespace}/{name}",))

    def next_app_id(self, conn: psycopg.Connection[Any]) -> int:
        row = conn.execute(f"SELECT nextval('{self._s}.app_ids')").fetchone()  # type: ignore[arg-type]
        assert row is not None
        return int(row[0])

    # ------------------------------------------------------------------------------ writes

    def record(self, envelopes: list[Envelope]) -> None:
        """Apply acknowledged request records (each handler is one statement, so a single record
        needs no explicit transaction)."""
        if len(envelopes) == 1:
            with self._autocommit() as conn:
                self.apply(conn, envelopes[0])
            return
        with self.transaction() as conn:
            for env in envelopes:
                self.apply(conn, env)

    def prune(self, days: float, batch: int = 10_000) -> int:
        """Forget delivery ids accepted more than ``days`` ago; returns how many.

        Deletes in batches so no statement holds many row locks or runs long next to the hot
        path's inserts. A redelivery older than that is published again and streams, which
        remembers each app's recent deliveries, records it as a duplicate.
        """
        return delete_older(self._autocommit, f"{self._s}.seen_deliveries", "received_at", days, batch)

    def apply(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        handler = HANDLERS.get(type(env.data))
        if handler is not None:
            handler(self, conn, env)

    def _register(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        msg: m.RegisterApp = env.data  # type: ignore[assignment]
        conn.execute(
            f"INSERT INTO {self._s}.apps (id, name, namespace, repo_url, repo_key, branch, image, kind,"  # type: ignore[arg-type]
            " allow_unsigned, secret_encrypted, registered_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::timestamptz)"
            " ON CONFLICT (id) DO NOTHING",
            (
                msg.app_id, msg.name, msg.namespace, msg.repo_url, _repo_key(msg.repo_url), msg.branch, msg.image,
                msg.kind, msg.allow_unsigned, msg.secret_encrypted, env.time,
            ),
        )

    def _update(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        msg: m.UpdateApp = env.data  # type: ignore[assignment]
        changes = {k: v for k, v in msg.changes.items() if k in _UPDATABLE}
        if "repo_url" in changes:
            changes["repo_key"] = _repo_key(changes["repo_url"])
        if not changes:
            return
        assignments = ", ".join(f"{column} = %s" for column in changes)  # columns from the fixed list above
        conn.execute(
            f"UPDATE {self._s}.apps SET {assignments} WHERE id = %s",  # type: ignore[arg-type]
            (*changes.values(), msg.app_id),
        )

    def _delete(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        conn.execute(
            f"UPDATE {self._s}.apps SET deleted_at = %s::timestamptz WHERE id = %s AND deleted_at IS NULL",  # type: ignore[arg-type]
            (env.time, env.data.app_id),
        )

    def _create_hook(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        msg: m.CreateDeployHook = env.data  # type: ignore[assignment]
        conn.execute(
            f"INSERT INTO {self._s}.deploy_hooks (hook_id, app_id, name, token_hash, token_prefix, created_at)"  # type: ignore[arg-type]
            " VALUES (%s, %s, %s, %s, %s, %s::timestamptz) ON CONFLICT DO NOTHING",
            (msg.hook_id, msg.app_id, msg.name, msg.token_hash, msg.token_prefix, env.time),
        )

    def _delete_hook(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        msg: m.DeleteDeployHook = env.data  # type: ignore[assignment]
        conn.execute(
            f"UPDATE {self._s}.deploy_hooks SET deleted_at = %s::timestamptz"  # type: ignore[arg-type]
            " WHERE hook_id = %s AND deleted_at IS NULL",
            (env.time, msg.hook_id),
        )

    def _enable_token(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        msg: m.EnableWebhookToken = env.data  # type: ignore[assignment]
        conn.execute(
            f"INSERT INTO {self._s}.webhook_tokens (app_id, token_hash, token_prefix, created_at)"  # type: ignore[arg-type]
            " VALUES (%s, %s, %s, %s::timestamptz) ON CONFLICT (app_id) DO UPDATE SET"
            " token_hash = EXCLUDED.token_hash, token_prefix = EXCLUDED.token_prefix,"
            " created_at = EXCLUDED.created_at, last_used_at = NULL",
            (msg.app_id, msg.token_hash, msg.token_prefix, env.time),
        )

    def _disable_token(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        conn.execute(f"DELETE FROM {self._s}.webhook_tokens WHERE app_id = %s", (env.data.app_id,))  # type: ignore[arg-type]

    def _delivery(self, conn: psycopg.Connection[Any], env: Envelope) -> None:
        msg: m.DeliveryReceived = env.data  # type: ignore[assignment]
        conn.execute(
            f"WITH seen AS (INSERT INTO {self._s}.seen_deliveries (app_id, delivery_id, received_at)"  # type: ignore[arg-type]
            "  VALUES (%(app)s, %(delivery)s, %(at)s::timestamptz) ON CONFLICT DO NOTHING),"
            f" hook AS (UPDATE {self._s}.deploy_hooks SET last_used_at = %(at)s::timestamptz"
            "  WHERE hook_id = %(hook)s),"
            f" token AS (UPDATE {self._s}.webhook_tokens SET last_used_at = %(at)s::timestamptz"
            "  WHERE app_id = %(app)s AND %(token)s)"
            " SELECT 1",
            {"app": msg.app_id, "delivery": msg.delivery_id, "at": msg.received_at, "hook": msg.hook_id,
             "token": msg.hook_id is None and msg.verification == "token"},
        )

def _storable(value: Any) -> bool:
    return not isinstance(value, str) or storable(value)


def _repo_key(repo_url: str | None) -> str | None:
    return normalise(repo_url) if repo_url else None


HANDLERS: dict[type[m.Message], Apply] = {
    m.RegisterApp: Store._register,
    m.UpdateApp: Store._update,
    m.DeleteApp: Store._delete,
    m.CreateDeployHook: Store._create_hook,
    m.DeleteDeployHook: Store._delete_hook,
    m.EnableWebhookToken: Store._enable_token,
    m.DisableWebhookToken: Store._disable_token,
    m.DeliveryReceived: Store._delivery,
}
