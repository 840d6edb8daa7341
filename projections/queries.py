"""Read-side queries over the projection tables, returning JSON-ready dicts.

Every function takes a connection and the projections schema name (validated, so it is safe
to place in SQL text) and qualifies table names with it; the web pool has no search_path.
The console and the CLI's API share these shapes.
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

Conn = psycopg.Connection[Any]


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, (bytes, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _rows(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, params).fetchall()  # type: ignore[arg-type]


def _one(conn: Conn, query: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
    rows = _rows(conn, query, params)
    return rows[0] if rows else None


# ------------------------------------------------------------------------------------- apps


def app_dict(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["app_id"],
        "name": r["name"],
        "namespace": r["namespace"],
        "repo_url": r["repo_url"],
        "branch": r["branch"],
        "image": r["image"],
        "kind": r["kind"],
        "strategy": r["strategy"],
        "command": r["command"],
        "port": r["port"],
        "health_path": r["health_path"],
        "build": r["build"],
        "allow_unsigned": r["allow_unsigned"],
        "url": r["url"],
        "current_revision": r["current_revision"],
        "webhook": {
            "enabled": r["webhook_enabled"],
            "token_prefix": r["webhook_token_prefix"],
            "created_at": iso(r["webhook_enabled_at"]),
            "last_used_at": iso(r["webhook_last_used_at"]),
        },
        "created_by": r["created_by"],
        "created_at": iso(r["created_at"]),
        "updated_at": iso(r["updated_at"]),
        "deleted": r["deleted"],
        "deleted_at": iso(r["deleted_at"]),
        "extra": r["extra"],
    }


def list_apps(conn: Conn, schema: str, *, include_deleted: bool = False) -> list[dict[str, Any]]:
    where = "" if include_deleted else " WHERE NOT deleted"
    return [app_dict(r) for r in _rows(conn, f"SELECT * FROM {schema}.apps{where} ORDER BY app_id")]


def get_app(conn: Conn, schema: str, app_id: int) -> dict[str, Any] | None:
    r = _one(conn, f"SELECT * FROM {schema}.apps WHERE app_id = %s", (app_id,))
    return None if r is None else app_dict(r)


def deploy_hooks(conn: Conn, schema: str, app_id: int) -> list[dict[str, Any]]:
    rows = _rows(
        conn,
        f"SELECT hook_id, name, token_prefix, created_at, last_used_at, deleted, deleted_at FROM {schema}.deploy_hooks"
        " WHERE app_id = %s ORDER BY created_at, hook_id",
        (app_id,),
    )
    return [
        {"id": r["hook_id"], "name": r["name"], "token_prefix": r["token_prefix"], "created_at": iso(r["created_at"]),
         "last_used_at": iso(r["last_used_at"]), "deleted": r["deleted"], "deleted_at": iso(r["deleted_at"])}
        for r in rows
    ]


# --------------------------------------------------------------------------------- releases


def release_dict(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "revision": r["revision"],
        "image": r["image"],
        "commit": r["commit_sha"],
        "trigger": r["trigger"],
        "created_at": iso(r["requested_at"] or r["finished_at"]),
        "status": r["status"],
        "current": r["current"],
        "build": r["build"],
        "requested_by": r["requested_by"] or None,
        "cause": r["cause"] or None,
        "started_at": iso(r["started_at"]),
        "finished_at": iso(r["finished_at"]),
        "duration": r["duration"],
        "url": r["url"],
        "instances": r["instances"],
        "superseded_by": r["superseded_by"],
        "failure": None if r["failed_step"] is None else {"step": r["failed_step"], "reason": r["failure_reason"]},
        "live_from": iso(r["live_from"]),
        "live_until": iso(r["live_until"]),
        "correlation_id": r["correlation_id"],
    }


def history(conn: Conn, schema: str, app_id: int, *, limit: int, before: int | None) -> list[dict[str, Any]]:
    """Releases newest first; ``before`` is an exclusive revision cursor."""
    rows = _rows(
        conn,
        f"SELECT * FROM {schema}.releases WHERE app_id = %s AND revision < %s ORDER BY revision DESC LIMIT %s",
        (app_id, before if before is not None else 2**31 - 1, limit),
    )
    return [release_dict(r) for r in rows]


def live_at(conn: Conn, schema: str, app_id: int, at: datetime) -> dict[str, Any]:
    """The release that was live for ``app_id`` at ``at``, and what caused it (delivery, build, person)."""
    r = _one(
        conn,
        f"SELECT * FROM {schema}.releases WHERE app_id = %s AND live_from <= %s"
        " AND (live_until IS NULL OR live_until > %s) ORDER BY live_from DESC LIMIT 1",
        (app_id, at, at),
    )
    out: dict[str, Any] = {"app_id": app_id, "at": iso(at), "release": None, "caused_by": None}
    if r is None:
        return out
    out["release"] = release_dict(r)
    out["caused_by"] = _cause(conn, schema, r)
    return out


def _cause(conn: Conn, schema: str, release: dict[str, Any]) -> dict[str, Any]:
    delivery = _one(
        conn,
        f"SELECT * FROM {schema}.deliveries WHERE app_id = %s AND (delivery_id = %s OR correlation_id = %s)"
        " ORDER BY received_at, delivery_id LIMIT 1",
        (release["app_id"], release["cause"] or release["correlation_id"], release["correlation_id"]),
    )
    build = None
    if release["build"] is not None:
        build = _one(
            conn,
            f"SELECT * FROM {schema}.builds WHERE app_id = %s AND number = %s",
            (release["app_id"], release["build"]),
        )
    person = release["requested_by"] or None
    if not person and delivery is not None:
        person = _pusher(delivery)
    if not person and build is not None:
        person = build["commit_author"]
    return {
        "trigger": release["trigger"],
        "person": person,
        "requested_by": release["requested_by"] or None,
        "request_id": None if delivery is not None else (release["cause"] or release["correlation_id"]),
        "correlation_id": release["correlation_id"],
        "delivery": None if delivery is None else delivery_dict(delivery),
        "build": None if build is None else build_dict(build),
    }


def _pusher(delivery: dict[str, Any]) -> str | None:
    """Who pushed, from a GitHub push body (``pusher.name``, else ``sender.login``)."""
    if delivery["body_encoding"] != "utf8" or not delivery["body"].startswith("{"):
        return None
    try:
        body = json.loads(delivery["body"])
    except ValueError:
        return None
    for outer, inner in (("pusher", "name"), ("sender", "login")):
        value = body.get(outer)
        if isinstance(value, dict) and isinstance(value.get(inner), str):
            return value[inner]  # type: ignore[no-any-return]
    return None


# ----------------------------------------------------------------------------------- builds


def build_id(app_id: int, number: int) -> str:
    return f"{app_id}-{number}"


def parse_build_id(text: str) -> tuple[int, int] | None:
    app, sep, number = text.partition("-")
    if not sep or not app.isdigit() or not number.isdigit():
        return None
    return int(app), int(number)


def build_dict(r: dict[str, Any], *, log: bool = False) -> dict[str, Any]:
    out = {
        "id": build_id(r["app_id"], r["number"]),
        "app_id": r["app_id"],
        "number": r["number"],
        "status": r["status"],
        "commit": {"sha": r["commit_sha"], "message": r["commit_message"], "author": r["commit_author"]},
        "ref": r["ref"],
        "repo_url": r["repo_url"],
        "delivery_id": r["delivery_id"],
        "queued_at": iso(r["queued_at"]),
        "started_at": iso(r["started_at"]),
        "finished_at": iso(r["finished_at"]),
        "duration": r["duration"],
        "exit_code": r["exit_code"],
        "image": r["image"],
        "image_id": r["image_id"],
        "tags": r["tags"],
        "log_path": r["log_path"],
        "correlation_id": r["correlation_id"],
    }
    if log:
        out["log"] = r["log"]
    return out


BUILD_LIST_COLUMNS = (
    "app_id, number, status, commit_sha, commit_message, commit_author, ref, repo_url, delivery_id, queued_at,"
    " started_at, finished_at, duration, exit_code, image, image_id, tags, log_path, correlation_id"
)


def builds(conn: Conn, schema: str, app_id: int, *, limit: int, before: int | None) -> list[dict[str, Any]]:
    rows = _rows(
        conn,
        f"SELECT {BUILD_LIST_COLUMNS} FROM {schema}.builds WHERE app_id = %s AND number < %s"
        " ORDER BY number DESC LIMIT %s",
        (app_id, before if before is not None else 2**31 - 1, limit),
    )
    return [build_dict(r) for r in rows]


def get_build(conn: Conn, schema: str, app_id: int, number: int) -> dict[str, Any] | None:
    r = _one(conn, f"SELECT * FROM {schema}.builds WHERE app_id = %s AND number = %s", (app_id, number))
    return None if r is None else build_dict(r, log=True)


# ------------------------------------------------------------------------------- deliveries


def delivery_dict(r: dict[str, Any], *, body: bool = False) -> dict[str, Any]:
    out = {
        "delivery_id": r["delivery_id"],
        "app_id": r["app_id"],
        "source": r["source"],
        "route": r["route"],
        "event": r["event"],
        "verification": r["verification"],
        "received_at": iso(r["received_at"]),
        "outcome": r["outcome"],
        "reason": r["reason"],
        "headers": r["headers"],
        "duplicates": r["duplicates"],
        "last_duplicate_at": iso(r["last_duplicate_at"]),
        "event_id": r["event_id"],
        "correlation_id": r["correlation_id"],
    }
    if "caused_builds" in r:
        out["caused"] = {"builds": r["caused_builds"], "releases": r["caused_releases"], "jobs": r["caused_jobs"]}
    if body:
        out["body"] = r["body"]
        out["body_encoding"] = r["body_encoding"]
    return out


def _caused(schema: str) -> str:
    """Columns listing what a delivery row caused in its own app, linked by correlation id."""
    return (
        f", ARRAY(SELECT number FROM {schema}.builds b WHERE b.correlation_id = d.correlation_id"
        " AND b.app_id = d.app_id ORDER BY number) AS caused_builds"
        f", ARRAY(SELECT revision FROM {schema}.releases r WHERE r.correlation_id = d.correlation_id"
        " AND r.app_id = d.app_id ORDER BY revision) AS caused_releases"
        f", ARRAY(SELECT job FROM {schema}.jobs j WHERE j.correlation_id = d.correlation_id"
        " AND j.app_id = d.app_id ORDER BY job) AS caused_jobs"
    )


def deliveries(
    conn: Conn,
    schema: str,
    *,
    app_id: int | None,
    outcome: str | None,
    limit: int,
    before: datetime | None,
) -> list[dict[str, Any]]:
    """Inbound deliveries newest first; ``before`` is an exclusive ``received_at`` cursor."""
    conds: list[str] = []
    params: list[Any] = []
    if app_id is not None:
        conds.append("d.app_id = %s")
        params.append(app_id)
    if outcome is not None:
        conds.append("d.outcome = %s")
        params.append(outcome)
    if before is not None:
        conds.append("d.received_at < %s")
        params.append(before)
    where = (" WHERE " + " AND ".join(conds)) if conds else ""
    rows = _rows(
        conn,
        f"SELECT d.*{_caused(schema)} FROM {schema}.deliveries d{where}"
        " ORDER BY d.received_at DESC, d.delivery_id DESC LIMIT %s",
        (*params, limit),
    )
    return [delivery_dict(r) for r in rows]


def get_delivery(conn: Conn, schema: str, delivery_id: str) -> list[dict[str, Any]]:
    """Every app's row for one delivery id (one push may reach several apps), with the raw body."""
    rows = _rows(
        conn,
        f"SELECT d.*{_caused(schema)} FROM {schema}.deliveries d WHERE d.delivery_id = %s ORDER BY d.app_id",
        (delivery_id,),
    )
    return [delivery_dict(r, body=True) for r in rows]


