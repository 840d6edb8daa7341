"""``/healthz`` (this process is up) and ``/readyz`` (Kafka, PostgreSQL and every worker are)."""

from __future__ import annotations

import json
import time

from flask import Blueprint, jsonify

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():  # type: ignore[no-untyped-def]
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():  # type: ignore[no-untyped-def]
    from shipline.web import current

    ctx = current()
    down: list[str] = []
    try:
        ctx.producer.list_topics(timeout=2)
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        down.append("kafka")
    try:
        with ctx.pool.connection(timeout=2) as conn:
            conn.execute("SELECT 1")
    except Exception:  # noqa: BLE001
        down.append("postgres")
    status_file = ctx.settings.data_dir / "run" / "status.json"
    if status_file.exists():
        try:
            status = json.loads(status_file.read_text())
            for name, info in status.get("services", {}).items():
                if not info.get("alive"):
                    down.append(name)
            if time.time() - status.get("updated", 0) > 15:
                down.append("supervisor")
        except ValueError:
            down.append("supervisor")
    if down:
        resp = jsonify({"status": "unavailable", "down": down})
        resp.status_code = 503
        return resp
    return jsonify({"status": "ready"})
