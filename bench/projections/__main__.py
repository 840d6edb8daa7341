"""``python -m bench.projections [--events 1000000]``: the projections rebuild rate from a log of
``--events`` events, a bare consume of the same topic in the same run (and consume + decode),
their ratio, then the history API's p50/p99 (gunicorn-served public app) for an app with
``--releases`` releases. Numbers only: nothing here asserts on speed.

The log is what streams would write: per app an ``app.registered`` then push-to-deploy cycles of
seven events (delivery accepted, build queued/started/finished, deploy requested/started,
deployed); app 1 gets ``--releases`` cycles, the other apps share the rest. Records are encoded
before the clock starts and produced with a confluent producer.

Kafka and PostgreSQL: ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` when set, else the bench
servers under ``.shipline-bench/`` (shared with ``bench.ingress``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg
import requests
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from cryptography.fernet import Fernet

from bench.services import free_port, gunicorn, services
from projections.rebuild import rebuild
from shipline import codec, kafka
from shipline import messages as m
from shipline.config import load as load_settings
from shipline.envelope import derive_id, wrap
from shipline.topics import Topics, delete_prefixed, ensure_topics

ROOT = Path(__file__).resolve().parents[2]
BODY = json.dumps({"ref": "refs/heads/main", "after": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5",
                   "pusher": {"name": "ada", "email": "ada@example.com"}, "sender": {"login": "ada"},
                   "head_commit": {"id": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5", "message": "Fix it"}})


def _templates() -> dict[str, dict[str, Any]]:
    """One encoded-shape dict per event type, made through the real envelope and codec."""
    samples = [
        m.AppRegistered(app_id=1, name="app", namespace="bench", repo_url="https://github.com/acme/app",
                        branch="main", image="registry.example.com/app", kind="service", strategy="docker",
                        command=None, port=8080, health_path="/", build=None, allow_unsigned=False,
                        requested_by="admin"),
        m.DeliveryAccepted(app_id=1, delivery_id="d", source="github", route="/api/v1/webhooks/github/1",
                           event="push", verification="hmac", received_at="2025-01-01T00:00:00Z", outcome="queued",
                           reason="", headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": "d"}, body=BODY,
                           body_encoding="utf8"),
        m.BuildQueued(app_id=1, build=1, commit="c", message="Fix it", author="Ada", ref="main", delivery_id="d",
                      repo_url="https://github.com/acme/app"),
        m.BuildStarted(app_id=1, build=1, commit="c", log_path="builds/1.log"),
        m.BuildFinished(app_id=1, build=1, commit="c", status="succeeded", exit_code=0, image_id="sha256:c",
                        tags=["registry.example.com/app:c"], duration=42.0, log="Step 1/3\nok\n",
                        log_path="builds/1.log"),
        m.DeployRequested(app_id=1, revision=1, image="registry.example.com/app:c", commit="c", trigger="webhook",
                          build=1, cause="d"),
        m.DeployStarted(app_id=1, revision=1, log_path="deploys/1.log"),
        m.Deployed(app_id=1, revision=1, image="registry.example.com/app:c", commit="c", instances=["i-1"],
                   duration=3.0, url="http://127.0.0.1:8000/app/"),
    ]
    return {msg.TYPE: codec.to_dict(wrap(msg, source="shipline.streams", sequence=1)) for msg in samples}


def make_log(events: int, apps: int, releases: int) -> list[tuple[bytes, bytes]]:
    """``events`` encoded records (key, value) in per-app order, apps interleaved."""
    tpl = _templates()
    cycles = {1: releases}
    rest = -(-max(0, events - apps - 7 * releases) // 7)  # round up: at least `events`
    for i, app in enumerate(range(2, apps + 1)):
        cycles[app] = rest // (apps - 1) + (1 if i < rest % (apps - 1) else 0)
    seq = dict.fromkeys(range(1, apps + 1), 0)
    clock = [1_735_689_600_000_000]  # 2025-01-01T00:00:00Z in microseconds
    out: list[tuple[bytes, bytes]] = []

    def emit(kind: str, app: int, corr: str, **data: Any) -> None:
        seq[app] += 1
        clock[0] += 1000
        sec, usec = divmod(clock[0], 1_000_000)
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{usec:06d}Z"
        if kind == "delivery.accepted":
            data["received_at"] = when
        doc = dict(tpl[kind], id=derive_id("bench", app, seq[app]), time=when, subject=str(app), sequence=seq[app],
                   correlationid=corr, causationid=corr)
        doc["data"] = dict(doc["data"], app_id=app, **data)
        out.append((str(app).encode(), json.dumps(doc, separators=(",", ":")).encode()))

    for app in range(1, apps + 1):
        emit("app.registered", app, f"reg-{app}", name=f"app{app}")
    for n in range(1, max(cycles.values(), default=0) + 1):
        for app in range(1, apps + 1):
            if n > cycles[app]:
                continue
            delivery = f"gh-{app}-{n}"
            commit = f"{app:08x}{n:032x}"
            image = f"registry.example.com/app{app}:{commit[:12]}"
            emit("delivery.accepted", app, delivery, delivery_id=delivery,
                 headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": delivery})
            emit("build.queued", app, delivery, build=n, commit=commit, delivery_id=delivery)
            emit("build.started", app, delivery, build=n, commit=commit)
            emit("build.finished", app, delivery, build=n, commit=commit, image_id=f"sha256:{commit}", tags=[image])
            emit("deploy.requested", app, delivery, revision=n, image=image, commit=commit, build=n, cause=delivery)
            emit("deploy.started", app, delivery, revision=n)
            emit("deployed", app, delivery, revision=n, image=image, commit=commit)
    return out


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    p = kafka.producer(bootstrap, **{"linger.ms": 20, "batch.num.messages": 10000,
                                     "queue.buffering.max.messages": 2_000_000,
                                     "queue.buffering.max.kbytes": 2_000_000, "message.timeout.ms": 120000})
    failed: list[str] = []

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    started = time.monotonic()
    for key, value in records:
        while True:
            try:
                p.produce(topic, key=key, value=value, on_delivery=report)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    if p.flush(120) or failed:
        raise SystemExit(f"producing failed: {failed[:3]}")
    return time.monotonic() - started


def bare_consume(bootstrap: str, topic: str, decode: bool) -> tuple[int, float]:
    """Read the whole topic from offset 0 with assign() (what the rebuild does, minus the work)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-bare", "enable.auto.commit": False,
                  "enable.partition.eof": True, "fetch.max.bytes": 64 * 1024 * 1024,
                  "max.partition.fetch.bytes": 8 * 1024 * 1024, "queued.min.messages": 200000, "log_level": 3})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        todo = {p for p, high in ends.items() if high > 0}
        started = time.monotonic()
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        count = 0
        while todo:
            for msg in c.consume(10000, timeout=0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        todo.discard(msg.partition() or 0)
                    continue
                count += 1
                if decode:
                    codec.decode(msg.value())
                if (msg.offset() or 0) + 1 >= ends[msg.partition() or 0]:
                    todo.discard(msg.partition() or 0)
        return count, time.monotonic() - started
    finally:
        c.close()


def latency(http: requests.Session, url: str, headers: dict[str, str], n: int) -> tuple[float, float, float]:
    for _ in range(min(50, n)):  # warm the pools and plans
        http.get(url, headers=headers, timeout=30).raise_for_status()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        resp = http.get(url, headers=headers, timeout=30)
        samples.append((time.perf_counter() - t) * 1000)
        resp.raise_for_status()
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99) - 1], statistics.fmean(samples)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.projections", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--apps", type=int, default=1000)
    parser.add_argument("--releases", type=int, default=10_000, help="releases of app 1 (the history API's app)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per API endpoint")
    parser.add_argument("--keep", action="store_true", help="keep the topic and schemas afterwards")
    args = parser.parse_args()
    if args.events < args.apps + 7 * args.releases:
        parser.error("--events must be at least --apps + 7 x --releases")

    with ExitStack() as stack:
        bootstrap, db = services(stack)
        tag = f"bp{uuid.uuid4().hex[:8]}"
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": db, "SHIPLINE_TOPIC_PREFIX": tag,
            "SHIPLINE_DB_SCHEMA": tag, "SHIPLINE_ADMIN_TOKEN": uuid.uuid4().hex,
            "SHIPLINE_SECRET_KEY": Fernet.generate_key().decode(), "SHIPLINE_HTTP": f"127.0.0.1:{free_port()}",
            "SHIPLINE_DATA_DIR": f"/tmp/{tag}", "SHIPLINE_LOG_LEVEL": "WARNING",
        }
        settings = load_settings(env)
        topics = Topics(tag)
        ensure_topics(bootstrap, topics, partitions=settings.partitions)
        if not args.keep:
            stack.callback(_drop, db, tag, bootstrap)

        t = time.monotonic()
        records = make_log(args.events, args.apps, args.releases)
        size = sum(len(v) for _, v in records)
        print(f"log: {len(records):,} events ({size / len(records):.0f} B average) across {args.apps} apps,"
              f" {settings.partitions} partitions; encoded in {time.monotonic() - t:.1f}s", flush=True)
        seconds = produce(bootstrap, topics.events, records)
        print(f"produce: {len(records) / seconds:,.0f} events/s ({seconds:.1f}s)", flush=True)
        del records

        count, seconds = bare_consume(bootstrap, topics.events, decode=False)
        bare = count / seconds
        print(f"bare consume: {count:,} events in {seconds:.2f}s = {bare:,.0f} events/s", flush=True)
        count, seconds = bare_consume(bootstrap, topics.events, decode=True)
        decoded = count / seconds
        print(f"consume + decode: {count:,} events in {seconds:.2f}s = {decoded:,.0f} events/s", flush=True)

        result = rebuild(settings, progress=sys.stderr)
        print(f"rebuild: {result.events:,} events in {result.seconds:.1f}s = {result.rate:,.0f} events/s"
              f" (ratio to bare consume {result.rate / bare:.2f}, to consume + decode {result.rate / decoded:.2f});"
              f" checksum {result.checksum['*'][:16]}", flush=True)

        base, _ = gunicorn(stack, env, Path(f"/tmp/{tag}-gunicorn.log"))
        headers = {"Authorization": f"Bearer {settings.admin_token}"}
        with requests.Session() as http:
            print(f"history API, app 1 with {args.releases:,} releases ({settings.web_workers} gunicorn workers,"
                  f" sequential keep-alive client, {args.requests} requests each):")
            mid = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_735_689_600 + args.events // 2000))
            for label, path in (
                ("newest page (limit 50)", "/api/v1/apps/1/history"),
                ("deep page (before=N/2)", f"/api/v1/apps/1/history?before={args.releases // 2}"),
                ("point in time (?at=)", f"/api/v1/apps/1/history?at={mid}"),
            ):
                p50, p99, mean = latency(http, base + path, headers, args.requests)
                print(f"  {label:<24} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   mean {mean:6.2f} ms", flush=True)
    return 0


def _drop(db: str, tag: str, bootstrap: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        for (name,) in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (tag + "%",)).fetchall():
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    delete_prefixed(bootstrap, tag)


if __name__ == "__main__":
    sys.exit(main())
