"""The one way an inbound request is accepted: dedupe, produce, wait for the ack, note, then answer.

The delivery id goes into the host's index before the answer (a redelivery to any worker is a
duplicate); its PostgreSQL row follows within ``ingress.notes.FLUSH_EVERY``.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

from flask import Response, request

from ingress.context import deps
from ingress.deliveries import records
from ingress.local_index import today
from ingress.store import App
from shipline.web import json_response

log = logging.getLogger("ingress")


def duplicate(delivery: str) -> Response:
    return json_response({"status": "duplicate", "duplicate": True, "delivery_id": delivery})


def accept(
    apps: list[App],
    *,
    delivery: str,
    source: str,
    event: str,
    verification: str,
    status: str,
    code: int,
    hook_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """Publish one ``delivery.received`` per app that has not seen ``delivery`` yet.

    Answers only after Kafka acknowledged every record; a delivery id every app has already
    accepted answers 200 ``{"duplicate": true}`` and produces nothing.
    """
    fresh = [app for app in apps if not app.seen]
    if not fresh:
        return duplicate(delivery)
    envelopes = records(
        [app.id for app in fresh],
        delivery=delivery,
        source=source,
        route=request.path,
        event=event,
        headers=request.headers,
        raw=request.get_data(cache=True),
        verification=verification,
        hook_id=hook_id,
    )
    ingress = deps()
    ingress.send(envelopes)
    try:
        ingress.index.add([app.id for app in fresh], delivery, today())
    except sqlite3.Error as exc:
        # The records are durable; only the ingress's own duplicate check misses them (streams
        # dedupes too), so the sender still gets its 2xx.
        log.warning("accepted delivery %s but could not note it in the local index: %s", delivery,
                    type(exc).__name__)
    ingress.notes.add(envelopes)
    ingress.pruner.poke()
    body = {"status": status, "delivery_id": delivery, "app_ids": [app.id for app in fresh], **(extra or {})}
    return json_response(body, code)
