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


def app_factory() -> Flask:
    """Gunicorn's app entry: the whole public app from the environment's settings."""
    from shipline.bootstrap import configure_logging
    from shipline.web import create_app

    settings = load()
    configure_logging(settings, "web")
    return create_app(settings)
