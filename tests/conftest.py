"""Test harness: real Kafka, PostgreSQL and Docker, started once per session (or reused).

Local mode (default): our own ``shipline.infra`` starts a broker and a database under
``.shipline-test/`` on ports 19092 / 15432 (``SHIPLINE_TEST_KAFKA_PORT`` / ``SHIPLINE_TEST_PG_PORT``),
and leaves them running for the next session unless ``CI`` is set. Containers mode
(``SHIPLINE_TEST_MODE=containers``) uses testcontainers' Kafka and Postgres images, for machines
with an image registry. External services (``KAFKA_BOOTSTRAP_SERVERS``, ``DATABASE_URL``) win
over both.

Every test gets its own topic prefix, consumer groups and database schema. A service that does
not come up fails the test loudly; nothing is skipped.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipline.topics import Topics, delete_prefixed, ensure_topics

ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(os.environ.get("SHIPLINE_TEST_DATA", ROOT / ".shipline-test"))
CACHE = ROOT / ".shipline" / "cache"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports_in_a_row(n: int) -> int:
    """The first of ``n`` consecutive ports free right now, for servers bound later (HAProxy's
    per-app frontends), chosen below the kernel's ephemeral range and above the deployer's
    instance ports (20000-29999): a port from ``free_port()`` is in the ephemeral range, where a
    client's source port (a load generator opens thousands) can take it before the server binds."""
    import random

    from deployer.ports import port_is_free

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(500):
        first = random.randrange(30000, low - n) if low - n > 30000 else free_port()
        if all(port_is_free(first + i) for i in range(n)):
            return first
    raise RuntimeError(f"no {n} free ports in a row")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if os.environ.get("SHIPLINE_TEST_MODE") == "containers":
        from testcontainers.kafka import KafkaContainer

        from shipline.infra.kafka import KAFKA_VERSION

        with KafkaContainer(f"apache/kafka:{KAFKA_VERSION}").with_kraft() as kc:
            yield kc.get_bootstrap_server()
        return
    from shipline.infra.kafka import LocalKafka

    port = int(os.environ.get("SHIPLINE_TEST_KAFKA_PORT", "19092"))
    broker = LocalKafka(TEST_DATA / "kafka", CACHE, port=port)
    broker.start(timeout=300)
    yield broker.bootstrap
    if os.environ.get("CI"):
        broker.stop()


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    if os.environ.get("SHIPLINE_TEST_MODE") == "containers":
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18", driver=None) as pc:
            yield pc.get_connection_url()
        return
    from shipline.infra.postgres import LocalPostgres

    port = int(os.environ.get("SHIPLINE_TEST_PG_PORT", "15432"))
    server = LocalPostgres(TEST_DATA / "postgres", port=port)
    server.start(timeout=120)
    yield server.url
    if os.environ.get("CI"):
        server.stop()


@pytest.fixture
def unique() -> str:
    """A short unique token for names (topics, groups, schemas)."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def topics(kafka_bootstrap: str, unique: str) -> Iterator[Topics]:
    """A fresh set of Shipline topics (6 partitions) for one test, deleted afterwards."""
    t = Topics(prefix=f"t{unique}")
    ensure_topics(kafka_bootstrap, t, partitions=6)
    yield t
    delete_prefixed(kafka_bootstrap, t.prefix)


@pytest.fixture
def pg_schema(database_url: str, unique: str) -> Iterator[str]:
    """A fresh PostgreSQL schema name for one test, dropped afterwards."""
    import psycopg

    name = f"t{unique}"
    yield name
    with psycopg.connect(database_url, autocommit=True) as conn:
        for row in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (name + "%",)
        ).fetchall():
            conn.execute(f'DROP SCHEMA IF EXISTS "{row[0]}" CASCADE')


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, database_url: str, topics: Topics, pg_schema: str):
    """Settings for one test: real services, its own topics, schemas and data dir."""
    from cryptography.fernet import Fernet

    from shipline.config import load

    return load(
        {
            "SHIPLINE_DATA_DIR": str(tmp_path / "data"),
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "DATABASE_URL": database_url,
            "SHIPLINE_TOPIC_PREFIX": topics.prefix,
            "SHIPLINE_DB_SCHEMA": pg_schema,
            "SHIPLINE_ADMIN_TOKEN": "adm-" + uuid.uuid4().hex,
            "SHIPLINE_SECRET_KEY": Fernet.generate_key().decode(),
            "SHIPLINE_OUTBOUND_ALLOW": "127.0.0.1/32",
            "SHIPLINE_HTTP": f"127.0.0.1:{free_port()}",
        }
    )
