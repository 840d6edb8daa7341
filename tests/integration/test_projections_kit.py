"""Shared helpers of the projections tests (no tests here): a ``Story`` that writes sequenced
events the way streams would (deterministic ids, correlation and causation ids, a controlled
clock), producing to the real events topic, running the projector in a thread, waiting until it
caught up, reading a topic back, and serving the public Flask app on a real port."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from projections.projector import Projector, lag
from shipline import kafka
from shipline import messages as m
from shipline.config import Settings
from shipline.envelope import Envelope, derive_id, wrap

T0 = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)


def iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


class Story:
    """Events as streams writes them: one per clock tick, per-app sequence, ids derived from the cause."""

    def __init__(self, start: datetime = T0, tag: str = "story") -> None:
        self.clock = start
        self.tag = tag
        self.seq: dict[int, int] = defaultdict(int)
        self.envs: list[Envelope] = []

    def at(self) -> datetime:
        return self.clock

    def emit(self, msg: m.Message, *, correlation: str | None = None, cause: Envelope | None = None,
             source: str = "shipline.streams") -> Envelope:
        self.seq[msg.app_id] += 1
        seq = self.seq[msg.app_id]
        event_id = derive_id(self.tag, msg.app_id, seq)
        corr = correlation or (cause.correlationid if cause else event_id)
        env = wrap(msg, source=source, id=event_id, correlationid=corr,
                   causationid=cause.id if cause else corr, time=iso(self.clock), sequence=seq)
        self.envs.append(env)
        self.clock += timedelta(seconds=1)
        return env

    # -- higher-level steps ------------------------------------------------------------

    def register(self, app_id: int, name: str, namespace: str = "acme", request_id: str | None = None) -> Envelope:
        return self.emit(
            m.AppRegistered(app_id=app_id, name=name, namespace=namespace, repo_url=f"https://github.com/acme/{name}",
                            branch="main", image=f"registry.example.com/{name}", kind="service", strategy="docker",
                            command=None, port=8080, health_path="/healthz", build={"dockerfile": "Dockerfile"},
                            allow_unsigned=False, requested_by="admin"),
            correlation=request_id or derive_id(self.tag, "register", app_id),
        )

    def delivery(self, app_id: int, delivery_id: str, *, outcome: str = "queued", author: str = "ada",
                 verification: str = "hmac", event: str = "push", source: str = "github") -> Envelope:
        body = json.dumps({"ref": "refs/heads/main", "pusher": {"name": author}, "sender": {"login": author}})
        return self.emit(
            m.DeliveryAccepted(app_id=app_id, delivery_id=delivery_id, source=source,
                               route=f"/api/v1/webhooks/github/{app_id}", event=event, verification=verification,
                               received_at=iso(self.clock), outcome=outcome,
                               reason="" if outcome == "queued" else "not a push",
                               headers={"X-GitHub-Event": event, "X-GitHub-Delivery": delivery_id}, body=body,
                               body_encoding="utf8"),
            correlation=delivery_id,
        )

    def build(self, app_id: int, number: int, commit: str, *, cause: Envelope, ok: bool = True,
              author: str = "Ada Lovelace") -> Envelope:
        delivery_id = cause.correlationid
        queued = self.emit(m.BuildQueued(app_id=app_id, build=number, commit=commit, message=f"change {number}",
                                         author=author, ref="main", delivery_id=delivery_id,
                                         repo_url="https://github.com/acme/x"), cause=cause)
        started = self.emit(m.BuildStarted(app_id=app_id, build=number, commit=commit,
                                           log_path=f"builds/{app_id}/{number}.log"), cause=queued)
        return self.emit(
            m.BuildFinished(app_id=app_id, build=number, commit=commit, status="succeeded" if ok else "failed",
                            exit_code=0 if ok else 2, image_id=f"sha256:{commit}" if ok else "",
                            tags=[f"registry.example.com/x:{commit[:7]}"] if ok else [], duration=12.5,
                            log=f"Step 1/3 building {commit}\nok" if ok else "error: tests failed",
                            log_path=f"builds/{app_id}/{number}.log"),
            cause=started,
        )

    def deploy(self, app_id: int, revision: int, image: str, commit: str, *, trigger: str = "webhook",
               cause: Envelope | None = None, correlation: str | None = None, build: int | None = None,
               requested_by: str = "", outcome: str = "deployed") -> Envelope:
        requested = self.emit(
            m.DeployRequested(app_id=app_id, revision=revision, image=image, commit=commit, trigger=trigger,
                              build=build, cause=correlation or (cause.correlationid if cause else ""),
                              requested_by=requested_by),
            cause=cause, correlation=correlation,
        )
        if outcome == "requested":
            return requested
        started = self.emit(m.DeployStarted(app_id=app_id, revision=revision, log_path=f"deploys/{revision}.log"),
                            cause=requested)
        if outcome == "failed":
            return self.emit(m.DeployFailed(app_id=app_id, revision=revision, step="health", reason="no answer"),
                             cause=started)
        return self.emit(
            m.Deployed(app_id=app_id, revision=revision, image=image, commit=commit, instances=[f"i-{revision}"],
                       duration=3.0, url=f"http://127.0.0.1:8000/app{app_id}/"),
            cause=started,
        )

    def push_to_deploy(self, app_id: int, number: int, revision: int, delivery_id: str, *,
                       author: str = "ada") -> Envelope:
        commit = derive_id("commit", app_id, number).replace("-", "")[:40]
        accepted = self.delivery(app_id, delivery_id, author=author)
        finished = self.build(app_id, number, commit, cause=accepted)
        return self.deploy(app_id, revision, f"registry.example.com/x:{commit[:7]}", commit, cause=finished,
                           build=number)


def pushes(apps: int, cycles: int) -> Story:
    """``apps`` registered apps, each pushed and deployed ``cycles`` times, cycle by cycle."""
    s = Story()
    for app in range(1, apps + 1):
        s.register(app, f"app{app}")
    for cycle in range(1, cycles + 1):
        for app in range(1, apps + 1):
            s.push_to_deploy(app, cycle, cycle, f"gh-{app}-{cycle}")
    return s


# ------------------------------------------------------------------------------ kafka


def produce(settings: Settings, envs: list[Envelope]) -> None:
    p = kafka.producer(settings.bootstrap_servers)
    for i in range(0, len(envs), 5000):
        kafka.send_many_sync(p, settings.topics.events, envs[i:i + 5000], timeout=60)


def produce_raw(settings: Settings, records: list[tuple[bytes, bytes]], topic: str | None = None) -> None:
    p = kafka.producer(settings.bootstrap_servers)
    for key, value in records:
        p.produce(topic or settings.topics.events, key=key, value=value)
    assert p.flush(30) == 0


def read_topic(settings: Settings, topic: str, timeout: float = 30.0) -> list[Any]:
    """Every record of ``topic`` now (confluent ``Message`` objects), read to the end."""
    c = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": f"{topic}-reader",
                  "enable.partition.eof": True, "enable.auto.commit": False, "log_level": 3})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        todo = {p for p, high in ends.items() if high > 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        out = []
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in c.consume(1000, timeout=0.5):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        todo.discard(msg.partition())
                    continue
                out.append(msg)
                if msg.offset() + 1 >= ends[msg.partition()]:
                    todo.discard(msg.partition())
        assert not todo, f"could not read {topic} to the end"
        return out
    finally:
        c.close()


# ------------------------------------------------------------------------- projector


@contextlib.contextmanager
def projector(settings: Settings, **kwargs: Any) -> Iterator[threading.Thread]:
    """The live projector in a thread, stopped (and joined) on exit."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            Projector(settings, **kwargs).run(stop)
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)
            raise

    t = threading.Thread(target=run, name="projector", daemon=True)
    t.start()
    try:
        yield t
    finally:
        stop.set()
        t.join(30)
        assert not t.is_alive(), "projector did not stop"
        assert not errors, errors


