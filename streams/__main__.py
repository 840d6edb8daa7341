"""``python -m streams``: run one stream worker until SIGTERM / SIGINT (stops within 10 s)."""

from __future__ import annotations

import asyncio
import logging
import threading

from shipline import bootstrap
from shipline.config import Settings
from shipline.topics import ensure_topics

log = logging.getLogger("streams")
STOP_GRACE = 8.0  # seconds app.stop() may take before we leave anyway (supervisor allows 10)


async def serve(settings: Settings, stop: threading.Event) -> None:
    from streams.app import create_app, ensure_changelog

    app = create_app(settings)  # inside the running loop: Faust binds to it
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ensure_changelog, settings, app)
    await app.start()
    log.info("streams worker started (group %s)", app.conf.id)
    try:
        while not stop.is_set() and not app.should_stop:
            await asyncio.sleep(0.1)
    finally:
        log.info("streams worker stopping")
        try:
            await asyncio.wait_for(app.stop(), STOP_GRACE)
        except TimeoutError:
            log.warning("streams worker did not stop within %.0fs; leaving anyway", STOP_GRACE)


def main(settings: Settings, stop: threading.Event) -> int:
    ensure_topics(settings.bootstrap_servers, settings.topics, settings.partitions)
    asyncio.run(serve(settings, stop))
    return 0


if __name__ == "__main__":
    bootstrap.run("streams", main)
