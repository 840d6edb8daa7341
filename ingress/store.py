"""The ingress's credentials store: a cache of the request records it published, in PostgreSQL.

Schema ``<SHIPLINE_DB_SCHEMA>_ingress`` holds what verification needs and nothing else: the apps'
routing fields and Fernet-encrypted GitHub secrets, deploy-hook and webhook-token SHA-256 hashes,
and the delivery ids already accepted. Every row is written *after* Kafka acknowledged the
request record it comes from, by the same ``apply`` that ``ingress.rebuild.rebuild_store`` uses
to fold the inbound topic, so the store can always be rebuilt from the log. Only the app id
sequence is not in the log as such; a rebuild moves it past the highest app id folded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
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
    (
        3,
        # Every committed change to what verification reads bumps one counter in the same
        # transaction, so a process holding a snapshot (ingress.credentials) learns of it with one
        # cheap poll. It starts from the clock so a dropped and re-created schema never repeats a
        # generation an old snapshot holds; last_used_at updates are not changes.
        """
        CREATE TABLE credentials_generation (n bigint NOT NULL);
        INSERT INTO credentials_generation VALUES ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
        CREATE FUNCTION bump_credentials_generation() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            EXECUTE format('UPDATE %I.credentials_generation SET n = n + 1', TG_TABLE_SCHEMA);
            RETURN NULL;
        END $$;
        CREATE TRIGGER apps_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON apps
            FOR EACH STATEMENT EXECUTE FUNCTION bump_credentials_generation();
        CREATE TRIGGER deploy_hooks_changed
            AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF app_id, token_hash, deleted_at ON deploy_hooks
            FOR EACH STATEMENT EXECUTE FUNCTION bump_credentials_generation();
        CREATE TRIGGER webhook_tokens_changed
            AFTER INSERT OR DELETE OR TRUNCATE OR UPDATE OF app_id, token_hash ON webhook_tokens
            FOR EACH STATEMENT EXECUTE FUNCTION bump_credentials_generation();
        """,
    ),
    # Who this store is: a host's index of accepted deliveries (ingress.local_index) belongs to
    # one store, and a dropped and re-created schema, whose app ids start again at 1, is another.
    (4, "CREATE TABLE identity (id text NOT NULL); INSERT INTO identity VALUES (gen_random_uuid()::text);"),
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
    seen: bool = False  # the delivery id asked about was already accepted for this app


_APP_FIELDS = """a.id, a.name, a.namespace, a.repo_key, a.branch, a.image, a.kind, a.allow_unsigned,
    a.secret_encrypted, w.token_hash"""
_APP_FROM = "FROM {s}.apps a LEFT JOIN {s}.webhook_tokens w ON w.app_id = a.id"

# UpdateApp changes the store keeps (the rest of an app's configuration is streams' business).
_UPDATABLE = ("name", "namespace", "repo_url", "branch", "image", "kind", "allow_unsigned")

Apply = Callable[[Any, psycopg.Connection[Any], Envelope], None]


# Request records that change what verification reads (the rest only note deliveries).
CREDENTIALS = frozenset({m.RegisterApp, m.UpdateApp, m.DeleteApp, m.CreateDeployHook, m.DeleteDeployHook,
                         m.EnableWebhookToken, m.DisableWebhookToken})


@dataclass(frozen=True)
class Snapshot:
    """Every live app, webhook token and deploy hook, read in one consistent view."""

    generation: int
    apps: list[App]
    hooks: list[tuple[str, str, int]]  # (hook id, token hash, app id)


class Store:
    def __init__(self, pool: ConnectionPool, schema: str, on_change: Callable[[], None] | None = None) -> None:
        """``on_change`` runs after each commit that applied a credentials change (``CREDENTIALS``):
        the ingress bumps its host's generation there (``ingress.local_index``)."""
        self.pool = pool
        self.on_change = on_change
        self._changed = threading.local()
        self.schema = validate_schema(schema)
        s = f'"{self.schema}"'
        self._s = s
        self._by_id = (
            f"SELECT {_APP_FIELDS}, false {_APP_FROM} WHERE a.id = %(id)s AND a.deleted_at IS NULL".format(s=s)
        )

    def migrate(self) -> None:
        migrate(self.pool, self.schema, MIGRATIONS)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        self._changed.value = False
        with self.pool.connection() as conn, conn.transaction():
            yield conn
        self._committed()

    def _committed(self) -> None:
        if getattr(self._changed, "value", False):
            self._changed.value = False
            if self.on_change is not None:
                self.on_change()

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

    def snapshot(self) -> Snapshot:
        s = self._s
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = conn.execute(f"SELECT n FROM {s}.credentials_generation").fetchone()  # type: ignore[arg-type]
            apps = conn.execute(
                f"SELECT {_APP_FIELDS}, false {_APP_FROM}"  # type: ignore[arg-type]
                " WHERE a.deleted_at IS NULL ORDER BY a.id".format(s=s)
            ).fetchall()
            hooks = conn.execute(
                f"SELECT hook_id, token_hash, app_id FROM {s}.deploy_hooks WHERE deleted_at IS NULL"  # type: ignore[arg-type]
            ).fetchall()
        assert row is not None
        return Snapshot(int(row[0]), [App(*r) for r in apps], [(h, t, int(a)) for h, t, a in hooks])

    def generation(self) -> int:
        with self._autocommit() as conn:
            row = conn.execute(f"SELECT n FROM {self._s}.credentials_generation").fetchone()  # type: ignore[arg-type]
        assert row is not None
        return int(row[0])

    def identity(self) -> str:
        with self._autocommit() as conn:
            row = conn.execute(f"SELECT id FROM {self._s}.identity").fetchone()  # type: ignore[arg-type]
        assert row is not None
        return str(row[0])

    def seen_since(self, since: datetime) -> Iterator[tuple[int, str, datetime]]:
        """Every delivery id accepted since ``since`` (to fill a host's new local index)."""
        with self.pool.connection() as conn, conn.cursor(name="seen_since") as cur:
            cur.execute(
                f"SELECT app_id, delivery_id, received_at FROM {self._s}.seen_deliveries"  # type: ignore[arg-type]
                " WHERE received_at >= %s",
                (since,),
            )
            for app_id, delivery_id, at in cur:
                yield int(app_id), delivery_id, at
            conn.commit()

    def app(self, app_id: int) -> App | None:
        """A live app, read from the database (the management API's checks; webhooks read the
        snapshot, ``ingress.credentials``)."""
        row = self._one(self._by_id, {"id": app_id})
        return App(*row) if row else None

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
            self._changed.value = False
            with self._autocommit() as conn:
                self.apply(conn, envelopes[0])
            self._committed()
            return
        with self.transaction() as conn:
            for env in envelopes:
                self.apply(conn, env)

    def note_deliveries(self, rows: list[tuple[int, str, str, str | None, bool]]) -> None:
        """Note accepted deliveries in one transaction: (app id, delivery id, received at, deploy hook
        id, used the app's webhook token). ``ingress.notes`` calls it with batches."""
        s = self._s
        rows = [r for r in rows if storable(r[1])]  # ingress.deliveries admits printable ids only
        if not rows:
            return
        apps, ids, times = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        hooks: dict[str, str] = {}
        tokens: dict[int, str] = {}
        for app_id, _, at, hook_id, token in rows:
            if hook_id is not None:
                hooks[hook_id] = max(at, hooks.get(hook_id, at))
            if token:
                tokens[app_id] = max(at, tokens.get(app_id, at))
        with self.pool.connection() as conn, conn.transaction():
            conn.execute(
                f"INSERT INTO {s}.seen_deliveries (app_id, delivery_id, received_at)"  # type: ignore[arg-type]
                " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::timestamptz[]) ON CONFLICT DO NOTHING",
                (apps, ids, times),
            )
            if hooks:
                conn.execute(
                    f"UPDATE {s}.deploy_hooks h SET last_used_at = GREATEST(h.last_used_at, u.at)"  # type: ignore[arg-type]
                    " FROM unnest(%s::text[], %s::timestamptz[]) AS u(hook_id, at) WHERE h.hook_id = u.hook_id",
                    (list(hooks), list(hooks.values())),
                )
            if tokens:
                conn.execute(
                    f"UPDATE {s}.webhook_tokens w SET last_used_at = GREATEST(w.last_used_at, u.at)"  # type: ignore[arg-type]
                    " FROM unnest(%s::bigint[], %s::timestamptz[]) AS u(app_id, at) WHERE w.app_id = u.app_id",
                    (list(tokens), list(tokens.values())),
                )

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
        if type(env.data) in CREDENTIALS:
            self._changed.value = True

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