def wait_caught_up(settings: Settings, schema: str | None = None, timeout: float = 90.0) -> None:
    """Poll until the projection in ``schema`` has folded every record now on the events topic."""
    deadline = time.monotonic() + timeout
    last: Any = None
    with psycopg.connect(settings.db_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            try:
                last = lag(settings, conn, schema)
                if last == 0:
                    return
            except psycopg.errors.UndefinedTable as exc:  # not migrated yet
                last = exc
            time.sleep(0.1)
    raise AssertionError(f"projection did not catch up in {timeout}s (lag {last})")


def rows(settings: Settings, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Run ``query`` with ``{s}`` standing for the projections schema; rows as dicts."""
    from psycopg.rows import dict_row

    with psycopg.connect(settings.db_url, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query.replace("{s}", settings.schema("projections")), params).fetchall()  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- http


@contextlib.contextmanager
def serve(settings: Settings) -> Iterator[Any]:
    """The public Flask app (``shipline.web.create_app``) on settings' HTTP port, in a thread."""
    from werkzeug.serving import make_server

    from shipline.web import create_app

    app = create_app(settings)
    server = make_server(settings.http_host, settings.http_port, app, threaded=True)
    t = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    t.start()
    try:
        yield app
    finally:
        server.shutdown()
        t.join(10)
        ctx = app.extensions["shipline"]
        ctx.pool.close()
        ctx.producer.flush(5)