# ------------------------------------------------------------------------------------ audit


def audit_dict(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["event_id"],
        "type": r["type"],
        "app_id": r["app_id"],
        "time": iso(r["time"]),
        "sequence": r["sequence"],
        "correlation_id": r["correlation_id"],
        "causation_id": r["causation_id"],
        "source": r["source"],
        "data": r["data"],
        "position": {"topic": r["topic"], "partition": r["partition"], "offset": r["offset"]},
    }


def audit_events(conn: Conn, schema: str, *, app_id: int, limit: int, before: datetime | None) -> list[dict[str, Any]]:
    rows = _rows(
        conn,
        f"SELECT * FROM {schema}.audit WHERE app_id = %s AND time < %s ORDER BY time DESC, sequence DESC LIMIT %s",
        (app_id, before or datetime.max.replace(tzinfo=UTC), limit),
    )
    return [audit_dict(r) for r in rows]


def resolve_correlation(conn: Conn, schema: str, ident: str) -> str:
    """A correlation id as given, or the one of the delivery whose id this is."""
    if _one(conn, f"SELECT 1 AS x FROM {schema}.audit WHERE correlation_id = %s LIMIT 1", (ident,)):
        return ident
    r = _one(conn, f"SELECT correlation_id FROM {schema}.deliveries WHERE delivery_id = %s LIMIT 1", (ident,))
    return ident if r is None else str(r["correlation_id"])


