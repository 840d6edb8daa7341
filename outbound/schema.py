"""The outbound schema: subscriptions, the delivery outbox, the attempt log, and small caches.

The caches that grow by a row per push and per build (``pushes``, ``builds``) are pruned after
``SHIPLINE_OUTBOUND_KEEP_DAYS`` by ``outbound.retention``; ``apps`` has a row per app and is kept.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE subscriptions (
    id text PRIMARY KEY,
    app_id bigint NOT NULL,
    url text NOT NULL,
    events text[] NOT NULL,
    description text NOT NULL DEFAULT '',
    secret_encrypted text NOT NULL,
    previous_secret_encrypted text,
    previous_secret_expires_at timestamptz,
    enabled boolean NOT NULL DEFAULT true,
    disabled_reason text,
    disabled_at timestamptz,
    disable_reported boolean NOT NULL DEFAULT true,
    failing_since timestamptz,
    deleted_at timestamptz,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    event_id text NOT NULL
);
CREATE INDEX subscriptions_app ON subscriptions (app_id);

CREATE TABLE deliveries (
    id uuid PRIMARY KEY,
    subscription_id text NOT NULL,
    app_id bigint NOT NULL,
    event_id text NOT NULL,
    event_type text NOT NULL,
    event_name text NOT NULL,
    event_sequence bigint,
    event_time timestamptz NOT NULL,
    payload bytea NOT NULL,
    seq bigserial NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    round integer NOT NULL DEFAULT 0,
    tries integer NOT NULL DEFAULT 0,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL,
    last_attempt_at timestamptz,
    last_status integer,
    last_error text,
    delivered_at timestamptz,
    failed_at timestamptz,
    origin text NOT NULL DEFAULT 'live',
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (subscription_id, event_id)
);
CREATE INDEX deliveries_lane ON deliveries (subscription_id, app_id, event_sequence, seq)
    WHERE status = 'pending';
CREATE INDEX deliveries_listing ON deliveries (subscription_id, seq DESC);
CREATE INDEX deliveries_failed ON deliveries (subscription_id, failed_at) WHERE status = 'failed';

CREATE TABLE attempts (
    id bigserial PRIMARY KEY,
    delivery_id uuid NOT NULL,
    subscription_id text NOT NULL,
    attempt integer NOT NULL,
    round integer NOT NULL,
    started_at timestamptz NOT NULL,
    duration_ms double precision NOT NULL,
    status_code integer,
    error text,
    response_body text,
    outcome text NOT NULL,
    next_attempt_at timestamptz,
    delay double precision
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);

CREATE TABLE consumed (
    topic text NOT NULL,
    partition integer NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);

CREATE TABLE apps (
    app_id bigint PRIMARY KEY,
    name text,
    namespace text,
    repo_url text,
    build jsonb
);

CREATE TABLE pushes (
    delivery_id text PRIMARY KEY,
    app_id bigint NOT NULL,
    repository jsonb,
    author jsonb,
    seen_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE builds (
    app_id bigint NOT NULL,
    build integer NOT NULL,
    commit text NOT NULL,
    message text NOT NULL,
    author text NOT NULL,
    ref text NOT NULL,
    repo_url text NOT NULL,
    delivery_id text NOT NULL,
    queued_at text NOT NULL,
    PRIMARY KEY (app_id, build)
);

CREATE TABLE replays (
    id uuid PRIMARY KEY,
    subscription_id text NOT NULL,
    since_time timestamptz,
    since_sequence bigint,
    status text NOT NULL DEFAULT 'pending',
    requested_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    scanned bigint NOT NULL DEFAULT 0,
    queued bigint NOT NULL DEFAULT 0,
    error text
);
""",
    ),
    # pushes and builds are only joined into build_finish payloads, so they are kept for
    # SHIPLINE_OUTBOUND_KEEP_DAYS (outbound.retention). builds had no timestamp: rows that exist when
    # this runs get the migration's time, so they go a full keep period after the upgrade (no
    # backfill from queued_at: a text column, and one long UPDATE over a large table).
    (
        2,
        """
ALTER TABLE builds ADD COLUMN seen_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX pushes_by_age ON pushes (seen_at);
CREATE INDEX builds_by_age ON builds (seen_at);
""",
    ),
]
