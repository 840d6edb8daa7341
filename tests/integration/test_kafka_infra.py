"""The local Kafka broker of ``shipline.infra.kafka``: starts, keeps its state over a restart,
refuses to auto-create topics, and neither doubles up on a port nor mistakes a non-Kafka port."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from shipline.infra.kafka import KAFKA_VERSION, LocalKafka

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".shipline" / "cache"  # shared with the rest of the project: jars are fetched once


def conf(broker: LocalKafka, **extra: object) -> dict[str, object]:
    # librdkafka's reconnect chatter while the broker restarts goes to logging, not stderr
    return {"bootstrap.servers": broker.bootstrap, "logger": logging.getLogger("rdkafka"), **extra}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalKafka]:
    port, cport = free_ports(2)
    k = LocalKafka(tmp_path / "kafka", CACHE, port=port, controller_port=cport)
    yield k
    k.stop()


def test_restart_keeps_topics_and_records(broker: LocalKafka, tmp_path: Path) -> None:
    t0 = time.monotonic()
    broker.start(timeout=180)
    first_start = time.monotonic() - t0
    assert broker.is_running() and broker.pid is not None
    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert KAFKA_VERSION.startswith("4.0.")

    admin = AdminClient(conf(broker))
    admin.create_topics([NewTopic("persisted", num_partitions=1, replication_factor=1)])["persisted"].result(30)

    delivered: list[KafkaError | None] = []
    producer = Producer(conf(broker, acks="all", **{"enable.idempotence": True}))
    producer.produce("persisted", key=b"k1", value=b"hello", on_delivery=lambda err, _msg: delivered.append(err))
    assert producer.flush(30) == 0
    assert delivered == [None]

    # auto.create.topics.enable=false: producing to an unknown topic fails, and no topic appears.
    failed: list[KafkaError | None] = []
    p2 = Producer(conf(broker, acks="all", **{"message.timeout.ms": 3000}))
    p2.produce("no-such-topic", value=b"x", on_delivery=lambda err, _msg: failed.append(err))
    p2.flush(15)
    assert len(failed) == 1 and failed[0] is not None
    assert "no-such-topic" not in admin.list_topics(timeout=10).topics
    del producer, p2, admin

    pid = broker.pid
    broker.stop()
    assert not broker.is_running() and broker.pid is None and not port_open(broker.port)

    t0 = time.monotonic()
    broker.start(timeout=120)
    second_start = time.monotonic() - t0
    assert broker.pid not in (None, pid)

    # A second LocalKafka on the same port uses the running broker instead of starting one.
    other = LocalKafka(tmp_path / "other", CACHE, port=broker.port, controller_port=broker.controller_port)
    other.start(timeout=30)
    assert other.adopted and other.pid is None and other.is_running()
    other.stop()  # leaves a broker it did not start alone
    assert broker.is_running() and port_open(broker.port)

    consumer = Consumer(
        conf(
            broker,
            **{"group.id": "kafka-infra-test", "auto.offset.reset": "earliest", "enable.auto.commit": False},
        )
    )
    try:
        consumer.subscribe(["persisted"])
        deadline = time.monotonic() + 30
        msg = None
        while msg is None and time.monotonic() < deadline:
            m = consumer.poll(1.0)
            if m is not None and m.error() is None:
                msg = m
        assert msg is not None, "record written before the restart was not read back"
        assert (msg.key(), msg.value()) == (b"k1", b"hello")
    finally:
        consumer.close()

    assert "persisted" in AdminClient(conf(broker)).list_topics(timeout=10).topics
    # Kafka logs to its own file; the JVM's stdout stays quiet.
    assert broker.log_path.is_file()
    assert b" INFO " not in broker.out_path.read_bytes()
    print(f"\nLocalKafka {KAFKA_VERSION}: first start {first_start:.1f}s, second start {second_start:.1f}s")


def test_port_taken_by_non_kafka_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = int(listener.getsockname()[1])
        k = LocalKafka(tmp_path / "kafka", CACHE, port=port, controller_port=free_ports(1)[0], probe_timeout=2)
        with pytest.raises(RuntimeError, match="not answer as a Kafka broker"):
            k.start(timeout=10)
        assert k.pid is None and not (tmp_path / "kafka" / "logs").exists()
