"""The inbound routes' view of apps, deploy hooks and webhook tokens: a snapshot in memory.

Verification reads the same few rows for every request, and they change only through the
management API. Each process holds a snapshot of them (``Store.snapshot``) and the dedupe state
comes from the host's ``LocalIndex``, so a webhook costs no PostgreSQL round trip at all.

Freshness, per request:

- **This host**: the management API bumps the host's generation after each committed change
  (``Store.on_change``). A request that sees a new generation waits for the reload, so the very
  next request after ``DELETE /api/v1/deploy-hooks/{id}`` answered is refused, on any worker.
- **Other hosts** (several ingress machines sharing one database) change PostgreSQL's generation
  (a trigger bumps it with every change): each process polls it every ``POLL_EVERY`` seconds, so a
  change made on another host is seen within that bound.

A reload that fails after a local change answers 503 (never serve what is known to be stale);
a failed poll keeps the snapshot, since no credentials change can commit while PostgreSQL is
unreachable.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Protocol

from ingress.local_index import LocalIndex, today
from ingress.store import App, Snapshot

log = logging.getLogger("ingress")

POLL_EVERY = 1.0  # seconds between polls of PostgreSQL's generation, per process


class SnapshotSource(Protocol):
    def snapshot(self) -> Snapshot: ...

    def generation(self) -> int: ...


@dataclass(frozen=True)
class View:
    """Lookups over one snapshot (built once per reload)."""

    generation: int
    by_id: dict[int, App]
    by_repo: dict[str, list[App]]
    by_name: dict[tuple[str, str], App]
    by_hook: dict[str, tuple[str, App]]  # token hash -> (hook id, app)

    @classmethod
    def of(cls, snap: Snapshot) -> View:
        by_id = {a.id: a for a in snap.apps}
        by_repo: dict[str, list[App]] = {}
        by_name: dict[tuple[str, str], App] = {}
        for a in snap.apps:  # in id order: by_repo lists ascend, by_name keeps the newest app
            if a.repo_key is not None:
                by_repo.setdefault(a.repo_key, []).append(a)
            by_name[(a.namespace, a.name)] = a
        by_hook = {token: (hook_id, by_id[app_id]) for hook_id, token, app_id in snap.hooks if app_id in by_id}
        return cls(snap.generation, by_id, by_repo, by_name, by_hook)


class Credentials:
    def __init__(self, source: SnapshotSource, index: LocalIndex, dedupe_days: float,
                 poll_every: float = POLL_EVERY) -> None:
        self.source = source
        self.index = index
        self.dedupe_days = dedupe_days
        self.poll_every = poll_every
        self._lock = threading.Lock()
        self._view: View | None = None
        self._local = -1  # the host generation the view was loaded after
        self._next_poll = 0.0

    def view(self) -> View:
        """The current view, reloaded first when this host changed the credentials since."""
        local = self.index.generation()
        view = self._view
        if view is None or local != self._local:
            with self._lock:  # every thread waits: what it holds is known to be stale
                if self._view is None or local != self._local:
                    self._reload(local)
        elif time.monotonic() >= self._next_poll and self._lock.acquire(blocking=False):
            try:  # one thread polls; the others go on with the view, stale by at most the bound
                self._poll()
            finally:
                self._lock.release()
        assert self._view is not None
        return self._view

    def _reload(self, local: int) -> None:
        self._view = View.of(self.source.snapshot())
        self._local = local
        self._next_poll = time.monotonic() + self.poll_every

    def _poll(self) -> None:
        self._next_poll = time.monotonic() + self.poll_every
        try:
            if self.source.generation() != self._view.generation:  # type: ignore[union-attr]
                self._reload(self._local)
        except Exception as exc:  # noqa: BLE001 - no change can commit while the database is away
            log.warning("could not poll the credentials generation: %s", type(exc).__name__)

    # ------------------------------------------------------------------------------ lookups

    def _marked(self, apps: list[App], delivery_id: str) -> list[App]:
        if not apps or not delivery_id:
            return apps
        since = today() - int(self.dedupe_days)
        seen = self.index.seen([a.id for a in apps], delivery_id, since)
        return [replace(a, seen=True) if a.id in seen else a for a in apps]

    def app(self, app_id: int, delivery_id: str) -> App | None:
        app = self.view().by_id.get(app_id)
        return self._marked([app], delivery_id)[0] if app else None

    def apps_by_repo(self, keys: list[str], delivery_id: str) -> list[App]:
        by_repo = self.view().by_repo
        found = {a.id: a for key in keys for a in by_repo.get(key, ())}
        return self._marked([found[i] for i in sorted(found)], delivery_id)

    def app_by_name(self, namespace: str, name: str, delivery_id: str) -> App | None:
        app = self.view().by_name.get((namespace, name))
        return self._marked([app], delivery_id)[0] if app else None

    def hook_by_token(self, token_hash: str, delivery_id: str) -> tuple[str, str, App] | None:
        """(hook id, stored hash, app) of a live deploy hook of a live app."""
        found = self.view().by_hook.get(token_hash)
        if found is None:
            return None
        hook_id, app = found
        return hook_id, token_hash, self._marked([app], delivery_id)[0]
