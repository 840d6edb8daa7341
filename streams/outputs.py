"""Sending the agent's outputs through librdkafka instead of Faust's aiokafka producer.

Every delivery yields three records (an event or two and a command). Profiling the worker under
``bench.streams`` showed aiokafka's pure-Python ``send`` (batch building, one future and loop
callback per record) as the biggest single cost after the decisions themselves. librdkafka
batches and talks to the broker on its own C threads; Python only hands it bytes.

``Outputs`` keeps the ``streams.agent.Send`` contract: ``await send(...)`` enqueues one record and
returns an awaitable that resolves when the broker acknowledged it (acks=all, idempotent: the
per-partition order of our outputs survives retries) or raises when it refused it. Delivery
reports arrive on one poller thread; they are handed to the event loop in bulk, one wake-up per
poll rather than one per record.

The producer uses the ``murmur2_random`` partitioner (``shipline.kafka``), the same as
aiokafka's default, so an app's outputs land on the partition number its state lives on.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message

from shipline import kafka

POLL = 0.05  # seconds the poller blocks waiting for delivery reports
FULL_QUEUE_PAUSE = 0.005  # seconds to wait when librdkafka's local queue is full
# The outputs of a batch go out together: wait at most 5 ms for company (as Faust's linger did).
PRODUCER = {"linger.ms": 5, "batch.num.messages": 10000, "socket.nagle.disable": True}


class Outputs:
    """An awaitable-per-record sender over one confluent producer (create inside the loop)."""

    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        self.loop = asyncio.get_running_loop()
        self.producer = kafka.producer(bootstrap, **{**PRODUCER, **overrides})
        self._reports: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="streams-outputs-poller", daemon=True)
        self._poller.start()

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()

        def delivered(err: KafkaError | None, msg: Message) -> None:  # on the poller thread
            with self._lock:
                self._reports.append((future, err))

        while True:
            try:
                self.producer.produce(
                    topic, key=key, value=value, headers=headers, on_delivery=delivered  # type: ignore[arg-type]
                )
                return future
            except BufferError:
                await asyncio.sleep(FULL_QUEUE_PAUSE)  # librdkafka's queue is full: let it drain
            except KafkaException as exc:
                future.set_exception(exc)
                return future

    def _poll(self) -> None:
        while not self._stopping.is_set():
            self.producer.poll(POLL)
            with self._lock:
                reports, self._reports = self._reports, []
            if reports:
                try:
                    self.loop.call_soon_threadsafe(_resolve, reports)
                except RuntimeError:  # the loop is closed: nobody waits for these any more
                    return

    def close(self, timeout: float = 5.0) -> None:
        """Stop polling and give librdkafka ``timeout`` seconds to deliver what it holds."""
        self._stopping.set()
        self._poller.join(POLL * 4)
        self.producer.flush(timeout)


def _resolve(reports: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, err in reports:
        if future.done():
            continue
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(KafkaException(err))
