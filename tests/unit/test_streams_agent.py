"""The deciding agent under Faust's test_context(), with the table and producer injected."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from shipline import codec
from shipline.config import load
from shipline.envelope import wrap
from shipline.messages import BuildFinished, DeliveryReceived, DeployHookCreated, RegisterApp
from shipline.topics import Topics
from streams.agent import Fatal, MemoryStore, Sequencer
from streams.app import StateCodec, create_app
from streams.state import AppState

pytestmark = pytest.mark.unit


class Recorder:
    """A producer stand-in: records what was sent, acks at once (or fails when told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes | None, bytes, Any]] = []
        self.fail = fail

    async def __call__(self, topic: str, key: bytes | None, value: bytes, headers: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(RuntimeError("broker gone"))
        else:
            self.sent.append((topic, key, value, headers))
            fut.set_result(None)
        return fut

    def on(self, topic: str) -> list[tuple[str, bytes | None, bytes, Any]]:
        return [s for s in self.sent if s[0] == topic]


def register(app_id: int) -> bytes:
    return codec.encode(wrap(RegisterApp(app_id=app_id, name=f"a{app_id}", namespace="n", repo_url="file:///r",
                                         request_id=f"r{app_id}"), source="t"))


def push(app_id: int, delivery_id: str) -> bytes:
    body = json.dumps({"ref": "refs/heads/main", "after": "a" * 40,
                       "head_commit": {"id": "a" * 40, "message": "m", "author": {"name": "n"}}})
    return codec.encode(wrap(DeliveryReceived(app_id=app_id, delivery_id=delivery_id, source="github", route="/",
                                              event="push", headers={}, body=body, body_encoding="utf8",
                                              verification="hmac", received_at="2026-01-01T00:00:00Z"), source="t"))


async def until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_agent_decides_sequences_and_dead_letters_under_test_context(tmp_path: Path) -> None:
    settings = load({"SHIPLINE_DATA_DIR": str(tmp_path), "SHIPLINE_ADMIN_TOKEN": "x", "SHIPLINE_SECRET_KEY": "x",
                     "SHIPLINE_TOPIC_PREFIX": "unit"})
    sent, store, fatal = Recorder(), MemoryStore(), []

    async def scenario() -> None:
        app = create_app(settings, store=store, send=sent, on_fatal=fatal.append, await_recovery=False)
        misplaced = register(6)
        async with app.agents["decide"].test_context() as agent:
            await agent.put(register(5), key=b"5")
            await agent.put(b"not json at all", key=b"5")
            await agent.put(misplaced, key=b"5")  # wrong key: its state lives elsewhere
            await agent.put(push(5, "d1"), key=b"5")
            await agent.put(push(5, "d1"), key=b"5")  # redelivery
            await until(lambda: len(sent.on("unit.events")) >= 4)
        events = [codec.decode(v) for _, _, v, _ in sent.on("unit.events")]
        assert [e.type for e in events] == ["app.registered", "delivery.accepted", "build.queued",
                                            "delivery.duplicate"]
        assert [e.sequence for e in events] == [1, 2, 3, 4]
        assert [codec.decode(v).type for _, _, v, _ in sent.on("unit.commands")] == ["build.image"]
        dead = sent.on("unit.deadletter")
        assert [d[2] for d in dead] == [b"not json at all", misplaced]
        reasons = [dict(d[3])["x-shipline-reason"].decode() for d in dead]
        assert "not JSON" in reasons[0] and "not the app id" in reasons[1]
        assert store.states[b"5"].builds == 1 and store.states[b"5"].sequence == 4
        assert fatal == []

    asyncio.run(scenario())


class Msg:
    def __init__(self, topic: str, offset: int, key: bytes, value: bytes) -> None:
        self.topic, self.partition, self.offset, self.key, self.value = topic, 0, offset, key, value


def test_outputs_not_acked_means_no_state_is_saved() -> None:
    topics = Topics("u")
    store = MemoryStore()
    seq = Sequencer(topics, store, Recorder(fail=True))
    with pytest.raises(Fatal):
        asyncio.run(seq.handle([Msg(topics.inbound, 0, b"5", register(5))]))
    assert store.states == {}  # a restart replays the record from the old state


def test_a_batch_saves_each_app_once_with_the_offsets_it_applied() -> None:
    topics = Topics("u")
    store, sent = MemoryStore(), Recorder()
    seq = Sequencer(topics, store, sent)
    asyncio.run(seq.handle([Msg(topics.inbound, 10, b"5", register(5)), Msg(topics.inbound, 11, b"5", push(5, "x")),
                            Msg(topics.inbound, 3, b"6", register(6))]))
    assert store.states[b"5"].positions == {"inbound": 11} and store.states[b"6"].positions == {"inbound": 3}
    before = len(sent.sent)
    asyncio.run(seq.handle([Msg(topics.inbound, 11, b"5", push(5, "x"))]))  # replayed after a crash
    assert len(sent.sent) == before


def built(app_id: int, build: int, commit: str) -> bytes:
    """The deployer's report that a build succeeded (it travels on inbound, like every input)."""
    return codec.encode(wrap(BuildFinished(app_id=app_id, build=build, commit=commit, status="succeeded", exit_code=0,
                                           image_id="sha256:1", tags=[f"a{app_id}:{build}"], duration=1.0, log="",
                                           log_path="/l"), source="shipline/deployer"))


def test_reports_on_the_input_topic_are_decided_and_other_events_are_dead_lettered() -> None:
    topics = Topics("u")
    store, sent = MemoryStore(), Recorder()
    forged = codec.encode(wrap(DeployHookCreated(app_id=5, hook_id="h", name="n", token_hash="x" * 64,
                                                 token_prefix="x"), source="t"))
    asyncio.run(Sequencer(topics, store, sent).handle([
        Msg(topics.inbound, 0, b"5", register(5)), Msg(topics.inbound, 1, b"5", push(5, "d1")),
        Msg(topics.inbound, 2, b"5", built(5, 1, "a" * 40)), Msg(topics.inbound, 3, b"5", forged)]))
    events = [codec.decode(v) for _, _, v, _ in sent.on(topics.events)]
    assert [e.type for e in events] == ["app.registered", "delivery.accepted", "build.queued", "build.finished",
                                        "deploy.requested"]
    assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    assert [codec.decode(v).type for _, _, v, _ in sent.on(topics.commands)] == ["build.image", "deploy.release"]
    (dead,) = sent.on(topics.deadletter)
    assert dead[2] == forged  # only streams writes events: one arriving as input is refused, kept
    assert "does not consume 'deploy_hook.created'" in dict(dead[3])["x-shipline-reason"].decode()
    assert store.states[b"5"].positions == {"inbound": 2}  # a dead letter is not an applied input


class UnsavedStore(MemoryStore):
    """A table whose changelog write never lands: the process is killed after publishing."""

    def __init__(self) -> None:
        super().__init__()
        self.staged: dict[bytes, AppState] = {}

    def put(self, key: bytes, state: AppState) -> None:
        self.staged[key] = state

    async def flush(self) -> None:
        raise RuntimeError("killed before the state was saved")


def test_a_batch_published_but_not_saved_is_replayed_byte_for_byte() -> None:
    """Kill between "outputs acked" and "state saved": the restart decides the same records, in the
    same order (one input partition per app), from the same state, and re-sends the same bytes."""
    topics = Topics("u")
    batch = [Msg(topics.inbound, 0, b"5", register(5)), Msg(topics.inbound, 1, b"5", push(5, "d1")),
             Msg(topics.inbound, 2, b"5", built(5, 1, "a" * 40)), Msg(topics.inbound, 3, b"5", push(5, "d2"))]
    killed, first = UnsavedStore(), Recorder()
    with pytest.raises(Fatal):
        asyncio.run(Sequencer(topics, killed, first).handle(batch))
    assert killed.states == {} and len(first.sent) == 10
    store, again = MemoryStore(), Recorder()
    asyncio.run(Sequencer(topics, store, again).handle(batch[:2]))  # Faust may batch the replay differently
    asyncio.run(Sequencer(topics, store, again).handle(batch[2:]))
    assert again.sent == first.sent
    assert store.states[b"5"] == killed.staged[b"5"]


def test_table_values_are_our_json() -> None:
    state = AppState(app_id=3, sequence=9, positions={"inbound": 4})
    raw = StateCodec()._dumps(state)
    assert json.loads(raw)["sequence"] == 9
    assert StateCodec()._loads(raw) == state


def test_a_hole_in_an_input_partition_is_fetched_again_not_skipped() -> None:
    """faust-streaming can drop fetched records around a recovery: never decide past a hole."""
    topics = Topics("u")
    store, sent, seeks = MemoryStore(), Recorder(), []

    async def seek(topic: str, partition: int, offset: int) -> None:
        seeks.append((topic, partition, offset))

    seq = Sequencer(topics, store, sent, seek)
    first = [Msg(topics.inbound, 0, b"5", register(5)), Msg(topics.inbound, 1, b"5", push(5, "a"))]
    asyncio.run(seq.handle(first))
    later = [Msg(topics.inbound, 4, b"5", push(5, "d")), Msg(topics.inbound, 5, b"5", push(5, "e"))]
    asyncio.run(seq.handle(later))  # offsets 2 and 3 never arrived
    assert seeks == [(topics.inbound, 0, 2)]
    assert store.states[b"5"].builds == 1 and store.states[b"5"].positions == {"inbound": 1}
    again = [Msg(topics.inbound, n, b"5", push(5, f"x{n}")) for n in (2, 3, 4, 5)]
    asyncio.run(seq.handle(again))
    assert store.states[b"5"].builds == 5 and store.states[b"5"].positions == {"inbound": 5}
    assert seeks == [(topics.inbound, 0, 2)]


def test_recovery_watch_fires_only_without_progress() -> None:
    from streams.__main__ import RecoveryWatch

    w = RecoveryWatch(limit=10)
    assert not w.stalled(True, 100, 0.0)
    assert not w.stalled(True, 50, 8.0)  # progress restarts the clock
    assert not w.stalled(True, 50, 17.0)
    assert w.stalled(True, 50, 18.5)
    assert not w.stalled(False, 0, 19.0)
    assert not w.stalled(True, 50, 30.0)
