"""How the ingress answers when it cannot accept: always JSON ``{"error": ...}``, never a 5xx
other than 503 (retry later) for an unreachable Kafka or PostgreSQL, or an unusable host index."""

from __future__ import annotations

import logging
import sqlite3

import psycopg
from flask import Blueprint, Response
from psycopg_pool import PoolTimeout

from ingress.deliveries import BadDeliveryId
from ingress.local_index import GenerationUnavailable
from ingress.validation import Invalid
from shipline.kafka import NotDurable
from shipline.web import error

log = logging.getLogger("ingress")
RETRY_AFTER = "5"


def unavailable(message: str) -> Response:
    resp = error(503, message)
    resp.headers["Retry-After"] = RETRY_AFTER
    return resp


def not_durable(exc: NotDurable) -> Response:
    if "MSG_SIZE_TOO_LARGE" in str(exc) or "RECORD_LIST_TOO_LARGE" in str(exc):
        return error(413, "request too large for the log's maximum record size")
    log.warning("Kafka did not acknowledge: %s", exc)
    return unavailable("not accepted: the event log did not acknowledge the record; retry later")


def database_down(exc: Exception) -> Response:
    log.warning("PostgreSQL unavailable: %s", type(exc).__name__)
    return unavailable("not accepted: the credentials store is unavailable; retry later")


def index_down(exc: Exception) -> Response:
    log.warning("the host's delivery index is unavailable: %s", type(exc).__name__)
    return unavailable("not accepted: the ingress's delivery index is unavailable; retry later")


def invalid(exc: Invalid) -> Response:
    return error(400, exc.message, field=exc.field)


def bad_delivery_id(exc: BadDeliveryId) -> Response:
    return error(400, str(exc))


def install(bp: Blueprint) -> None:
    bp.register_error_handler(NotDurable, not_durable)
    bp.register_error_handler(psycopg.OperationalError, database_down)
    bp.register_error_handler(PoolTimeout, database_down)
    bp.register_error_handler(sqlite3.Error, index_down)
    bp.register_error_handler(GenerationUnavailable, index_down)
    bp.register_error_handler(Invalid, invalid)
    bp.register_error_handler(BadDeliveryId, bad_delivery_id)
