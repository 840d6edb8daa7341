"""From the event log to the outbox: one consumed batch, one transaction.

Subscription events maintain the ``subscriptions`` table, a few events feed the small caches the
``build_finish`` payload joins, and every deliverable event that matches a subscription becomes a
pending delivery. The consumed offsets are written in the same transaction, so after a crash the
batch is either wholly in the outbox or read again (deliveries are unique per subscription and
event, so a re-read adds nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import Connection

from outbound import events, payloads
from outbound.options import Options
from outbound.store import NewDelivery, Store, parse_time
from shipline import messages as m
from shipline.envelope import Envelope, derive_id

log = logging.getLogger(__name__)
Lane = tuple[str, int]


def delivery_id(subscription_id: str, event_id: str) -> str:
    """Stable for a (subscription, event): the same X-Shipline-Delivery on every retry and redelivery."""
    return derive_id("outbound.delivery", subscription_id, event_id)


@dataclass
class Batch:
    conn: Connection[Any]
    store: Store
    opts: Options
    subs: dict[int, dict[str, dict[str, Any]]]
    deliveries: list[NewDelivery] = field(default_factory=list)
    lanes: set[Lane] = field(default_factory=set)

    def flush(self, now: datetime) -> None:
        self.store.insert_deliveries(self.conn, self.deliveries, now)
        self.deliveries.clear()


def _created(b: Batch, env: Envelope) -> None:
    d = env.data
    assert isinstance(d, m.SubscriptionCreated)
    b.store.create_subscription(
        b.conn, id=d.subscription_id, app_id=d.app_id, url=d.url, events=list(d.events),
        secret_encrypted=d.secret_encrypted, description=d.description, at=parse_time(env.time), event_id=env.id,
    )
    b.subs.setdefault(d.app_id, {}).setdefault(d.subscription_id, {"events": list(d.events), "enabled": True})


def _updated(b: Batch, env: Envelope) -> None:
    d = env.data
    assert isinstance(d, m.SubscriptionUpdated)
    state = b.store.update_subscription(b.conn, d.subscription_id, d.app_id, d.changes, parse_time(env.time),
                                        b.opts.rotation)
    if state is not None:
        b.subs.setdefault(d.app_id, {})[d.subscription_id] = state
        if state["enabled"]:
            b.lanes.add((d.subscription_id, d.app_id))


def _deleted(b: Batch, env: Envelope) -> None:
    d = env.data
    assert isinstance(d, m.SubscriptionDeleted)
    b.store.delete_subscription(b.conn, d.subscription_id, d.app_id, parse_time(env.time))
    b.subs.get(d.app_id, {}).pop(d.subscription_id, None)


def _disabled(b: Batch, env: Envelope) -> None:
    d = env.data
    assert isinstance(d, m.SubscriptionDisabled)
    b.store.disable_subscription(b.conn, d.subscription_id, d.reason, parse_time(env.time), reported=True)
    if d.subscription_id in b.subs.get(d.app_id, {}):
        b.subs[d.app_id][d.subscription_id]["enabled"] = False


def _app(b: Batch, env: Envelope) -> None:
    d = env.data
    if isinstance(d, m.AppRegistered):
        b.store.upsert_app(b.conn, d.app_id, {"name": d.name, "namespace": d.namespace, "repo_url": d.repo_url,
                                              "build": d.build})
    elif isinstance(d, m.AppUpdated):
        known = {k: v for k, v in d.changes.items() if k in ("name", "namespace", "repo_url", "build")}
        if known:
            b.store.upsert_app(b.conn, d.app_id, known)


def pushed(env: Envelope) -> tuple[str, dict[str, Any], dict[str, Any]] | None:
    """(delivery id, repository, author) a ``build_finish`` joins from a delivery.accepted, if it is a
    queued GitHub push whose body is readable; None otherwise. Shared by the live path (``pushes``)
    and the replay (``replay.LogJoins``)."""
    d = env.data
    assert isinstance(d, m.DeliveryAccepted)
    if d.source != "github" or d.event != "push" or d.outcome != "queued":
        return None
    found = payloads.github_push(d.body, d.body_encoding, d.headers)
    return (d.delivery_id, *found) if found else None


def queued_build(env: Envelope) -> dict[str, Any]:
    """The ``builds`` row (the fields a ``build_finish`` joins) of a build.queued."""
    d = env.data
    assert isinstance(d, m.BuildQueued)
    return {
        "commit": d.commit, "message": d.message, "author": d.author, "ref": d.ref, "repo_url": d.repo_url,
        "delivery_id": d.delivery_id, "queued_at": env.time,
    }


def _accepted(b: Batch, env: Envelope) -> None:
    found = pushed(env)
    if found:
        b.store.save_push(b.conn, found[0], env.app_id, found[1], found[2])


def _queued(b: Batch, env: Envelope) -> None:
    d = env.data
    assert isinstance(d, m.BuildQueued)
    b.store.save_build(b.conn, d.app_id, d.build, queued_build(env))


SUBSCRIPTION_HANDLERS: dict[str, Callable[[Batch, Envelope], None]] = {
    "subscription.created": _created,
    "subscription.updated": _updated,
    "subscription.deleted": _deleted,
    "subscription.disabled": _disabled,
}
CACHE_HANDLERS: dict[str, Callable[[Batch, Envelope], None]] = {
    "app.registered": _app,
    "app.updated": _app,
    "delivery.accepted": _accepted,
    "build.queued": _queued,
}


def payload_for(conn: Connection[Any], store: Store, env: Envelope, build: dict[str, Any] | None = None,
                push: dict[str, Any] | None = None) -> bytes:
    """The request body for ``env``. A build.finished joins its build.queued row and push: ``build``
    and ``push`` (``queued_build`` and ``{"repository", "author"}`` of ``pushed``) when the caller
    has them (a replay reading the log), the store's rows for what it does not pass."""
    if env.type == "build.finished":
        d = env.data
        assert isinstance(d, m.BuildFinished)
        return payloads.dumps(payloads.build_finish(env, store.build_context(conn, env.app_id, d.build, build, push)))
    return payloads.cloudevent(env)


