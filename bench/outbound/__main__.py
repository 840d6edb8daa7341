"""``python -m bench.outbound``: signed deliveries per second, and correctness under a flaky receiver.

Run 1 sends N events (``--apps`` x ``--events``) through the dispatcher to a receiver (its own
process) that verifies every signature and answers 200: deliveries/s end to end (first event
consumed to last delivery recorded at the receiver) and at the receiver (first to last request).
Run 2 does the same against a receiver failing half the requests at random, with the retry
schedule scaled down (``--scale``): it checks that every event was delivered, that every retry
waited its jittered, scaled schedule (never early), that order per app held (event n+1 never
before n's success) and that no delivery id was sent again after it succeeded. Numbers only.

Kafka and PostgreSQL: ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` when set, else our own
``shipline.infra`` servers under ``.shipline-bench/`` (stopped again if this run started them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Any

import psycopg
import requests
from cryptography.fernet import Fernet

from bench.services import BENCH, ROOT, free_port, services
from outbound import signing
from outbound.dispatcher import Dispatcher
from shipline import kafka
from shipline.config import load
from shipline.envelope import wrap
from shipline.messages import Deployed, SubscriptionCreated
from shipline.topics import Topics, delete_prefixed, ensure_topics

DEFAULT_SCHEDULE = "5,300,1800,7200,18000,36000,36000"


def _receiver(stack: ExitStack, secret: str, fail_rate: float) -> str:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.outbound.receiver", str(port), secret, str(fail_rate)],
                            cwd=ROOT)
    stack.callback(lambda: (proc.terminate(), proc.wait(10)))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(base + "/_count", timeout=1)
            return base
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("receiver did not start")


def run(bootstrap: str, db: str, *, apps: int, events: int, fail_rate: float, schedule: str, scale: float,
        workers: int, per_endpoint: int, timeout: float) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = load({
        "SHIPLINE_DATA_DIR": str(BENCH / "data"), "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": db,
        "SHIPLINE_TOPIC_PREFIX": prefix, "SHIPLINE_DB_SCHEMA": prefix, "SHIPLINE_ADMIN_TOKEN": "bench",
        "SHIPLINE_SECRET_KEY": Fernet.generate_key().decode(), "SHIPLINE_OUTBOUND_ALLOW": "127.0.0.1/32",
        "SHIPLINE_RETRY_SCHEDULE": schedule, "SHIPLINE_RETRY_SCALE": str(scale), "SHIPLINE_LOG_LEVEL": "WARNING",
    })
    topics = Topics(prefix)
    ensure_topics(bootstrap, topics, partitions=6)
    secret = signing.generate()
    with ExitStack() as stack:
        stack.callback(lambda: delete_prefixed(bootstrap, prefix))
        stack.callback(lambda: _drop_schema(db, settings.schema("outbound")))
        base = _receiver(stack, secret, fail_rate)
        producer = kafka.producer(bootstrap)
        subs = [wrap(SubscriptionCreated(app_id=a, subscription_id=f"sub-{a}", url=base + "/hook", events=["deployed"],
                                         secret_encrypted=signing.encrypt(settings.secret_key, secret),
                                         description="bench"), source="bench", sequence=1)
                for a in range(1, apps + 1)]
        kafka.send_many_sync(producer, topics.events, subs, timeout=60)
        envs = [wrap(Deployed(app_id=a, revision=n, image=f"img:{n}", commit="c" * 40, instances=["i"], duration=1.0,
                              url="http://x"), source="bench", sequence=n + 1)
                for n in range(1, events + 1) for a in range(1, apps + 1)]
        for i in range(0, len(envs), 2000):
            kafka.send_many_sync(producer, topics.events, envs[i:i + 2000], timeout=60)
        total = len(envs)

        stop = threading.Event()
        dispatcher = Dispatcher(settings, workers=workers, per_endpoint=per_endpoint)
        started = time.time()
        thread = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if requests.get(base + "/_count", timeout=5).json()["ok"] >= total:
                break
            time.sleep(0.05)
        finished = time.time()
        time.sleep(0.5)  # let the writer record the last successes before reading the tables
        stop.set()
        thread.join(20)
        counts = requests.get(base + "/_count", timeout=5).json()
        records = [json.loads(line) for line in requests.get(base + "/_dump", timeout=60).text.splitlines() if line]
        attempts = _attempts(db, settings.schema("outbound"))
        return _analyse(records, attempts, counts, envs, started, finished, scale, schedule)


def _drop_schema(db: str, schema: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _attempts(db: str, schema: str) -> dict[str, Any]:
    with psycopg.connect(db) as conn:
        rows = conn.execute(
            f"SELECT delivery_id::text, extract(epoch FROM started_at)::float8, duration_ms, outcome,"
            f" extract(epoch FROM next_attempt_at)::float8, delay, attempt FROM {schema}.attempts ORDER BY id"
        ).fetchall()
        statuses = dict(conn.execute(f"SELECT status, count(*) FROM {schema}.deliveries GROUP BY 1").fetchall())
    return {"rows": rows, "statuses": statuses}


def _analyse(records: list[list[Any]], attempts: dict[str, Any], counts: dict[str, int], envs: list[Any],
             started: float, finished: float, scale: float, schedule: str) -> dict[str, Any]:
    total = len(envs)
    ok = [r for r in records if r[4] == 200]
    delivered = {r[1] for r in ok}
    first_req = min(r[5] for r in records) if records else started
    last_ok = max(r[6] for r in ok) if ok else finished
    # order per app and nothing after success
    by_app: dict[int, list[list[Any]]] = {}
    for r in sorted(records, key=lambda r: r[5]):
        by_app.setdefault(r[2], []).append(r)
    order_violations = after_success = 0
    for reqs in by_app.values():
        succeeded_at: dict[str, float] = {}
        last_seq = 0
        for r in reqs:
            if r[3] < last_seq:
                order_violations += 1
            last_seq = max(last_seq, r[3])
            if r[0] in succeeded_at:
                after_success += 1
            if r[4] == 200:
                succeeded_at[r[0]] = r[6]
        # n+1's first request is never before n's success answer
        first_seen: dict[int, float] = {}
        ok_at: dict[int, float] = {}
        for r in reqs:
            first_seen.setdefault(r[3], r[5])
            if r[4] == 200:
                ok_at[r[3]] = r[6]
        for seq, at in first_seen.items():
            if seq - 1 in ok_at and at < ok_at[seq - 1] - 0.001:
                order_violations += 1
    # retries against the schedule, from the attempt log
    nominal = [float(x) * scale for x in schedule.split(",")]
    per_delivery: dict[str, list[tuple[Any, ...]]] = {}
    for row in attempts["rows"]:
        per_delivery.setdefault(row[0], []).append(row)
    jitter_out = early = retries = 0
    ratios: list[float] = []
    for rows in per_delivery.values():
        for i, (prev, nxt) in enumerate(zip(rows, rows[1:], strict=False)):
            if prev[3] != "retry":
                continue
            retries += 1
            if not 0.8 * nominal[i] - 1e-9 <= prev[5] <= 1.2 * nominal[i] + 1e-9:
                jitter_out += 1
            if nxt[1] < prev[4] - 0.001:
                early += 1
            if nominal[i] >= 0.05:
                ratios.append((nxt[1] - (prev[1] + prev[2] / 1000)) / nominal[i])
    ratios.sort()
    return {
        "events": total,
        "delivered": len(delivered),
        "given_up": attempts["statuses"].get("failed", 0),
        "requests": counts["total"],
        "bad_signatures": counts["bad_signature"],
        "seconds_end_to_end": round(finished - started, 2),
        "deliveries_per_s_end_to_end": round(len(ok) / max(finished - started, 1e-9)),
        "deliveries_per_s_at_receiver": round(len(ok) / max(last_ok - first_req, 1e-9)),
        "requests_per_s_at_receiver": round(len(records) / max(last_ok - first_req, 1e-9)),
        "retries": retries,
        "retry_delay_outside_jitter": jitter_out,
        "retries_early": early,
        "retry_gap_over_nominal_p50_p99 (nominal >= 50 ms)": [_pct(ratios, 0.5), _pct(ratios, 0.99)],
        "order_violations": order_violations,
        "sent_after_success": after_success,
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(len(values) * q))], 3)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.outbound", description=__doc__.split("\n")[0])
    parser.add_argument("--apps", type=int, default=50)
    parser.add_argument("--events", type=int, default=100, help="events per app in the throughput run")
    parser.add_argument("--flaky-apps", type=int, default=40)
    parser.add_argument("--flaky-events", type=int, default=25)
    parser.add_argument("--scale", type=float, default=0.0001, help="retry schedule factor in the flaky run")
    parser.add_argument("--retries", type=int, default=16, help="schedule length in the flaky run (default "
                        "schedule, its last delay repeated) so that a 50%% failure rate gives up on nothing")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--per-endpoint", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    with ExitStack() as stack:
        bootstrap, db = services(stack)
        common = {"workers": args.workers, "per_endpoint": args.per_endpoint, "timeout": args.timeout}
        fast = run(bootstrap, db, apps=args.apps, events=args.events, fail_rate=0.0, schedule=DEFAULT_SCHEDULE,
                   scale=1.0, **common)
        print(json.dumps({"run": "throughput", "receiver": "always 200", **common, **fast}, indent=2), flush=True)
        delays = DEFAULT_SCHEDULE.split(",")
        schedule = ",".join((delays + [delays[-1]] * args.retries)[: args.retries])
        flaky = run(bootstrap, db, apps=args.flaky_apps, events=args.flaky_events, fail_rate=0.5, schedule=schedule,
                    scale=args.scale, **common)
        print(json.dumps({"run": "flaky", "receiver": "fails 50% at random", "schedule": schedule,
                          "scale": args.scale, **common, **flaky}, indent=2), flush=True)


if __name__ == "__main__":
    main()
