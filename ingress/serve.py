"""Serving the public app under gunicorn (production never uses Flask's development server).

Workers are threaded (``gthread``): a request spends most of its time waiting for Kafka's ack,
and concurrent requests in one worker share its producer, whose batches then carry several
records per round trip. The app is built in each worker after the fork (no ``--preload``):
librdkafka and psycopg connections must not cross a fork.
"""

from __future__ import annotations

import gc
import sys

from flask import Flask

from shipline.config import Settings, load

THREADS = 16
APP = "ingress.serve:app_factory()"
# linger.ms 5: the machine's two cores, not the broker, limit the ingress, and bigger batches cost
# less CPU per record (librdkafka and broker). Measured with bench.ingress on a loaded machine:
# 0 ms 370-480 req/s at 1.9-2.2 ms worker CPU per request, 2 ms 350-540 at 1.7-2.1, 5 ms 650-880
# at 1.0-1.4 (10 ms: no better). Nagle off: every request waits for its own ack.
WEB_PRODUCER = {"linger.ms": 5, "socket.nagle.disable": True}


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
    # collecting cycles every 50,000 allocations instead of 700: bench.ingress p99 55-68 ms over
    # five runs (median 60) against 61-74 ms over five without (median 70), at the same throughput
    # within the noise (970-1,260/s); a collection holds the GIL, so it stalls all 16 threads
    gc.set_threshold(50_000, 20, 20)
    overrides = dict(WEB_PRODUCER, **({} if linger_ms is None else {"linger.ms": linger_ms}))
    return create_app(settings, producer=producer(settings.bootstrap_servers, **overrides))
