"""The whole stack as supervised children: local infrastructure first, then every service.

Infrastructure is local unless the environment points elsewhere: ``KAFKA_BOOTSTRAP_SERVERS``
switches off the local broker, ``DATABASE_URL`` the local PostgreSQL, ``DOCKER_HOST`` the local
dockerd. Kafka and PostgreSQL run as supervised children too, so a crash of either is repaired
like a crash of any service.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from shipline.config import Settings
from shipline.supervisor import Child

log = logging.getLogger(__name__)

DEV_OUTBOUND_ALLOW = "127.0.0.1/32"

# (child name, python module). A service is part of the stack when its package has __main__.
SERVICES = [
    ("web", "ingress"),
    ("streams", "streams"),
    ("deployer", "deployer"),
    ("projector", "projections"),
    ("dispatcher", "outbound"),
]


def service_env(settings: Settings) -> dict[str, str]:
    """The environment every service child gets: the caller's, with infrastructure pinned."""
    env = dict(os.environ)
    env.update({k: v for k, v in settings.env.items() if isinstance(v, str)})
    env["KAFKA_BOOTSTRAP_SERVERS"] = settings.bootstrap_servers
    env["DATABASE_URL"] = settings.db_url
    env["SHIPLINE_DATA_DIR"] = str(settings.data_dir)
    env["SHIPLINE_ADMIN_TOKEN"] = settings.admin_token
    env["SHIPLINE_SECRET_KEY"] = settings.secret_key
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The embedded stack is a development stack: its demo subscriber listens on 127.0.0.1, so
    # loopback is allowed unless the operator chose otherwise (production sets it explicitly).
    if not env.get("SHIPLINE_OUTBOUND_ALLOW"):
        env["SHIPLINE_OUTBOUND_ALLOW"] = DEV_OUTBOUND_ALLOW
    return env


def infrastructure(settings: Settings) -> list[Child]:
    """Prepare (fetch, format, initdb) and describe the local Kafka and PostgreSQL children."""
    children: list[Child] = []
    if not settings.kafka_bootstrap:
        from shipline.infra.kafka import LocalKafka

        kafka = LocalKafka(settings.data_dir / "kafka", settings.cache_dir, port=settings.kafka_port,
                           controller_port=settings.kafka_controller_port)
        kafka.prepare()
        children.append(Child("kafka", kafka.command(), infra=True, before_start=kafka.prepare))
    if not settings.database_url:
        from shipline.infra.postgres import LocalPostgres

        pg = LocalPostgres(settings.data_dir / "postgres", port=settings.pg_port)
        pg.prepare()
        children.append(Child("postgres", pg.command(), popen_kwargs=pg.popen_kwargs(), infra=True))
    return children


def wait_infrastructure(settings: Settings, timeout: float = 180) -> None:
    """Block until Kafka and PostgreSQL answer, then create topics and the local database."""
    import time

    from shipline.topics import ensure_topics

    deadline = time.monotonic() + timeout
    if not settings.database_url:
        from shipline.infra.postgres import LocalPostgres

        pg = LocalPostgres(settings.data_dir / "postgres", port=settings.pg_port)
        pg.wait_ready(timeout)
        pg.ensure_database()
    if not settings.kafka_bootstrap:
        from shipline.infra.kafka import LocalKafka

        kafka = LocalKafka(settings.data_dir / "kafka", settings.cache_dir, port=settings.kafka_port,
                           controller_port=settings.kafka_controller_port)
        kafka.wait_ready(max(1.0, deadline - time.monotonic()))
    ensure_topics(settings.bootstrap_servers, settings.topics, settings.partitions)


def docker_available(settings: Settings) -> bool:
    """Start (or find) a Docker engine; the stack works without one (process strategy)."""
    try:
        from shipline.infra.docker_engine import ensure_engine

        ensure_engine(settings.docker_host)
        return True
    except Exception as exc:  # noqa: BLE001 - optional capability
        log.warning("no Docker engine (%s); apps use the process strategy", exc)
        return False


def services(settings: Settings) -> list[Child]:
    env = service_env(settings)
    children = []
    for name, module in SERVICES:
        if importlib.util.find_spec(f"{module}.__main__") is None:
            continue
        children.append(Child(name, [sys.executable, "-m", module], env=env, popen_kwargs={"cwd": str(Path.cwd())}))
    return children
