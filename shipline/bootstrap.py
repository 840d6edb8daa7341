"""Wiring shared by every service's ``python -m <package>`` entry point.

A service's ``main(settings, stop)`` gets its settings and a ``threading.Event`` that SIGTERM or
SIGINT sets; it must return within a few seconds of ``stop`` being set (the supervisor allows 10).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from shipline.config import Settings, load


def configure_logging(settings: Settings, service: str) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def stop_event() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def run(service: str, main: Callable[[Settings, threading.Event], int | None]) -> None:
    """The body of every ``__main__``: settings from the environment, logging, signals."""
    settings = load()
    configure_logging(settings, service)
    sys.exit(main(settings, stop_event()) or 0)
