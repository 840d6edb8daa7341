"""Waiting for Kafka's ack from many request threads at once.

``shipline.kafka.send_sync`` polls the producer from the calling thread in 50 ms slices. When the
16 threads of a gunicorn worker share one producer, another thread's ``poll`` often serves this
thread's delivery report while this thread sleeps out its slice: measured on this machine, p50
went from 3 ms to 44 ms. Here one poller thread per producer serves every delivery report as it
arrives and each request waits on its own event. The guarantees are send_sync's: the producer is
``shipline.kafka.producer`` (acks=all, idempotent), and anything but an ack within the timeout
raises ``shipline.kafka.NotDurable``.

The poller starts on the first send (after gunicorn's fork, never at import) and ends once
nothing has been in flight for a while, so short-lived apps in tests leave no thread behind.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message

from shipline import codec
from shipline.envelope import Envelope
from shipline.kafka import NotDurable

IDLE_EXIT = 5.0  # seconds without anything in flight before the poller thread ends


class Publisher:
    def __init__(self, producer: Any) -> None:
        self.producer = producer
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None

    def send(self, topic: str, envelopes: list[Envelope], timeout: float) -> list[tuple[int, int]]:
        """Produce ``envelopes`` and wait for every ack; (partition, offset) of each, in order."""
        done = threading.Event()
        results: list[tuple[int, int] | None] = [None] * len(envelopes)
        errors: list[str] = []
        remaining = [len(envelopes)]

        def report(index: int):  # type: ignore[no-untyped-def]
            def delivered(err: KafkaError | None, msg: Message) -> None:  # runs on the poller thread
                if err is not None:
                    errors.append(str(err))
                else:
                    results[index] = (int(msg.partition() or 0), int(msg.offset() or 0))
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

            return delivered

        for i, env in enumerate(envelopes):
            try:
                self.producer.produce(topic, key=env.key, value=codec.encode(env), on_delivery=report(i))
            except (BufferError, KafkaException) as exc:
                raise NotDurable(f"could not enqueue record: {exc}") from exc
        self._ensure_poller()
        if not done.wait(timeout):
            raise NotDurable(f"Kafka did not acknowledge within {timeout}s")
        if errors:
            raise NotDurable(f"Kafka refused the record: {errors[0]}")
        return [r for r in results if r is not None]

    def _ensure_poller(self) -> None:
        with self._lock:
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll, name="ingress-kafka-poller", daemon=True)
                self._poller.start()

    def _poll(self) -> None:
        idle_since: float | None = None
        while True:
            self.producer.poll(0.1)
            if len(self.producer) > 0:
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since >= IDLE_EXIT:
                with self._lock:
                    # a send enqueues before it takes the lock, so either it sees no poller and
                    # starts one, or this check sees its record in flight and keeps polling
                    if len(self.producer) == 0:
                        self._poller = None
                        return
