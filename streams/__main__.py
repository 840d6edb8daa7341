"""``python -m streams``: run one stream worker until SIGTERM / SIGINT (stops within 10 s)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time

import uvloop

from shipline import bootstrap
from shipline.config import Settings
from shipline.topics import ensure_topics

log = logging.getLogger("streams")
STOP_GRACE = 8.0  # seconds app.stop() may take before we leave anyway (supervisor allows 10)
RECOVERY_STALL = 20.0  # seconds of table recovery without progress before the worker starts afresh


class RecoveryWatch:
    """Tells when table recovery has made no progress for ``limit`` seconds.

    faust-streaming 0.15 can stop receiving changelog records while it recovers in a process
    that already ran (a rebalance under load); recovery then waits forever and the worker's apps
    stall. A fresh process recovers from the changelog reliably, so the worker re-executes
    itself: safe at any moment, exactly like a kill -9 and restart (see streams/agent.py).
    """

    def __init__(self, limit: float = RECOVERY_STALL) -> None:
        self.limit = limit
        self.since: float | None = None
        self.remaining: int | None = None

    def stalled(self, in_recovery: bool, remaining: int, now: float) -> bool:
        if not in_recovery:
            self.since = self.remaining = None
            return False
        if self.since is None or self.remaining is None or remaining < self.remaining:
            self.since, self.remaining = now, remaining
            return False
        return now - self.since > self.limit


def _restart_afresh() -> None:
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", "streams"])


async def serve(settings: Settings, stop: threading.Event) -> None:
    from streams.app import create_app, ensure_changelog, recovery_of

    app = create_app(settings)  # inside the running loop: Faust binds to it
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ensure_changelog, settings, app)
    await app.start()
    log.info("streams worker started (group %s)", app.conf.id)
    watch = RecoveryWatch()
    try:
        while not stop.is_set() and not app.should_stop:
            await asyncio.sleep(0.5)
            recovery = recovery_of(app)
            if watch.stalled(recovery.in_recovery, recovery.active_remaining_total(), time.monotonic()):
                log.error("table recovery made no progress for %.0fs; starting this worker afresh", watch.limit)
                _restart_afresh()
    finally:
        log.info("streams worker stopping")
        try:
            await asyncio.wait_for(app.stop(), STOP_GRACE)
        except TimeoutError:
            log.warning("streams worker did not stop within %.0fs; leaving anyway", STOP_GRACE)
        outputs = getattr(app, "outputs", None)
        if outputs is not None:
            await loop.run_in_executor(None, outputs.close)


def main(settings: Settings, stop: threading.Event) -> int:
    ensure_topics(settings.bootstrap_servers, settings.topics, settings.partitions)
    # uvloop: the worker is CPU-bound on one core and much of that is event-loop machinery
    # (futures, callbacks, transports); bench.streams drained ~4,300-4,900/s on asyncio's loop
    # and ~5,400-6,200/s on uvloop. The policy covers Faust's consumer-thread loop too.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # The worker allocates a few dozen objects per record (Faust events, envelopes, futures): at
    # the default threshold of 700 the cyclic collector ran many times a second, walking Faust's
    # long-lived structures. Collecting every 50,000 allocations: bench.streams 5,100 -> 5,450/s
    # (mean of 4-5 runs each); reference counting still frees acyclic garbage at once.
    gc.set_threshold(50_000, 20, 20)
    asyncio.run(serve(settings, stop))
    return 0


if __name__ == "__main__":
    bootstrap.run("streams", main)
