"""Forgetting old delivery ids, so the ingress's dedupe table does not grow by a row per delivery for ever.

Redeliveries come within days (GitHub's "Redeliver" button, a CI job's retry), so the ingress
remembers accepted delivery ids for ``SHIPLINE_DEDUPE_DAYS`` (30) and answers those 200
``{"duplicate": true}``. Older ones are deleted by ``Store.prune`` (and from the host's index), at most once an hour per
process, on a thread of its own started by an accepted delivery (so after gunicorn's fork, and
never on the request's time). A redelivery older than that is published again; streams, which
remembers each app's recent deliveries, records it as a ``delivery.duplicate`` and decides nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from ingress.local_index import today

log = logging.getLogger("ingress")

PRUNE_EVERY = 3600.0  # seconds between prunes, per process


class Prunable(Protocol):
    def prune(self, days: float, batch: int = ...) -> int: ...


class IndexPrunable(Protocol):
    def prune(self, before_day: int) -> int: ...


class Pruner:
    def __init__(self, store: Prunable, days: float, every: float = PRUNE_EVERY,
                 index: IndexPrunable | None = None) -> None:
        """Prunes the store and, when given, the host's index (``ingress.local_index``)."""
        self.store = store
        self.index = index
        self.days = days
        self.every = every
        self._due = 0.0  # time.monotonic() of the next prune; the first accepted delivery starts one
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def poke(self) -> bool:
        """Start a prune in the background when one is due; True when this call started it."""
        now = time.monotonic()
        if now < self._due:
            return False
        with self._lock:
            if now < self._due:
                return False
            self._due = now + self.every
            self.thread = threading.Thread(target=self._run, name="ingress-dedupe-pruner", daemon=True)
        self.thread.start()
        return True

    def _run(self) -> None:
        try:
            removed = self.store.prune(self.days)
            if self.index is not None:
                self.index.prune(today() - int(self.days))
        except Exception as exc:  # noqa: BLE001 - housekeeping: the next due prune tries again
            log.warning("could not forget old delivery ids: %s", type(exc).__name__)
            return
        if removed:
            log.info("forgot %d delivery ids accepted more than %g days ago", removed, self.days)
