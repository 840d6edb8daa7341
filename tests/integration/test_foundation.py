"""The foundation's promises on the real broker: CloudEvents through Kafka, a Faust agent,
dead-lettering of malformed records with the reason."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from shipline import codec, kafka
from shipline.envelope import wrap
from shipline.messages import BuildQueued, DeployRequested
from shipline.topics import Topics

pytestmark = pytest.mark.integration


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list:
    c = kafka.consumer(bootstrap, f"reader-{time.monotonic_ns()}", [topic])
    got = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < expected and time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is not None and msg.error() is None:
                got.append(msg)
    finally:
        c.close()
    return got


def queued(app_id: int, build: int = 1) -> BuildQueued:
    return BuildQueued(app_id=app_id, build=build, commit="c" * 40, message="m", author="a", ref="main",
                       delivery_id=f"d-{app_id}-{build}", repo_url="file:///repo")


def test_cloudevent_through_the_real_broker_is_consumed_and_validated(kafka_bootstrap: str, topics: Topics) -> None:
    p = kafka.producer(kafka_bootstrap)
    envs = [wrap(queued(app), source="test", sequence=1) for app in (1, 2, 3)]
    positions = kafka.send_many_sync(p, topics.events, envs)
    assert len(positions) == 3
    msgs = read_all(kafka_bootstrap, topics.events, 3)
    decoded = {codec.decode(m.value(), strict=True).id: m for m in msgs}
    assert set(decoded) == {e.id for e in envs}
    for env in envs:
        msg = decoded[env.id]
        assert msg.key() == str(env.app_id).encode()  # keyed by app id


def test_same_app_lands_on_the_same_partition_of_every_topic(kafka_bootstrap: str, topics: Topics) -> None:
    p = kafka.producer(kafka_bootstrap)
    a = kafka.send_sync(p, topics.inbound, wrap(queued(42), source="t"))
    b = kafka.send_sync(p, topics.events, wrap(queued(42, 2), source="t", sequence=1))
    assert a[0] == b[0]


def test_malformed_record_goes_to_the_dead_letter_topic_with_the_reason(kafka_bootstrap: str, topics: Topics) -> None:
    p = kafka.producer(kafka_bootstrap)
    p.produce(topics.events, key=b"7", value=b'{"specversion": "1.0", "type": "nope"}')
    good = wrap(queued(7), source="test", sequence=1)
    kafka.send_sync(p, topics.events, good)
    c = kafka.consumer(kafka_bootstrap, f"g-{topics.prefix}", [topics.events])
    decoded = []
    deadline = time.monotonic() + 60
    seen = 0
    while seen < 2 and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is None or msg.error():
            continue
        seen += 1
        env = kafka.decode_or_dead_letter(p, topics.deadletter, msg, "test-consumer")
        if env:
            decoded.append(env)
        c.commit(msg)
    c.close()
    assert [e.id for e in decoded] == [good.id]  # the consumer kept going past the bad record
    (dead,) = read_all(kafka_bootstrap, topics.deadletter, 1)
    headers = dict(dead.headers())
    assert dead.value() == b'{"specversion": "1.0", "type": "nope"}'
    assert b"unknown type 'nope'" in headers["x-shipline-reason"]
    assert headers["x-shipline-consumer"] == b"test-consumer"
    assert headers["x-shipline-origin"].startswith(topics.events.encode())


def test_a_faust_agent_on_the_real_broker_turns_one_record_into_another(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    import faust

    app = faust.App(f"foundation-{topics.prefix}", broker=f"kafka://{kafka_bootstrap}", web_enabled=False,
                    datadir=str(tmp_path),
                    topic_allow_declare=False, topic_disable_leader=True, store="memory://")
    source = app.topic(topics.inbound, value_serializer="raw", key_serializer="raw")
    sink = app.topic(topics.events, value_serializer="raw", key_serializer="raw")

    @app.agent(source)
    async def translate(stream):  # type: ignore[no-untyped-def]
        async for key, value in stream.items():
            env = codec.decode(value)
            q = env.data
            out = wrap(DeployRequested(app_id=q.app_id, revision=1, image=f"app:{q.build}", commit=q.commit,
                                       trigger="webhook"), source="faust-test", causationid=env.id,
                       correlationid=env.correlationid, sequence=1)
            await sink.send(key=key, value=codec.encode(out))

    p = kafka.producer(kafka_bootstrap)
    incoming = wrap(queued(9, build=4), source="test")
    kafka.send_sync(p, topics.inbound, incoming)

    async def run() -> None:
        worker_task = asyncio.ensure_future(app.start())
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                msgs = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: read_all(kafka_bootstrap, topics.events, 1, timeout=2))
                if msgs:
                    out = codec.decode(msgs[0].value(), strict=True)
                    assert out.type == "deploy.requested" and out.causationid == incoming.id
                    assert out.data.image == "app:4"
                    return
            raise AssertionError("the agent produced nothing within 90s")
        finally:
            await app.stop()
            worker_task.cancel()

    asyncio.run(run())