def new_delivery(sid: str, env: Envelope, payload: bytes, enabled: bool = True) -> NewDelivery:
    return NewDelivery(
        id=delivery_id(sid, env.id), subscription_id=sid, app_id=env.app_id, event_id=env.id, event_type=env.type,
        event_name=events.wire_name(env.type), event_sequence=env.sequence, event_time=parse_time(env.time),
        payload=payload, status="pending" if enabled else "failed",
        last_error=None if enabled else "subscription disabled when the event happened",
    )


def _fan_out(b: Batch, env: Envelope, deliverable: set[str]) -> None:
    if env.type not in deliverable:
        return
    matching = [(sid, info) for sid, info in b.subs.get(env.app_id, {}).items()
                if events.matches(info["events"], env.type)]
    if not matching:
        return
    payload = payload_for(b.conn, b.store, env)
    for sid, info in matching:
        b.deliveries.append(new_delivery(sid, env, payload, info["enabled"]))
        if info["enabled"]:
            b.lanes.add((sid, env.app_id))


def apply(conn: Connection[Any], store: Store, opts: Options, envs: Iterable[Envelope], now: datetime) -> set[Lane]:
    """Apply decoded events in order inside the caller's transaction; returns the lanes with new work."""
    envs = list(envs)
    batch = Batch(conn, store, opts, store.subscriptions_for(conn, {e.app_id for e in envs}))
    deliverable = events.deliverable_types()
    for env in envs:
        handler = SUBSCRIPTION_HANDLERS.get(env.type)
        if handler is not None:
            batch.flush(now)  # a deletion or disable must see the deliveries queued before it
            handler(batch, env)
            continue
        cache_handler = CACHE_HANDLERS.get(env.type)
        if cache_handler is not None:
            cache_handler(batch, env)
        _fan_out(batch, env, deliverable)
    batch.flush(now)
    return batch.lanes
