"""Serving the public app under gunicorn (production never uses Flask's development server).

Workers are threaded (``gthread``): a request spends most of its time waiting for Kafka's ack,
and concurrent requests in one worker share its producer, whose batches then carry several
records per round trip. The app is built in each worker after the fork (no ``--preload``):
librdkafka and psycopg connections must not cross a fork.
"""

from __future__ import annotations

import sys

from flask import Flask

from shipline.config import Settings, load

THREADS = 16
APP = "ingress.serve:app_factory()"
# Each request waits for its own ack, so lingering only adds latency: measured with 16 threads
# sharing a producer, linger.ms 0 gave ~2x the acks/s of 2 ms and ~4x those of 5 ms (batches
# still form behind in-flight requests). Nagle off for the same reason.
WEB_PRODUCER = {"linger.ms": 0, "socket.nagle.disable": True}


def gunicorn_argv(settings: Settings, *, app: str = APP, threads: int = THREADS) -> list[str]:
    """The gunicorn command line serving ``app`` on ``SHIPLINE_HTTP`` with ``SHIPLINE_WEB_WORKERS``."""
    return [
        sys.executable, "-m", "gunicorn",
        "--bind", f"{settings.http_host}:{settings.http_port}",
        "--workers", str(settings.web_workers),
        "--worker-class", "gthread",
        "--threads", str(threads),
        "--keep-alive", "30",
        "--timeout", "60",
        "--graceful-timeout", "5",
        "--limit-request-field_size", "16384",
        "--log-level", settings.log_level.lower(),
        "--error-logfile", "-",
        app,
    ]


def app_factory(linger_ms: int | None = None) -> Flask:
    """Gunicorn's app entry: the whole public app from the environment's settings (the benchmark
    may try another ``linger_ms``: ``ingress.serve:app_factory(linger_ms=5)``)."""
    from shipline.bootstrap import configure_logging
    from shipline.kafka import producer
    from shipline.web import create_app

    settings = load()
    configure_logging(settings, "web")
    overrides = dict(WEB_PRODUCER, **({} if linger_ms is None else {"linger.ms": linger_ms}))
    return create_app(settings, producer=producer(settings.bootstrap_servers, **overrides))
