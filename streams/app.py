"""The Faust app: one deciding agent over ``inbound``, per-app state in a table.

``create_app(settings)`` builds it (nothing is created at import time). Topics are raw bytes
on both sides: our codec turns them into envelopes, Faust ``Record``s never touch the wire.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, cast

import faust
from aiokafka.partitioner import murmur2
from faust.serializers import codecs
from faust.tables.manager import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP

from shipline.config import Settings
from streams.agent import Send, Sequencer, StateStore, TableStore
from streams.outputs import Outputs
from streams.state import from_json, to_json

log = logging.getLogger("streams")

TABLE = "apps"
STATE_CODEC = "shipline_app_state"
# records decided per batch: its outputs are sent together, then acked, then its states saved and
# acked; two round trips per batch, so bigger batches amortise them (bench.streams drains in
# batches of ~1,000 when allowed)
BATCH = 2000
BATCH_WITHIN = 0.01  # seconds a partial batch waits for more records (bounds the added latency)
HEAL_EVERY = 3.0  # seconds between checks for records the transport fetched but never delivered


class StateCodec(codecs.Codec):
    """Table values as our own JSON (``streams.state.to_json``), not pickle or a Faust Record."""

    def _dumps(self, obj: Any) -> bytes:
        return to_json(obj)

    def _loads(self, s: bytes) -> Any:
        return from_json(s)


class AppStateTable(faust.Table):
    """A table whose changelog writes can be awaited: state is saved before inputs are acked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, key_type=bytes, **kwargs)
        self.value_serializer = STATE_CODEC  # read by the changelog topic, created lazily
        self._unacked: list[Any] = []

    def partition_for_key(self, key: Any) -> int:
        """The key's murmur2 partition: the app id's partition in inbound (computed here: the
        producer may not have the changelog's metadata yet)."""
        return (murmur2(key) & 0x7FFFFFFF) % self.partitions

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        self._unacked.append(fut)
        return fut

    async def flush_changelog(self) -> None:
        futures, self._unacked = self._unacked, []
        if futures:
            await asyncio.gather(*futures)


def _hard_exit(exc: BaseException) -> None:
    # Raising would let the stream ack the batch (Faust acks a ``take`` batch in a finally):
    # its offsets could then be committed although its outputs or state are not durable. A
    # process that dies here is just like a kill -9: the restart replays the batch.
    log.critical("stopping hard: %s", exc)
    logging.shutdown()
    os._exit(70)


def create_app(
    settings: Settings,
    *,
    store: StateStore | None = None,
    send: Send | None = None,
    on_fatal: Callable[[BaseException], None] = _hard_exit,
    await_recovery: bool = True,
) -> faust.App:
    """The streams app. ``store``/``send`` replace the table and producer (agent unit tests run
    it under Faust's ``test_context()``, where nothing is started and nothing recovers).

    Without ``send`` it must be called inside the running event loop: the outputs' producer
    resolves its acks on that loop."""
    codecs.register(STATE_CODEC, StateCodec())
    topics = settings.topics
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        f"{settings.topic_prefix}-streams",  # consumer group and changelog names: per prefix
        broker=f"kafka://{settings.bootstrap_servers}",
        datadir=str(settings.data_dir / "streams"),
        store="memory://",  # the changelog is the durable copy; recovery rebuilds it on start
        web_enabled=False,
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_allow_declare=False,  # topics are ours: created by ensure_topics / ensure_changelog
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        # PROCESSING GUARANTEE: at-least-once with deterministic ids, not Faust's exactly_once.
        # Every output id, time and sequence number derives from the input record and the state
        # it is decided from, outputs are acked before the state is saved, the state records the
        # input offset it applied, and inputs are acked only after both (streams/agent.py): a
        # replay after a crash re-sends identical records, which every consumer dedupes by id.
        # "Identical" also needs the replay to meet an app's records in the same order: that is
        # why reports come in on the inbound topic too (one partition per app, one order).
        # exactly_once would need a transactional producer per partition from aiokafka and
        # read_committed consumers everywhere else (confluent in the ingress, deployer,
        # projector); its Faust implementation is the least exercised path on a Kafka 4.0
        # broker, and a stuck transaction would stall every app on that partition.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_max_batch_size=512 * 1024,  # outputs of a batch go out in few requests
        producer_linger=0.005,  # ...and a batch waits at most 5 ms for company (latency budget)
        broker_session_timeout=10.0,  # a killed worker's apps move to a survivor within ~10 s
        broker_heartbeat_interval=1.0,
        broker_commit_interval=1.0,
        # Faust takes a partition out of its fetches while the agent's buffer is full and asks
        # again only after its fetch loop's 1 s wait on the partitions left: with the default
        # 4,096 the agent sat idle ~0.5 s of every ~1 s of backlog (bench.streams: 3,700/s with
        # gaps between batches of 500-650 ms). With 65,536 it is rare; the worker peaked at
        # 170 MB resident draining a 60,000-delivery backlog.
        stream_buffer_maxsize=65536,
        stream_wait_empty=True,  # on rebalance, finish (and ack) the batch in hand first
        # No standby copies: in faust-streaming 0.15 a standby promoted to active in the same
        # process waited forever for changelog records under load (the two-worker test). A
        # taken-over partition is recovered from its compacted changelog instead, in well under
        # a second for our per-app states.
        table_standby_replicas=0,
    )
    table = app.tables.add(
        AppStateTable(
            app,
            name=TABLE,
            default=None,
            beacon=app.tables.beacon,
            partitions=settings.partitions,
        )
    )
    source = app.topic(topics.inbound, key_serializer="raw", value_serializer="raw")
    outputs: Outputs | None = None
    if send is None:
        # the agent's outputs go through librdkafka (streams/outputs.py); the table's changelog
        # stays with Faust's own producer
        outputs = Outputs(settings.bootstrap_servers)
        send = outputs.send

    async def seek(topic: str, partition: int, offset: int) -> None:
        await app.consumer.seek(TP(topic, partition), offset)

    sequencer = Sequencer(topics, store or TableStore(table), send, None if outputs is None else seek)
    _keep_holes_unacked(app)
    app.sequencer = sequencer  # type: ignore[attr-defined]  # for tests and the benchmark
    app.outputs = outputs  # type: ignore[attr-defined]  # closed by streams.__main__ after app.stop()

    @app.agent(source, name="decide")
    async def decide_agent(stream: Any) -> None:
        async for events in stream.take_events(BATCH, within=BATCH_WITHIN):
            recovery = recovery_of(app)
            if await_recovery and not recovery.completed.is_set():  # Faust pauses inputs until
                await recovery.completed.wait()  # the table is recovered anyway; be sure
            try:
                await sequencer.handle([e.message for e in events])
            except BaseException as exc:  # never let the batch be acked (see _hard_exit)
                on_fatal(exc)
                raise

    @app.timer(HEAL_EVERY)
    async def refetch_dropped() -> None:
        await refetch_dropped_records(app, sequencer, {topics.inbound})

    return app


