"""Per-app state of the sequencer, and ``evolve``: how each event changes it.

``AppState`` is everything ``decide`` needs to know about one app: its configuration, the
counters that number builds, revisions, jobs and events, the recent delivery ids (for dedupe),
the revisions it can roll back to and which deploy is in flight or waiting (latest wins).
It is stored in a changelog-backed Faust table as our own JSON (``to_json`` / ``from_json``),
never pickle and never a Faust ``Record``, so it stays readable and stable across versions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import orjson

from shipline.envelope import Envelope

RECENT_DELIVERIES = 5000  # delivery ids remembered per app to answer redeliveries
RECENT_INPUTS = 1000  # request / report ids remembered per app (the producers may retry)
KEPT_REVISIONS = 1000  # revisions one can roll back to by number
KEPT_LIVE = 100  # revisions that went live, newest last (rollback to "previous")
INPUT = "inbound"  # the key of the applied input offset in ``AppState.positions`` (one input topic)

# The app configuration every command carries (``BuildImage.app`` and friends).
CONFIG_KEYS = (
    "name", "namespace", "repo_url", "branch", "image", "kind", "strategy", "command", "port",
    "health_path", "build", "allow_unsigned",
)


@dataclass(frozen=True)
class Revision:
    image: str
    commit: str
    build: int | None
    trigger: str


@dataclass(frozen=True)
class AppState:
    app_id: int
    config: dict[str, Any] | None = None  # None until app.registered
    deleted: bool = False
    sequence: int = 0  # sequence of the last event published for this app
    builds: int = 0  # number of the latest queued build
    revision: int = 0  # number of the latest requested revision
    jobs: int = 0
    deliveries: tuple[str, ...] = ()  # recent delivery ids, oldest first
    inputs: tuple[str, ...] = ()  # recent request / report ids, oldest first
    revisions: dict[int, Revision] = field(default_factory=dict)
    in_flight: int | None = None  # revision whose deploy.release is with the deployer
    waiting: int | None = None  # newest revision waiting for the in-flight one to finish
    live: int | None = None
    live_history: tuple[int, ...] = ()
    # Highest offset applied per input topic ("inbound"; states saved when reports had their own
    # topic may also hold a "reports" entry, which nothing reads any more). A record at or
    # below it was applied before a crash and must not be decided again.
    positions: dict[str, int] = field(default_factory=dict)

    @property
    def registered(self) -> bool:
        return self.config is not None and not self.deleted

    def app_payload(self) -> dict[str, Any]:
        """The configuration dict commands carry, app id included."""
        return {"app_id": self.app_id, **(self.config or {})}

    def previous_live(self) -> int | None:
        """The revision that was live before the current live one."""
        before = [r for r in self.live_history if r != self.live]
        return before[-1] if before else None


def replace(state: AppState, **changes: Any) -> AppState:
    """``dataclasses.replace`` without re-running ``__init__`` (it is on the hot path: several
    times per record)."""
    new = object.__new__(AppState)
    new.__dict__.update(state.__dict__)
    new.__dict__.update(changes)
    return new


def _bounded(items: tuple[Any, ...], item: Any, limit: int) -> tuple[Any, ...]:
    out = items + (item,)
    return out[-limit:] if len(out) > limit else out


def remember_input(state: AppState, input_id: str) -> AppState:
    return replace(state, inputs=_bounded(state.inputs, input_id, RECENT_INPUTS))


def applied(state: AppState) -> int:
    """The highest input offset ``state`` has applied (-1: none)."""
    return state.positions.get(INPUT, -1)


def at_position(state: AppState, offset: int) -> AppState:
    return replace(state, positions={**state.positions, INPUT: offset})


# -------------------------------------------------------------------------------------- evolve


def _registered(s: AppState, d: Any) -> AppState:
    return replace(s, config={k: getattr(d, k) for k in CONFIG_KEYS}, deleted=False)


def _updated(s: AppState, d: Any) -> AppState:
    known = {k: v for k, v in d.changes.items() if k in CONFIG_KEYS}
    return replace(s, config={**(s.config or {}), **known})


def _deleted(s: AppState, d: Any) -> AppState:
    return replace(s, deleted=True)


def _accepted(s: AppState, d: Any) -> AppState:
    return replace(s, deliveries=_bounded(s.deliveries, d.delivery_id, RECENT_DELIVERIES))


def _build_queued(s: AppState, d: Any) -> AppState:
    return replace(s, builds=max(s.builds, d.build))


def _deploy_requested(s: AppState, d: Any) -> AppState:
    revisions = {**s.revisions, d.revision: Revision(d.image, d.commit, d.build, d.trigger)}
    if len(revisions) > KEPT_REVISIONS:
        for old in sorted(revisions)[: len(revisions) - KEPT_REVISIONS]:
            del revisions[old]
    if s.in_flight is None:
        return replace(s, revision=max(s.revision, d.revision), revisions=revisions, in_flight=d.revision)
    return replace(s, revision=max(s.revision, d.revision), revisions=revisions, waiting=d.revision)


def _superseded(s: AppState, d: Any) -> AppState:
    return replace(s, waiting=None) if s.waiting == d.revision else s


def _finished(s: AppState, revision: int) -> AppState:
    """The in-flight deploy ended: the waiting one (if any) is released next."""
    if s.in_flight != revision:
        return s
    return replace(s, in_flight=s.waiting, waiting=None)


def _deployed(s: AppState, d: Any) -> AppState:
    s = replace(s, live=d.revision, live_history=_bounded(s.live_history, d.revision, KEPT_LIVE))
    return _finished(s, d.revision)


def _deploy_failed(s: AppState, d: Any) -> AppState:
    return _finished(s, d.revision)


def _job_requested(s: AppState, d: Any) -> AppState:
    return replace(s, jobs=max(s.jobs, d.job))


EVOLVERS = {
    "app.registered": _registered,
    "app.updated": _updated,
    "app.deleted": _deleted,
    "delivery.accepted": _accepted,
    "build.queued": _build_queued,
    "deploy.requested": _deploy_requested,
    "deploy.superseded": _superseded,
    "deployed": _deployed,
    "deploy.failed": _deploy_failed,
    "job.requested": _job_requested,
}


def evolve(state: AppState, event: Envelope) -> AppState:
    """Apply one (sequenced) event. Events with no effect on decisions only advance the sequence."""
    fn = EVOLVERS.get(event.type)
    if fn is not None:
        state = fn(state, event.data)
    if event.sequence is not None and event.sequence > state.sequence:
        state = replace(state, sequence=event.sequence)
    return state


# ------------------------------------------------------------------------------- serialization


def to_dict(state: AppState) -> dict[str, Any]:
    return {
        "v": 1,
        "app_id": state.app_id,
        "config": state.config,
        "deleted": state.deleted,
        "sequence": state.sequence,
        "builds": state.builds,
        "revision": state.revision,
        "jobs": state.jobs,
        "deliveries": list(state.deliveries),
        "inputs": list(state.inputs),
        "revisions": {str(n): dataclasses.asdict(r) for n, r in state.revisions.items()},
        "in_flight": state.in_flight,
        "waiting": state.waiting,
        "live": state.live,
        "live_history": list(state.live_history),
        "positions": state.positions,
    }


def from_dict(doc: dict[str, Any]) -> AppState:
    if doc.get("v") != 1:
        raise ValueError(f"unknown app state version {doc.get('v')!r}")
    return AppState(
        app_id=doc["app_id"],
        config=doc["config"],
        deleted=doc["deleted"],
        sequence=doc["sequence"],
        builds=doc["builds"],
        revision=doc["revision"],
        jobs=doc["jobs"],
        deliveries=tuple(doc["deliveries"]),
        inputs=tuple(doc["inputs"]),
        revisions={int(n): Revision(**r) for n, r in doc["revisions"].items()},
        in_flight=doc["in_flight"],
        waiting=doc["waiting"],
        live=doc["live"],
        live_history=tuple(doc["live_history"]),
        positions=dict(doc["positions"]),
    )


def to_json(state: AppState) -> bytes:
    return orjson.dumps(to_dict(state))


def from_json(raw: bytes | str) -> AppState:
    return from_dict(orjson.loads(raw))
