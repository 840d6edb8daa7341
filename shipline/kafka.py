"""Kafka clients with Shipline's settings, and the dead-letter path.

The partitioner is ``murmur2_random`` everywhere: the same as the Java client and aiokafka
(Faust), so one app id lands on the same partition number of every topic whatever wrote it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from shipline import codec
from shipline.envelope import Envelope

PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": True,
    "partitioner": "murmur2_random",
    "linger.ms": 2,
    "compression.type": "none",
    "message.timeout.ms": 10000,
    "socket.keepalive.enable": True,
    "log_level": 3,
    # librdkafka's default (1,000,000) would refuse a delivery of a few MB locally; the topics that
    # carry bodies take codec.MAX_RECORD (shipline.topics)
    "message.max.bytes": codec.MAX_RECORD + 1024 * 1024,
}


class NotDurable(RuntimeError):
    """Kafka did not acknowledge a record in time: the caller must not report success."""


def producer(bootstrap: str, **overrides: Any) -> Producer:
    conf = {"bootstrap.servers": bootstrap, **PRODUCER_DEFAULTS, **overrides}
    return Producer(conf)


def consumer(bootstrap: str, group: str, topics: Iterable[str], **overrides: Any) -> Consumer:
    conf = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "log_level": 3,
        **overrides,
    }
    c = Consumer(conf)
    c.subscribe(list(topics))
    return c


def send_sync(p: Producer, topic: str, env: Envelope, timeout: float = 10.0) -> tuple[int, int]:
    """Produce one envelope and wait for the broker's ack; returns (partition, offset)."""
    return send_many_sync(p, topic, [env], timeout)[-1]


def send_many_sync(p: Producer, topic: str, envs: list[Envelope], timeout: float = 10.0) -> list[tuple[int, int]]:
    done = threading.Event()
    results: list[tuple[int, int] | None] = [None] * len(envs)
    errors: list[str] = []
    remaining = [len(envs)]

    def report(index: int):  # type: ignore[no-untyped-def]
        def cb(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                results[index] = (msg.partition() or 0, msg.offset() or 0)
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()
        return cb

    for i, env in enumerate(envs):
        try:
            p.produce(topic, key=env.key, value=codec.encode(env), on_delivery=report(i))
        except (BufferError, KafkaException) as exc:
            raise NotDurable(f"could not enqueue record: {exc}") from exc
    import time

    deadline = time.monotonic() + timeout
    while not done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            raise NotDurable(f"Kafka did not acknowledge within {timeout}s")
        p.poll(min(left, 0.05))
    if errors:
        raise NotDurable(f"Kafka refused the record: {errors[0]}")
    return [r for r in results if r is not None]


def dead_letter(p: Producer, topic: str, msg: Message, reason: str, consumer_name: str) -> None:
    """Send an undecodable or unappliable record, byte for byte, to the dead-letter topic."""
    headers: list[tuple[str, str | bytes | None]] = [
        ("x-shipline-reason", reason[:2000].encode()),
        ("x-shipline-consumer", consumer_name.encode()),
        ("x-shipline-origin", f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
    ]
    p.produce(topic, key=msg.key(), value=msg.value(), headers=headers)
    p.flush(10)


def decode_or_dead_letter(p: Producer, deadletter_topic: str, msg: Message, consumer_name: str) -> Envelope | None:
    """Decode a consumed record; an invalid one goes to the dead-letter topic (reason in headers)."""
    try:
        return codec.decode(msg.value())
    except codec.InvalidRecord as exc:
        dead_letter(p, deadletter_topic, msg, exc.reason, consumer_name)
        return None
