"""Forgetting old pushes and builds, so the dispatcher's join caches do not grow by a row per build for ever.

``build_finish`` payloads join the build.queued row and the GitHub push it came from, both seen
minutes before the build finishes. The dispatcher keeps them for ``SHIPLINE_OUTBOUND_KEEP_DAYS``
(30); older ones are deleted by ``Store.prune`` on a thread of the sending dispatcher, shortly
after it starts and then once an hour. A build finishing after its rows are gone still gets a
payload, with what it could not join left null; a replay joins the push and build.queued it reads
from the log instead (``outbound.replay.LogJoins``). ``apps`` (a row per app) and the delivery log
are not pruned here.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)

PRUNE_EVERY = 3600.0  # seconds between prunes
FIRST_PRUNE_AFTER = 60.0  # seconds after start: not on the start's busiest minute, but soon


class Prunable(Protocol):
    def prune(self, days: float, batch: int = ...) -> dict[str, int]: ...


class Pruner:
    def __init__(self, store: Prunable, days: float, stop: threading.Event, every: float = PRUNE_EVERY,
                 first: float = FIRST_PRUNE_AFTER) -> None:
        self.store = store
        self.days = days
        self.stop = stop
        self.every = every
        self.first = first

    def run(self) -> None:
        """Prune ``first`` seconds from now, then every ``every`` seconds, until ``stop`` is set."""
        delay = self.first
        while not self.stop.wait(delay):
            self.prune()
            delay = self.every

    def prune(self) -> dict[str, int]:
        """One prune; never raises (the thread must outlive a database that is away for a while)."""
        try:
            removed = self.store.prune(self.days)
        except Exception as exc:  # noqa: BLE001 - housekeeping: the next due prune tries again
            if not self.stop.is_set():  # on the way out the pool is closed under us: nothing to report
                log.warning("could not forget old pushes and builds: %s", type(exc).__name__)
            return {}
        if any(removed.values()):
            log.info("forgot %s seen more than %g days ago",
                     ", ".join(f"{n} {table}" for table, n in removed.items() if n), self.days)
        return removed