def recovery_of(app: faust.App) -> Recovery:
    return cast(TableManager, app.tables).recovery


def _keep_holes_unacked(app: faust.App) -> None:
    """Never count offsets the agent did not see as processed.

    faust-streaming 0.15 can drop input records it has already taken from aiokafka when a
    rebalance or recovery suspends the flow mid-batch (its fetch loop breaks off the batch, a
    cleared queue loses what it held). When the next record arrives it treats the missing
    offsets as a "gap" (meant for transaction markers) and acks them, so they could be
    committed without ever being decided: lost for good. Our inputs are written without
    transactions, so they have no legitimate holes: we keep the gaps unacked (the commit stops
    before them) and the agent fetches them again (``Sequencer.handle``, ``refetch_dropped``).
    """
    consumer = app.consumer

    async def _add_gap(tp: TP, offset_from: int, offset_to: int) -> None:
        log.warning("%s/%s: offsets %s..%s skipped by the transport; not acking them",
                    tp.topic, tp.partition, offset_from, offset_to - 1)

    consumer._add_gap = _add_gap  # type: ignore[attr-defined]


async def refetch_dropped_records(app: faust.App, sequencer: Sequencer, inputs: set[str]) -> None:
    """Fetch again what the transport dropped at the end of a partition.

    A hole followed by more records is caught by the agent itself; records dropped at the tail
    of a partition are not followed by anything. If a partition made no progress since the last
    check and aiokafka's position is past the next offset the agent expects, seek back to it.
    Records decided before are skipped by the per-app offsets (``decide.step``): a needless
    seek costs a re-read, never a duplicate.
    """
    recovery = recovery_of(app)
    if app.rebalancing or recovery.in_recovery or not recovery.completed.is_set():
        return
    consumer = app.consumer
    assigned = {tp for tp in consumer.assignment() if tp.topic in inputs}
    for key in [k for k in sequencer.next_offsets if TP(*k) not in assigned]:
        del sequencer.next_offsets[key]
    committed = getattr(consumer, "_committed_offset", {})
    for tp in sorted(assigned):
        expected = sequencer.next_offsets.get((tp.topic, tp.partition))
        if expected is None:
            expected = committed.get(tp) or 0
        stalled = sequencer.checked.get((tp.topic, tp.partition)) == expected
        sequencer.checked[(tp.topic, tp.partition)] = expected
        if not stalled:
            continue
        position = await consumer.position(tp)
        if position is not None and position > expected:
            log.warning("%s/%s: consumer is at %s but the agent expected %s next; fetching again from %s",
                        tp.topic, tp.partition, position, expected, expected)
            await consumer.seek(tp, expected)


def changelog_topic(app: faust.App) -> str:
    return str(app.tables[TABLE].changelog_topic.get_topic_name())


def ensure_changelog(settings: Settings, app: faust.App, timeout: float = 60.0) -> None:
    """Create the table's compacted changelog topic (broker auto-creation is off)."""
    import time

    from confluent_kafka.admin import AdminClient, NewTopic

    name = changelog_topic(app)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    deadline = time.monotonic() + timeout
    while name not in admin.list_topics(timeout=10).topics:
        fut = admin.create_topics(
            [NewTopic(name, num_partitions=settings.partitions, replication_factor=1,
                      config={"cleanup.policy": "compact"})]
        )[name]
        try:
            fut.result(timeout=30)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc) and time.monotonic() > deadline:
                raise
            time.sleep(0.2)

