"""``python -m streams`` on the real broker: decisions, gap-free sequences, kill -9, hand-over."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from confluent_kafka.admin import AdminClient

from shipline import kafka
from shipline.config import Settings
from shipline.envelope import wrap
from shipline.messages import BuildFinished, DeliveryReceived, Deployed, RequestDeploy
from tests.integration.test_streams_kit import (
    Reader,
    Worker,
    check_sequences,
    hook,
    produce,
    push,
    register,
)

pytestmark = pytest.mark.integration


def test_worker_turns_requests_deliveries_and_reports_into_sequenced_events(settings: Settings) -> None:
    t = settings.topics
    worker = Worker(settings, "a")
    reader = Reader(settings, [t.events, t.commands, t.deadletter])
    try:
        produce(settings, t.inbound, [register(1), register(2), push(1, "d-1"), push(2, "d-2"), push(1, "d-1"),
                                      hook(2, "h-1", "registry.local/app2:v1"),
                                      hook(2, "h-2", "registry.local/app2:v2")])
        p = kafka.producer(settings.bootstrap_servers)
        p.produce(t.inbound, key=b"1", value=b"{definitely not a cloudevent")
        p.flush(10)

        def types(app_id: int) -> list[str]:
            evs = sorted((e for e in reader.distinct(t.events).values() if e.app_id == app_id),
                         key=lambda e: e.sequence or 0)
            return [e.type for e in evs]

        reader.until(lambda: len(types(1)) >= 4 and len(types(2)) >= 7
                     and any(r[0] == t.deadletter for r in reader.records), "first decisions", workers=[worker])
        assert types(1) == ["app.registered", "delivery.accepted", "build.queued", "delivery.duplicate"]
        assert types(2) == ["app.registered", "delivery.accepted", "build.queued", "delivery.accepted",
                            "deploy.requested", "delivery.accepted", "deploy.requested"]  # the second one waits
        dead = [r for r in reader.records if r[0] == t.deadletter]
        assert dead[0][2] == b"{definitely not a cloudevent"
        assert b"not JSON" in dict(dead[0][3])["x-shipline-reason"]

        # The deployer reports: build 1 of app 1 succeeded -> deploy; app 2's revision 1 deployed
        # -> the waiting revision 2 is released (latest wins).
        build_cmd = next(c for c in reader.envelopes(t.commands) if c.type == "build.image" and c.app_id == 1)
        produce(settings, t.inbound, [
            wrap(BuildFinished(app_id=1, build=1, commit=build_cmd.data.commit, status="succeeded", exit_code=0,
                               image_id="sha256:1", tags=["app1:1-c0ffeec"], duration=1.0, log="", log_path="/l"),
                 source="deployer", causationid=build_cmd.id, correlationid=build_cmd.correlationid),
            wrap(Deployed(app_id=2, revision=1, image="registry.local/app2:v1", commit="", instances=["i1"],
                          duration=1.0, url="http://127.0.0.1:8000"), source="deployer"),
        ])

        def commands(app_id: int) -> list[tuple[str, int]]:
            return [(c.type, getattr(c.data, "revision", getattr(c.data, "build", 0)))
                    for c in reader.distinct(t.commands).values() if c.app_id == app_id]

        reader.until(lambda: ("deploy.release", 1) in commands(1) and ("deploy.release", 2) in commands(2),
                     "deploy.release for the finished build and the waiting revision", workers=[worker])
        assert types(1)[4:] == ["build.finished", "deploy.requested"]
        assert types(2)[7:] == ["deployed"]
        assert sorted(commands(2)) == [("build.image", 1), ("deploy.release", 1), ("deploy.release", 2)]
        events = reader.distinct(t.events)
        check_sequences(events)
        requested = next(e for e in events.values() if e.type == "deploy.requested" and e.app_id == 1)
        assert requested.correlationid == "d-1" and requested.data.trigger == "webhook"
        assert requested.data.image == "app1:1-c0ffeec"
        assert worker.stop() < 10  # SIGTERM stops it within 10 s
        assert worker.proc.returncode == 0, worker.tail()
    finally:
        worker.stop()
        reader.close()


def test_worker_decides_jobs_rollbacks_supersedes_and_rejections(settings: Settings) -> None:
    t = settings.topics
    worker = Worker(settings, "b")
    reader = Reader(settings, [t.events, t.commands])

    def deployed(revision: int) -> object:
        return wrap(Deployed(app_id=3, revision=revision, image=f"registry.local/app3:v{revision}", commit="",
                             instances=["i"], duration=1.0, url=""), source="deployer")

    job = wrap(DeliveryReceived(app_id=4, delivery_id="job-1", source="shipmight", route="/api/v1/dh", event="job",
                                headers={}, body=json.dumps({"instanceEnvironmentVariables": [
                                    {"name": "TASK", "value": "reindex"}]}),
                                body_encoding="utf8", verification="deploy_hook",
                                received_at="2026-01-01T00:00:00Z"), source="test")
    try:
        # Reports share the input topic: one produce call fixes the order the deployer's report is
        # decided in (after both requests), with no wait in between.
        produce(settings, t.inbound, [register(3), register(4, kind="job", image="registry.local/batch:7"), job]
                + [hook(3, f"v{n}", f"registry.local/app3:v{n}") for n in (1, 2)]
                + [deployed(1)])  # v2 is released once v1 is live
        reader.until(lambda: any(c.type == "deploy.release" and c.data.revision == 2
                                 for c in reader.envelopes(t.commands)), "revision 2 released", workers=[worker])
        produce(settings, t.inbound, [deployed(2)])
        reader.until(lambda: sum(e.type == "deployed" for e in reader.envelopes(t.events)) == 2,
                     "revision 2 live", workers=[worker])
        produce(settings, t.inbound, [
            wrap(RequestDeploy(app_id=3, request_id="rb-1", trigger="rollback"), source="test"),
            hook(3, "v4", "registry.local/app3:v4"), hook(3, "v5", "registry.local/app3:v5"),
            wrap(RequestDeploy(app_id=3, request_id="rb-9", trigger="rollback", revision=99), source="test"),
        ])
        reader.until(lambda: any(e.type == "request.rejected" for e in reader.envelopes(t.events)),
                     "the impossible rollback refused", workers=[worker])
        events = reader.distinct(t.events)
        check_sequences(events)
        app3 = sorted((e for e in events.values() if e.app_id == 3), key=lambda e: e.sequence or 0)
        rollback = next(e for e in app3 if e.type == "deploy.requested" and e.data.trigger == "rollback")
        assert rollback.correlationid == "rb-1" and rollback.data.image == "registry.local/app3:v1"
        assert rollback.data.revision == 3
        superseded = [e.data for e in app3 if e.type == "deploy.superseded"]
        assert [(d.revision, d.superseded_by) for d in superseded] == [(4, 5)]  # v4 waited behind the rollback
        rejected = next(e for e in app3 if e.type == "request.rejected")
        assert rejected.correlationid == "rb-9" and "99" in rejected.data.reason
        runs = [c for c in reader.envelopes(t.commands) if c.type == "job.run"]
        assert len(runs) == 1 and runs[0].data.env == {"TASK": "reindex"}
        assert runs[0].data.image == "registry.local/batch:7" and runs[0].correlationid == "job-1"
        releases = sorted({c.data.revision for c in reader.envelopes(t.commands)
                           if c.type == "deploy.release" and c.app_id == 3})
        assert releases == [1, 2, 3]  # 5 waits for the rollback (3) to finish; 4 was superseded
    finally:
        worker.stop()
        reader.close()


def _pushes(apps: int, per_app: int, prefix: str) -> list:  # type: ignore[type-arg]
    # interleaved across apps, as webhooks arrive
    return [push(a, f"{prefix}-{a}-{i}", sha=f"{i + 1:040x}") for i in range(per_app) for a in range(1, apps + 1)]


def _check_nothing_lost_or_doubled(reader: Reader, settings: Settings, apps: int, per_app: int) -> None:
    t = settings.topics
    events = reader.distinct(t.events)
    by_app = check_sequences(events)  # gap-free, no sequence number used by two distinct events
    commands = reader.distinct(t.commands)
    for app_id in range(1, apps + 1):
        evs = by_app[app_id]
        kinds = Counter(e.type for e in evs)
        assert kinds == {"app.registered": 1, "delivery.accepted": per_app, "build.queued": per_app}, (app_id, kinds)
        builds = sorted(e.data.build for e in evs if e.type == "build.queued")
        assert builds == list(range(1, per_app + 1)), f"app {app_id} build numbers {builds[:20]}"
        deliveries = sorted(e.data.delivery_id for e in evs if e.type == "build.queued")
        assert len(set(deliveries)) == per_app
        cmds = sorted(c.data.build for c in commands.values() if c.app_id == app_id)
        assert cmds == list(range(1, per_app + 1)), f"app {app_id} build.image commands {cmds[:20]}"


def _produce_in_background(settings: Settings, envs: list, chunk: int = 100, pause: float = 0.05) -> threading.Thread:  # type: ignore[type-arg]
    def run() -> None:
        for i in range(0, len(envs), chunk):
            produce(settings, settings.topics.inbound, envs[i:i + chunk])
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_kill_9_under_load_then_restart_loses_and_doubles_nothing(settings: Settings) -> None:
    t = settings.topics
    apps, per_app = 12, 100
    produce(settings, t.inbound, [register(a) for a in range(1, apps + 1)])
    reader = Reader(settings, [t.events, t.commands])
    workers = [Worker(settings, "first")]
    try:
        loader = _produce_in_background(settings, _pushes(apps, per_app, "k"))
        total = apps * (1 + 2 * per_app)
        for n, fraction in enumerate((0.2, 0.5)):  # two hard kills while pushes keep arriving
            reader.until(lambda f=fraction: len(reader.distinct(t.events)) >= total * f, f"{fraction:.0%} decided",
                         workers=workers)
            workers[-1].kill9()
            workers.append(Worker(settings, f"restart{n}"))
        loader.join(120)
        reader.until(lambda: len(reader.distinct(t.events)) >= total
                     and len(reader.distinct(t.commands)) >= apps * per_app, "every push decided", workers=workers)
        reader.poll(2)  # anything doubled would show up now
        _check_nothing_lost_or_doubled(reader, settings, apps, per_app)
        resent = len(reader.envelopes(t.events)) - len(reader.distinct(t.events))
        print(f"identical re-sends after the kills: {resent}")
    finally:
        for w in workers:
            w.stop()
        reader.close()


def _members(settings: Settings) -> int:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    group = f"{settings.topic_prefix}-streams"
    desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return len(desc.members) if str(desc.state).endswith("STABLE") else -1


def test_two_workers_share_partitions_and_a_survivor_takes_over(settings: Settings) -> None:
    t = settings.topics
    apps, per_app = 12, 60
    produce(settings, t.inbound, [register(a) for a in range(1, apps + 1)])
    reader = Reader(settings, [t.events, t.commands])
    a, b = Worker(settings, "a"), Worker(settings, "b")
    try:
        reader.until(lambda: _members(settings) == 2, "both workers in the group", workers=[a, b])
        reader.until(lambda: len(reader.distinct(t.events)) >= apps, "registrations decided", workers=[a, b])
        loader = _produce_in_background(settings, _pushes(apps, per_app, "h"))
        total = apps * (1 + 2 * per_app)
        reader.until(lambda: len(reader.distinct(t.events)) >= total * 0.3, "30% decided", workers=[a, b])
        a.kill9()
        loader.join(120)
        reader.until(lambda: len(reader.distinct(t.events)) >= total
                     and len(reader.distinct(t.commands)) >= apps * per_app, "the survivor decides the rest",
                     workers=[a, b])
        assert _members(settings) == 1
        assert b.proc.poll() is None
        reader.poll(2)
        _check_nothing_lost_or_doubled(reader, settings, apps, per_app)
    finally:
        a.stop()
        b.stop()
        reader.close()
