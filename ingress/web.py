"""Mount the ingress on the public Flask app: migrations, dependencies, blueprints."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

from flask import Flask

from ingress import admin, github, openapi, token_hooks
from ingress.context import Ingress
from ingress.credentials import POLL_EVERY, Credentials
from ingress.crypto import SecretBox
from ingress.local_index import GenerationUnavailable, LocalIndex, today
from ingress.notes import DeliveryNotes
from ingress.publisher import Publisher
from ingress.retention import Pruner
from ingress.store import Store

log = logging.getLogger("ingress")


def fill_index(index: LocalIndex, store: Store, days: float) -> None:
    """A new index learns the delivery ids PostgreSQL holds (once per file and store)."""
    since = datetime.now(UTC) - timedelta(days=days)

    def rows() -> Iterator[tuple[int, str, int]]:
        for app_id, delivery_id, at in store.seen_since(since):
            yield app_id, delivery_id, today(at.timestamp())

    loaded = index.fill(store.identity(), rows())
    if loaded:
        log.info("filled the host's delivery index with %d ids from PostgreSQL", loaded)


def announcer(index: LocalIndex) -> Callable[[], None]:
    """``Store.on_change``: tell the host's workers. The change is committed by then, so a failure
    here must not fail the request; the other workers then see it within the poll bound."""

    def changed() -> None:
        try:
            index.bump()
        except (sqlite3.Error, GenerationUnavailable) as exc:
            log.warning("credentials changed but the host index could not say so (%s); other workers "
                        "see it within %g s", type(exc).__name__, POLL_EVERY)

    return changed


def mount(app: Flask) -> None:
    from shipline.web import current

    with app.app_context():
        ctx = current()
    settings = ctx.settings
    index = LocalIndex.of(settings)
    store = Store(ctx.pool, settings.schema("ingress"), on_change=announcer(index))
    store.migrate()
    fill_index(index, store, settings.dedupe_days)
    ctx.extras["ingress"] = Ingress(settings=settings, producer=ctx.producer, store=store,
                                    box=SecretBox(settings.secret_key), publisher=Publisher(ctx.producer),
                                    pruner=Pruner(store, settings.dedupe_days, index=index), index=index,
                                    credentials=Credentials(store, index, settings.dedupe_days),
                                    notes=DeliveryNotes(store))
    for bp in (github.bp, token_hooks.bp, admin.bp, openapi.bp):
        app.register_blueprint(bp)
