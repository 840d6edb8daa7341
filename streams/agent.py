"""The deciding loop: decode a batch of input records, ``step`` each, publish, then save state.

Processing guarantee: **at-least-once with deterministic ids** (configured in ``streams/app.py``).
For every batch the order is fixed:

1. decide every record from the state in the table (``streams.decide.step``: pure);
2. send every output (events sequenced per app, commands, dead letters) and wait for Kafka's
   acks (acks=all);
3. write the new per-app states to the changelog-backed table and wait for those acks too;
4. only then are the input records acked, so Faust may commit their offsets.

A kill -9 between 2 and 3 replays the batch from the old state: ``decide`` is pure and ids,
times and sequence numbers derive from the cause and the state, so the re-sent records are
byte-identical copies that consumers drop by id. A kill between 3 and 4 replays records the
saved state has already applied; the state records the input offset it applied and ``step``
skips them. Nothing is skipped.

The replay is identical only if it decides an app's records in the order the first run did.
That is why streams has **one input topic**: requests, deliveries *and* the deployer's and
dispatcher's reports all go to ``inbound``, keyed by app id, so an app's inputs are one
partition in one order. (Until this was so, reports had their own topic; after a restart Faust
could interleave an app's two partitions differently, and a record then took a sequence number
and a revision the first run had already given another record's output.)

Limit: with at-least-once nothing fences a *zombie* (a worker that stalls past its session
timeout, loses its partitions, then wakes and writes once more); Kafka transactions would. A
killed, stopped or crashed worker writes nothing after it is gone, which is what the tests show.

Dependencies (where states live, how records are sent) are injected, so the loop runs the same
against Faust's table and producer or against in-memory fakes in unit tests.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

from shipline import codec
from shipline.codec import InvalidRecord
from shipline.topics import Topics
from streams.decide import REPORT_TYPES, is_event, step
from streams.state import AppState

log = logging.getLogger("streams.agent")
CONSUMER_NAME = "streams"

Send = Callable[[str, bytes | None, bytes, list[tuple[str, bytes]] | None], Awaitable[Awaitable[Any]]]
Seek = Callable[[str, int, int], Awaitable[None]]  # (topic, partition, offset): fetch again from there


class StateStore(Protocol):
    def get(self, key: bytes) -> AppState | None: ...

    def put(self, key: bytes, state: AppState) -> None: ...

    async def flush(self) -> None:
        """Return once every ``put`` so far is durable."""


class Fatal(RuntimeError):
    """Kafka refused our outputs: stop without acking anything, a restart replays the batch."""


class Sequencer:
    def __init__(self, topics: Topics, store: StateStore, send: Send, seek: Seek | None = None) -> None:
        self.topics = topics
        self.store = store
        self.send = send
        self.seek = seek
        self.processed = 0
        self.dead_lettered = 0
        self.replayed = 0
        self.last_batch = 0.0  # time.monotonic() of the last batch handled
        self.next_offsets: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset expected
        self.checked: dict[tuple[str, int], int] = {}  # next_offsets when last checked for drops

    async def _dead_letter(self, message: Any, reason: str, pending: list[Awaitable[Any]]) -> None:
        log.warning("dead-lettering %s/%s/%s: %s", message.topic, message.partition, message.offset, reason)
        headers = [
            ("x-shipline-reason", reason[:2000].encode()),
            ("x-shipline-consumer", CONSUMER_NAME.encode()),
            ("x-shipline-origin", f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        pending.append(await self.send(self.topics.deadletter, message.key, message.value or b"", headers))
        self.dead_lettered += 1

    async def handle(self, messages: Iterable[Any]) -> None:
        """Process one batch of Faust messages (``event.message``): see the module docstring."""
        pending: list[Awaitable[Any]] = []
        touched: dict[bytes, AppState] = {}
        count = 0
        held: dict[tuple[str, int], int] = {}  # partitions with a hole: fetched again from there
        for message in messages:
            tp = (message.topic, message.partition)
            if tp in held:
                continue
            expected = self.next_offsets.get(tp)
            if self.seek is not None and expected is not None and message.offset > expected:
                # Our inputs are written without transactions: their offsets have no holes. A
                # hole means the transport dropped records (see streams.app); deciding past it
                # would make the per-app offsets skip them for good, so we fetch them again.
                log.warning("%s/%s: got offset %s but expected %s; fetching again from %s",
                            message.topic, message.partition, message.offset, expected, expected)
                held[tp] = expected
                continue
            count += 1
            self.next_offsets[tp] = message.offset + 1
            try:
                env = codec.decode(message.value)
            except InvalidRecord as exc:
                await self._dead_letter(message, exc.reason, pending)
                continue
            if message.key != env.key:
                await self._dead_letter(message, f"record key {message.key!r} is not the app id {env.key!r}", pending)
                continue
            if env.data.KIND == "command" or (env.data.KIND == "event" and env.type not in REPORT_TYPES):
                await self._dead_letter(message, f"streams does not consume {env.type!r} records", pending)
                continue
            state = touched.get(env.key) or self.store.get(env.key) or AppState(app_id=env.app_id)
            try:
                new_state, outputs = step(state, env, message.offset)
            except Exception as exc:  # a bug for one record must not stop every app
                log.exception("cannot decide %s", env.id)
                await self._dead_letter(message, f"cannot decide: {exc!r}", pending)
                continue
            if new_state is state:  # applied before a crash: its outputs were published then
                self.replayed += 1
                log.info("skipping %s/%s/%s: app %s already applied offset %s", message.topic, message.partition,
                         message.offset, env.app_id, state.positions)
            touched[env.key] = new_state
            for out in outputs:
                topic = self.topics.events if is_event(out) else self.topics.commands
                pending.append(await self.send(topic, out.key, codec.encode(out), None))
        try:
            await asyncio.gather(*pending)
        except Exception as exc:
            raise Fatal(f"Kafka did not acknowledge our outputs: {exc!r}") from exc
        for key, state in touched.items():
            self.store.put(key, state)
        try:
            await self.store.flush()
        except Exception as exc:
            raise Fatal(f"Kafka did not acknowledge the state changelog: {exc!r}") from exc
        self.processed += count
        self.last_batch = time.monotonic()
        for (topic, partition), offset in held.items():
            await self.seek(topic, partition, offset)  # type: ignore[misc]  # held only with a seek


class TableStore:
    """``StateStore`` over a Faust table whose changelog writes we can wait for."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def get(self, key: bytes) -> AppState | None:
        return self.table.get(key)

    def put(self, key: bytes, state: AppState) -> None:
        self.table[key] = state

    async def flush(self) -> None:
        await self.table.flush_changelog()


class MemoryStore:
    """``StateStore`` in a dict (unit tests, benchmarks of the pure path)."""

    def __init__(self) -> None:
        self.states: dict[bytes, AppState] = {}

    def get(self, key: bytes) -> AppState | None:
        return self.states.get(key)

    def put(self, key: bytes, state: AppState) -> None:
        self.states[key] = state

    async def flush(self) -> None:
        return None