def chain(conn: Conn, schema: str, correlation_id: str, *, outbound_schema: str | None) -> dict[str, Any]:
    """The causal chain of one correlation id: delivery -> events -> builds -> releases -> outbound."""
    events = [
        audit_dict(r)
        for r in _rows(
            conn,
            f"SELECT * FROM {schema}.audit WHERE correlation_id = %s ORDER BY time, app_id, sequence, event_id",
            (correlation_id,),
        )
    ]
    found = [
        delivery_dict(r, body=True)
        for r in _rows(
            conn,
            f"SELECT d.*{_caused(schema)} FROM {schema}.deliveries d WHERE d.correlation_id = %s"
            " ORDER BY d.received_at, d.app_id",
            (correlation_id,),
        )
    ]
    build_rows = _rows(
        conn,
        f"SELECT {BUILD_LIST_COLUMNS} FROM {schema}.builds WHERE correlation_id = %s ORDER BY app_id, number",
        (correlation_id,),
    )
    release_rows = _rows(
        conn,
        f"SELECT * FROM {schema}.releases WHERE correlation_id = %s ORDER BY app_id, revision",
        (correlation_id,),
    )
    job_rows = _rows(
        conn,
        f"SELECT app_id, job, status, image, cause, exit_code, duration, requested_at, finished_at"
        f" FROM {schema}.jobs WHERE correlation_id = %s ORDER BY app_id, job",
        (correlation_id,),
    )
    return {
        "correlation_id": correlation_id,
        "deliveries": found,
        "events": events,
        "builds": [build_dict(r) for r in build_rows],
        "releases": [dict(release_dict(r), app_id=r["app_id"]) for r in release_rows],
        "jobs": [jsonable(r) for r in job_rows],
        "outbound": outbound(conn, outbound_schema, correlation_id, [e["id"] for e in events])
        if outbound_schema
        else [],
    }


