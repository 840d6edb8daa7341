"""Helpers for the streams integration tests (no tests here): worker subprocesses, inputs, a log reader."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from shipline import codec, kafka
from shipline.config import Settings
from shipline.envelope import Envelope, wrap
from shipline.messages import DeliveryReceived, RegisterApp

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 90.0


class Worker:
    """``python -m streams`` in a subprocess, with the test's settings in its environment."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.log_path = settings.data_dir.parent / f"streams-{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **settings.env, "PYTHONUNBUFFERED": "1", "SHIPLINE_LOG_LEVEL": "INFO"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop/kill
        self.proc = subprocess.Popen([sys.executable, "-m", "streams"], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()

    def stop(self, timeout: float = 10.0) -> float:
        """SIGTERM; returns how long it took to exit."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return time.monotonic() - started

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def register(app_id: int, **kw: object) -> Envelope:
    fields: dict[str, object] = dict(app_id=app_id, name=f"app{app_id}", namespace="test",
                                     repo_url=f"file:///src/app{app_id}", image=f"registry.local/app{app_id}",
                                     request_id=f"register-{app_id}")
    fields.update(kw)
    return wrap(RegisterApp(**fields), source="test")  # type: ignore[arg-type]


def push(app_id: int, delivery_id: str, sha: str = "c0ffee" * 6 + "cafe") -> Envelope:
    body = {"ref": "refs/heads/main", "after": sha, "deleted": False,
            "head_commit": {"id": sha, "message": f"commit for {delivery_id}", "author": {"name": "Ada"}},
            "repository": {"clone_url": "https://example.invalid/r.git"}}
    return wrap(DeliveryReceived(app_id=app_id, delivery_id=delivery_id, source="github", route="/api/webhook",
                                 event="push", headers={"X-GitHub-Event": "push"}, body=json.dumps(body),
                                 body_encoding="utf8", verification="hmac", received_at="2026-01-01T00:00:00Z"),
                source="test")


def hook(app_id: int, delivery_id: str, image: str) -> Envelope:
    return wrap(DeliveryReceived(app_id=app_id, delivery_id=delivery_id, source="skipper", route="/api/v1/webhook",
                                 event="deploy", headers={}, body=json.dumps({"image": image}), body_encoding="utf8",
                                 verification="token", received_at="2026-01-01T00:00:00Z"), source="test")


def produce(settings: Settings, topic: str, envs: list[Envelope]) -> None:
    p = kafka.producer(settings.bootstrap_servers)
    for i in range(0, len(envs), 500):
        kafka.send_many_sync(p, topic, envs[i:i + 500], timeout=60)


class Reader:
    """Everything on the given topics since the beginning, decoded, with the raw bytes kept."""

    def __init__(self, settings: Settings, topics: list[str]) -> None:
        self.consumer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "reader",
                                  "enable.auto.commit": False, "log_level": 3})
        meta = self.consumer.list_topics(timeout=10)
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                              for t in topics for p in meta.topics[t].partitions])
        self.records: list[tuple[str, Envelope | None, bytes, list[tuple[str, bytes]]]] = []

    def poll(self, seconds: float = 0.5) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msgs = self.consumer.consume(1000, timeout=0.2)
            for m in msgs:
                if m.error():
                    continue
                try:
                    env: Envelope | None = codec.decode(m.value())
                except codec.InvalidRecord:
                    env = None
                self.records.append((m.topic(), env, m.value(), list(m.headers() or [])))

    def until(self, predicate: Callable[[], bool], what: str, timeout: float = DEADLINE,
              workers: list[Worker] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                logs = "\n\n".join(w.tail() for w in workers or [])
                raise AssertionError(f"timed out waiting for {what}; have {self.summary()}\n{logs}")
            self.poll()

    def summary(self) -> str:
        kinds = Counter((t.rsplit(".", 1)[-1], e.type) for t, e, _, _ in self.records if e is not None)
        return f"{len(self.records)} records, {dict(kinds)}"

    def envelopes(self, topic: str) -> list[Envelope]:
        return [e for t, e, _, _ in self.records if t == topic and e is not None]

    def distinct(self, topic: str) -> dict[str, Envelope]:
        """id -> envelope, checking that every re-send of an id is byte-identical."""
        raw: dict[str, set[bytes]] = defaultdict(set)
        out: dict[str, Envelope] = {}
        for t, e, value, _ in self.records:
            if t == topic and e is not None:
                raw[e.id].add(value)
                out[e.id] = e
        differing = [i for i, values in raw.items() if len(values) > 1]
        assert not differing, f"ids re-sent with different content: {differing[:5]}"
        return out

    def close(self) -> None:
        self.consumer.close()


def check_sequences(events: dict[str, Envelope]) -> dict[int, list[Envelope]]:
    """Per app: one distinct event per sequence number, 1..n with no gap. Returns events by app."""
    by_app: dict[int, list[Envelope]] = defaultdict(list)
    for e in events.values():
        by_app[e.app_id].append(e)
    for app_id, evs in by_app.items():
        seqs = sorted(e.sequence for e in evs)  # type: ignore[type-var]
        assert seqs == list(range(1, len(evs) + 1)), f"app {app_id}: sequences {seqs[:20]}..."
    return by_app
