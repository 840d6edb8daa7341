"""The projection tables: versioned migrations, the table list, and an ordered content checksum.

Every row here is a pure function of the events log: no column defaults to ``now()``, no serial
ids (partitions interleave differently on every replay), so a rebuild from offset 0 produces
byte-identical tables and ``checksum`` can prove it.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg

from shipline.db import validate_schema

# table -> its primary key
TABLES: dict[str, str] = {
    "apps": "app_id",
    "deploy_hooks": "hook_id",
    "builds": "app_id, number",
    "releases": "app_id, revision",
    "deliveries": "delivery_id, app_id",
    "jobs": "app_id, job",
    "subscriptions": "subscription_id",
    "audit": "event_id",
    "offsets": "topic, partition",
}

V1 = """
CREATE TABLE apps (
    app_id bigint PRIMARY KEY,
    name text NOT NULL,
    namespace text NOT NULL,
    repo_url text,
    branch text,
    image text,
    kind text,
    strategy text,
    command text,
    port integer,
    health_path text,
    build jsonb,
    allow_unsigned boolean NOT NULL DEFAULT false,
    extra jsonb NOT NULL DEFAULT '{}',
    url text,
    current_revision integer,
    webhook_enabled boolean NOT NULL DEFAULT false,
    webhook_token_hash text,
    webhook_token_prefix text,
    webhook_enabled_at timestamptz,
    webhook_last_used_at timestamptz,
    created_by text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    deleted_at timestamptz
);
CREATE INDEX apps_name ON apps (name);

CREATE TABLE deploy_hooks (
    hook_id text PRIMARY KEY,
    app_id bigint NOT NULL,
    name text NOT NULL,
    token_hash text NOT NULL,
    token_prefix text NOT NULL,
    created_at timestamptz NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    deleted_at timestamptz
);
CREATE INDEX deploy_hooks_app ON deploy_hooks (app_id);

CREATE TABLE builds (
    app_id bigint NOT NULL,
    number integer NOT NULL,
    status text NOT NULL,
    commit_sha text,
    commit_message text,
    commit_author text,
    ref text,
    repo_url text,
    delivery_id text,
    queued_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    duration double precision,
    exit_code integer,
    image text,
    image_id text,
    tags jsonb,
    log text,
    log_path text,
    correlation_id text,
    PRIMARY KEY (app_id, number)
);
CREATE INDEX builds_correlation ON builds (correlation_id);

CREATE TABLE releases (
    app_id bigint NOT NULL,
    revision integer NOT NULL,
    status text NOT NULL,
    image text,
    commit_sha text,
    trigger text,
    build integer,
    cause text,
    requested_by text,
    requested_at timestamptz,
    started_at timestamptz,
    finished_at timestamptz,
    duration double precision,
    instances jsonb,
    url text,
    log_path text,
    superseded_by integer,
    failed_step text,
    failure_reason text,
    current boolean NOT NULL DEFAULT false,
    live_from timestamptz,
    live_until timestamptz,
    correlation_id text,
    PRIMARY KEY (app_id, revision)
);
CREATE UNIQUE INDEX releases_current ON releases (app_id) WHERE current;
CREATE INDEX releases_live ON releases (app_id, live_from) WHERE live_from IS NOT NULL;
CREATE INDEX releases_correlation ON releases (correlation_id);

CREATE TABLE deliveries (
    delivery_id text NOT NULL,
    app_id bigint NOT NULL,
    source text NOT NULL,
    route text NOT NULL,
    event text NOT NULL,
    verification text NOT NULL,
    received_at timestamptz NOT NULL,
    outcome text NOT NULL,
    reason text NOT NULL,
    headers jsonb NOT NULL,
    body text NOT NULL,
    body_encoding text NOT NULL,
    duplicates integer NOT NULL DEFAULT 0,
    last_duplicate_at timestamptz,
    event_id text NOT NULL,
    correlation_id text NOT NULL,
    PRIMARY KEY (delivery_id, app_id)
);
CREATE INDEX deliveries_received ON deliveries (received_at DESC, delivery_id DESC);
CREATE INDEX deliveries_app ON deliveries (app_id, received_at DESC, delivery_id DESC);
CREATE INDEX deliveries_correlation ON deliveries (correlation_id);

CREATE TABLE jobs (
    app_id bigint NOT NULL,
    job integer NOT NULL,
    status text NOT NULL,
    image text,
    env jsonb,
    cause text,
    exit_code integer,
    log text,
    duration double precision,
    requested_at timestamptz,
    finished_at timestamptz,
    correlation_id text,
    PRIMARY KEY (app_id, job)
);
CREATE INDEX jobs_correlation ON jobs (correlation_id);

CREATE TABLE subscriptions (
    subscription_id text PRIMARY KEY,
    app_id bigint NOT NULL,
    url text NOT NULL,
    events jsonb NOT NULL,
    description text NOT NULL,
    status text NOT NULL,
    disabled_reason text,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE INDEX subscriptions_app ON subscriptions (app_id);

CREATE TABLE audit (
    event_id text PRIMARY KEY,
    type text NOT NULL,
    app_id bigint NOT NULL,
    time timestamptz NOT NULL,
    sequence bigint,
    correlation_id text NOT NULL,
    causation_id text NOT NULL,
    source text NOT NULL,
    data jsonb NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL
);
CREATE INDEX audit_correlation ON audit (correlation_id);
CREATE INDEX audit_app ON audit (app_id, time);

CREATE TABLE offsets (
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""

# 2: when a deploy hook's token was last used (folded from delivery.accepted's hook_id)
MIGRATIONS: list[tuple[int, str]] = [(1, V1), (2, "ALTER TABLE deploy_hooks ADD COLUMN last_used_at timestamptz;")]


def checksum(conn: psycopg.Connection[Any], schema: str, *, offsets: bool = True) -> dict[str, str]:
    """A content hash per table, plus ``"*"`` over all of them.

    Two schemas are equal exactly when every table holds the same rows (see ``table_checksum``).
    ``offsets=False`` leaves the consumed positions out (useful to compare a projection that is
    ahead in the log only by records it skipped).
    """
    return combine({t: table_checksum(conn, schema, t) for t in TABLES if offsets or t != "offsets"})


def table_checksum(conn: psycopg.Connection[Any], schema: str, table: str) -> str:
    """``count:sum`` over the table's rows of the first 64 bits of the md5 of each row's text form.

    Every table has a primary key, so its rows form a set, and a sum needs no sort: hashing rows
    in key order cost a sort of the whole table (most of a rebuild's checksum time on ``audit``).
    """
    validate_schema(schema)
    if table not in TABLES:
        raise ValueError(f"not a projection table: {table}")
    with conn.transaction():
        # a row's text form depends on these settings: pin them so both sides print alike
        conn.execute("SET LOCAL TimeZone = 'UTC'")
        conn.execute("SET LOCAL extra_float_digits = 3")
        row = conn.execute(
            "SELECT count(*), coalesce(sum(('x' || left(md5(t::text), 16))::bit(64)::bigint::numeric), 0)"  # noqa: S608
            f" FROM {schema}.{table} t"
        ).fetchone()
    assert row is not None
    return f"{row[0]}:{row[1]}"


def combine(tables: dict[str, str]) -> dict[str, str]:
    """The per-table checksums with ``"*"``, the hash of them all, added."""
    out = {t: tables[t] for t in TABLES if t in tables}
    out["*"] = hashlib.sha256("\n".join(f"{k}={v}" for k, v in out.items()).encode()).hexdigest()
    return out