def outbound(conn: Conn, schema: str, correlation_id: str, event_ids: list[str]) -> list[dict[str, Any]]:
    """Rows of ``<schema>.deliveries`` (the outbound dispatcher's log) for these events, if that table exists.

    The table belongs to another service, so its columns are discovered: rows match by
    ``event_id`` and/or ``correlation_id``, whichever the table has; secret and binary (payload)
    columns are left out.
    """
    types = {
        r["column_name"]: r["data_type"]
        for r in _rows(
            conn,
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = %s AND table_name = 'deliveries' ORDER BY ordinal_position",
            (schema,),
        )
    }
    cols = list(types)
    conds: list[str] = []
    params: list[Any] = []
    if "event_id" in cols:
        conds.append("event_id::text = ANY(%s)")
        params.append(event_ids)
    if "correlation_id" in cols:
        conds.append("correlation_id::text = %s")
        params.append(correlation_id)
    if not conds:
        return []
    shown = [c for c in cols if "secret" not in c.lower() and types[c] != "bytea"]
    order = next((c for c in ("created_at", "attempted_at", "id") if c in cols), shown[0])
    select = ", ".join('"' + c.replace('"', '""') + '"' for c in shown)
    rows = _rows(
        conn,
        f'SELECT {select} FROM {schema}.deliveries WHERE {" OR ".join(conds)} ORDER BY "{order}" LIMIT 1000',
        tuple(params),
    )
    return [jsonable(r) for r in rows]


def seen_correlation(conn: Conn, schema: str, correlation_id: str) -> bool:
    """Has the projection folded any event of this correlation (a write's request id) yet?"""
    found = _one(conn, f"SELECT 1 AS x FROM {schema}.audit WHERE correlation_id = %s LIMIT 1", (correlation_id,))
    return found is not None
