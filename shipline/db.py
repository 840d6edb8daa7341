"""PostgreSQL connection pools and versioned, idempotent schema migrations (psycopg 3).

Each service owns one PostgreSQL schema.  ``make_pool(url, schema="ingress")`` gives connections
whose ``search_path`` is ``ingress, public``; ``migrate(pool, "ingress", MIGRATIONS)`` applies
``[(version, sql), ...]`` once each, recording them in ``ingress.schema_migrations``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

__all__ = ["connect_kwargs", "make_pool", "migrate", "validate_schema"]

# unquoted identifiers only: the same name works in search_path, SQL text and sql.Identifier
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_RE.match(schema) or schema.startswith("pg_"):
        raise ValueError(f"invalid schema name {schema!r}: use lowercase [a-z_][a-z0-9_]*, not pg_*")
    return schema


def connect_kwargs(schema: str | None = None) -> dict[str, Any]:
    """Extra ``psycopg.connect`` kwargs: ``options=-c search_path=<schema>,public`` if a schema is given."""
    if schema is None:
        return {}
    return {"options": f"-c search_path={validate_schema(schema)},public"}


def make_pool(
    url: str,
    schema: str | None = None,
    min_size: int = 1,
    max_size: int = 10,
    *,
    timeout: float = 30.0,
    name: str | None = None,
    configure: Callable[[psycopg.Connection[Any]], None] | None = None,
    **kwargs: Any,
) -> ConnectionPool:
    """An opened ``ConnectionPool`` (waits until ``min_size`` connections are up, or raises).

    ``schema`` sets the connections' ``search_path`` to ``<schema>,public``.  Extra ``kwargs``
    are passed to ``psycopg.connect`` for every connection.
    """
    if isinstance(schema, int):  # guard against make_pool(url, 1, 10) written for an older signature
        raise TypeError("make_pool(url, schema=None, min_size=1, max_size=10): pass sizes by keyword")
    conn_kwargs = {**connect_kwargs(schema), **kwargs}
    pool: ConnectionPool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        kwargs=conn_kwargs,
        configure=configure,
        name=name or (f"shipline-{schema}" if schema else "shipline"),
        timeout=timeout,
        open=False,
    )
    try:
        pool.open(wait=True, timeout=timeout)
    except BaseException:
        pool.close()
        raise
    return pool


def _lock(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))


def migrate(pool: ConnectionPool, schema: str, migrations: Sequence[tuple[int, str]]) -> list[int]:
    """Apply versioned SQL migrations to ``schema`` idempotently; return the versions applied now.

    Every transaction first takes ``pg_advisory_xact_lock(hashtext(schema))``, so processes
    migrating the same schema concurrently serialise: one applies a version, the others then see
    its row and skip it.  Each migration runs in its own transaction together with its
    ``<schema>.schema_migrations`` row, with ``search_path`` set to ``<schema>, public`` so
    unqualified names land in the schema.  The SQL may hold several statements (no parameters).
    """
    validate_schema(schema)
    versions = [v for v, _ in migrations]
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in versions):
        raise ValueError(f"migration versions must be positive ints: {versions}")
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions: {versions}")

    ident = sql.Identifier(schema)
    table = sql.Identifier(schema, "schema_migrations")
    applied_now: list[int] = []
    with pool.connection() as conn:
        with conn.transaction():
            _lock(conn, schema)
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} ("
                    " version integer PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(table)
            )
        for version, text in sorted(migrations, key=lambda m: m[0]):
            with conn.transaction():
                _lock(conn, schema)
                done = conn.execute(sql.SQL("SELECT 1 FROM {} WHERE version = %s").format(table), (version,)).fetchone()
                if done:
                    continue
                conn.execute("SELECT set_config('search_path', %s, true)", (f"{schema}, public",))
                conn.execute(text)  # type: ignore[arg-type]  # trusted, static migration SQL
                conn.execute(sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(table), (version,))
            log.info("migrated %s to version %d", schema, version)
            applied_now.append(version)
    return applied_now


def delete_older(
    connection: Callable[[], AbstractContextManager[psycopg.Connection[Any]]],
    table: str,
    column: str,
    days: float,
    batch: int = 10_000,
) -> int:
    """Delete ``table``'s rows whose ``column`` is more than ``days`` old; returns how many.

    ``table`` is schema-qualified and, like ``column``, comes from code, never from input. Each
    batch of at most ``batch`` rows is its own short transaction (``connection()``'s block commits:
    autocommit, or a pool's connection), so a large backlog never holds many row locks or runs
    long next to the hot path's inserts.
    """
    removed = 0
    while True:
        with connection() as conn:
            cur = conn.execute(
                f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table}"  # type: ignore[arg-type]
                f" WHERE {column} < now() - make_interval(secs => %s) LIMIT %s))",
                (days * 86400, batch),
            )
        removed += cur.rowcount
        if cur.rowcount < batch:
            return removed
