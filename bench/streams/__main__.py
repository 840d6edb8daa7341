"""``python -m bench.streams [--apps 200] [--deliveries 20000] [--rate 200] [--seconds 20]``

Deliveries per second through the deciding agent on the real broker, and the latency from
producing a ``delivery.received`` to consuming its ``build.queued`` at a steady rate; in the same
run the same two numbers for a bare aiokafka consume -> produce loop (``bench/streams/bare.py``)
on the same kind of topics. Prints the numbers and the ratio; asserts nothing.

* drain: N GitHub pushes spread over many registered apps are pre-filled into ``inbound``, then
  the worker (``python -m streams``, its own process as in production) starts; the rate is
  counted from the first decided delivery to the last, by the events topic's end offsets (each
  push yields ``delivery.accepted`` + ``build.queued`` events and a ``build.image`` command).
* latency: pushes at ``--rate``/s for ``--seconds``; a ``build.queued`` event's time is its
  delivery's time (ids and times derive from the cause), so latency = consumed-at - event time.

Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` when set, else our own broker under ``.shipline-bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from bench.services import BENCH, ROOT, kafka_bootstrap
from shipline import codec, kafka
from shipline.envelope import Envelope, wrap
from shipline.messages import DeliveryReceived, RegisterApp
from shipline.topics import Topics, delete_prefixed, ensure_topics

WARMUP = 3.0  # seconds of steady pushes before latency samples count


def push(app_id: int, n: int, prefix: str = "bench") -> Envelope:
    sha = f"{n + 1:040x}"
    body = json.dumps({"ref": "refs/heads/main", "after": sha, "deleted": False,
                       "head_commit": {"id": sha, "message": f"change {n}", "author": {"name": "Bench"}},
                       "repository": {"clone_url": "https://example.invalid/app.git"}})
    return wrap(DeliveryReceived(app_id=app_id, delivery_id=f"{prefix}-{uuid.uuid4()}", source="github",
                                 route="/api/webhook", event="push", headers={"X-GitHub-Event": "push"},
                                 body=body, body_encoding="utf8", verification="hmac",
                                 received_at="2026-01-01T00:00:00Z"), source="bench")


def registrations(apps: int) -> list[Envelope]:
    return [wrap(RegisterApp(app_id=a, name=f"app{a}", namespace="bench", repo_url=f"file:///src/app{a}",
                             request_id=f"bench-register-{a}"), source="bench") for a in range(1, apps + 1)]


def end_offsets(bootstrap: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-watermarks", "log_level": 3})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    finally:
        c.close()


def fill(bootstrap: str, topic: str, envs: list[Envelope]) -> None:
    p = kafka.producer(bootstrap, **{"linger.ms": 20})
    for i in range(0, len(envs), 2000):
        kafka.send_many_sync(p, topic, envs[i:i + 2000], timeout=120)


def start_worker(bootstrap: str, topics: Topics, run: Path, log_name: str) -> subprocess.Popen:  # type: ignore[type-arg]
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "SHIPLINE_TOPIC_PREFIX": topics.prefix,
           "SHIPLINE_DATA_DIR": str(run / "data"), "SHIPLINE_ADMIN_TOKEN": "bench", "SHIPLINE_SECRET_KEY": "bench",
           "SHIPLINE_LOG_LEVEL": "WARNING"}
    log = open(run / log_name, "wb")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([sys.executable, "-m", "streams"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def start_bare(bootstrap: str, source: str, sink: str, run: Path) -> subprocess.Popen:  # type: ignore[type-arg]
    log = open(run / "bare.log", "wb")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "bench.streams.bare", bootstrap, source, sink,
                             f"bench-bare-{uuid.uuid4().hex[:6]}"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def drain(bootstrap: str, topic: str, start: int, target: int, per_delivery: int, timeout: float = 600) -> float:
    """Deliveries/s: from the first output past ``start`` to ``target`` outputs on ``topic``."""
    deadline = time.monotonic() + timeout
    t0 = None
    first = start
    while True:
        now, count = time.monotonic(), end_offsets(bootstrap, topic)
        if t0 is None and count > start:
            t0, first = now, count
        if count >= target:
            break
        if now > deadline:
            raise TimeoutError(f"{topic}: {count} of {target} records after {timeout}s")
        time.sleep(0.05)
    elapsed = max(time.monotonic() - (t0 or now), 1e-6)
    return (count - first) / per_delivery / elapsed


def _parse(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def latency(bootstrap: str, topics_in: str, topic_out: str, wanted: str | None, apps: int, rate: int,
            seconds: float) -> list[float]:
    """Produce pushes at ``rate``/s; ms from each push's envelope time to consuming its output.

    The first ``WARMUP`` seconds of pushes are not counted: they would measure the reader's own
    start (group join, first fetch), not the pipeline.
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-lat-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "latest", "enable.auto.commit": False, "log_level": 3,
                         "fetch.wait.max.ms": 5})
    consumer.subscribe([topic_out])
    deadline = time.monotonic() + 60
    while not consumer.assignment() and time.monotonic() < deadline:
        consumer.poll(0.1)
    total = int(rate * seconds)
    samples: list[float] = []
    done = threading.Event()

    def consume() -> None:
        end = None
        while not done.is_set() or (end is not None and time.monotonic() < end):
            for m in consumer.consume(500, timeout=0.05):
                if m.error():
                    continue
                received = time.time()
                env = codec.decode(m.value())
                if (wanted is None or env.type == wanted) and env.data.delivery_id.startswith("lat-"):
                    samples.append((received - _parse(env.time)) * 1000)
            if done.is_set() and end is None:
                end = time.monotonic() + 15
            if len(samples) >= total:
                return

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    p = kafka.producer(bootstrap, **{"linger.ms": 0})
    started = time.monotonic()
    warmup = int(rate * WARMUP)
    for i in range(warmup + total):
        due = started + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        env = push(1 + i % apps, 10_000_000 + i, "warm" if i < warmup else "lat")
        p.produce(topics_in, key=env.key, value=codec.encode(env))
        p.poll(0)
    p.flush(30)
    done.set()
    reader.join(30)
    consumer.close()
    return samples


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--apps", type=int, default=200)
    ap.add_argument("--deliveries", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    args = ap.parse_args()
    run_id = uuid.uuid4().hex[:8]
    run = BENCH / f"streams-{run_id}"
    run.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        bootstrap = kafka_bootstrap(stack)
        ours, bare = Topics(f"bench{run_id}"), Topics(f"bench{run_id}bare")
        for t in (ours, bare):
            ensure_topics(bootstrap, t, partitions=6)
            stack.callback(delete_prefixed, bootstrap, t.prefix)
        pushes = [push(1 + i % args.apps, i) for i in range(args.deliveries)]
        print(f"pre-filling {args.deliveries} pushes over {args.apps} apps (twice: streams and baseline)...")
        fill(bootstrap, ours.inbound, registrations(args.apps))
        fill(bootstrap, ours.inbound, pushes)
        fill(bootstrap, bare.inbound, pushes)

        # --- streams: drain, then steady-rate latency
        worker = start_worker(bootstrap, ours, run, "streams.log")
        stack.callback(lambda: (worker.terminate(), worker.wait(15)))
        regs = args.apps  # app.registered events come first in each app's log
        deadline = time.monotonic() + 180
        while end_offsets(bootstrap, ours.events) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        ours_rate = drain(bootstrap, ours.events, end_offsets(bootstrap, ours.events), regs + 2 * args.deliveries,
                          per_delivery=2)
        ours_lat = latency(bootstrap, ours.inbound, ours.events, "build.queued", args.apps, args.rate, args.seconds)
        worker.terminate()
        worker.wait(15)

        # --- baseline: the bare aiokafka loop on the same pre-filled pushes
        loop = start_bare(bootstrap, bare.inbound, bare.events, run)
        stack.callback(lambda: (loop.terminate(), loop.wait(15)))
        bare_rate = drain(bootstrap, bare.events, 0, args.deliveries, per_delivery=1)
        bare_lat = latency(bootstrap, bare.inbound, bare.events, None, args.apps, args.rate, args.seconds)
        loop.terminate()
        loop.wait(15)

    print()
    print(f"drain of {args.deliveries} pushes over {args.apps} apps (deliveries/s):")
    print(f"  streams worker (decide, 3 outputs + state per delivery): {ours_rate:9.0f}/s")
    print(f"  bare aiokafka consume->produce (1 output, no state):     {bare_rate:9.0f}/s")
    print(f"  ratio streams / bare:                                    {ours_rate / bare_rate:9.2f}")
    print(f"latency delivery.received -> build.queued at {args.rate}/s for {args.seconds:.0f}s (ms):")
    print(f"  streams: p50 {pct(ours_lat, 0.5):7.1f}  p99 {pct(ours_lat, 0.99):7.1f}  max {max(ours_lat or [0]):7.1f}"
          f"  ({len(ours_lat)} samples)")
    print(f"  bare:    p50 {pct(bare_lat, 0.5):7.1f}  p99 {pct(bare_lat, 0.99):7.1f}  max {max(bare_lat or [0]):7.1f}"
          f"  ({len(bare_lat)} samples)")
    if ours_lat:
        print(f"  streams mean {statistics.fmean(ours_lat):.1f} ms")


if __name__ == "__main__":
    main()
