"""``python -m bench.ingress [--seconds 60]``: signed GitHub pushes against the gunicorn-served
ingress on the local Kafka and PostgreSQL, then the same load against a bare Flask endpoint in the
same gunicorn configuration, the two alternating in slices; prints throughput, p50/p99, the ratio,
and the exactly-once count by delivery id read back from Kafka. Numbers only: nothing here asserts on speed.

Kafka and PostgreSQL: ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` when set, else our own
``shipline.infra`` servers under ``.shipline-bench/`` (stopped again if this run started them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path

import requests
from cryptography.fernet import Fernet

from bench.ingress import load
from bench.services import BENCH, free_port, gunicorn, services
from ingress.rebuild import read_topic
from shipline.topics import Topics, delete_prefixed, ensure_topics

PUSH = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5",
    "repository": {"id": 881234567, "name": "shop", "full_name": "acme/shop",
                   "html_url": "https://github.com/acme/shop", "clone_url": "https://github.com/acme/shop.git",
                   "ssh_url": "git@github.com:acme/shop.git", "default_branch": "main"},
    "pusher": {"name": "ada", "email": "ada@example.com"},
    "sender": {"login": "ada", "id": 7654321, "type": "User"},
    "created": False, "deleted": False, "forced": False, "base_ref": None,
    "compare": "https://github.com/acme/shop/compare/6113728f27ae...59b20b8d5c6f",
    "commits": [{"id": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5", "message": "Fix the checkout total",
                 "timestamp": "2025-11-22T10:15:02+01:00", "author": {"name": "Ada", "email": "ada@example.com"},
                 "added": [], "removed": [], "modified": ["shop/checkout.py"]}],
    "head_commit": {"id": "59b20b8d5c6ff8d09518454d4dd8b7b30f095ab5", "message": "Fix the checkout total",
                    "author": {"name": "Ada", "email": "ada@example.com", "username": "ada"}},
}


def _request_maker(path: str, host: str, body: bytes, extra: dict[str, str]) -> load.Callable[[str], bytes]:
    fixed = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"User-Agent: GitHub-Hookshot/bench\r\nX-GitHub-Event: push\r\nContent-Length: {len(body)}\r\n{fixed}")

    def make(delivery: str) -> bytes:
        return f"{head}X-GitHub-Delivery: {delivery}\r\n\r\n".encode() + body

    return make


def _cpu_seconds(master: int) -> float:
    """CPU time used so far by a gunicorn master's worker processes (Linux /proc)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class Phase:
    """One target's load, summed over its slices."""

    def __init__(self, label: str, master: int, port: int, make: load.Callable[[str], bytes]) -> None:
        self.label, self.master, self.port, self.make = label, master, port, make
        self.result = load.Result()
        self.seconds = 0.0
        self.cpu = 0.0

    def slice(self, args: argparse.Namespace, run_id: str, index: int, seconds: float) -> None:
        cpu_before = _cpu_seconds(self.master)
        result, window = load.run("127.0.0.1", self.port, self.make, clients=args.clients, warmup=args.warmup,
                                  seconds=seconds, label=f"{self.label[0]}{run_id}s{index}")
        self.cpu += _cpu_seconds(self.master) - cpu_before
        self.seconds += window
        self.result.latencies.extend(result.latencies)
        self.result.accepted.extend(result.accepted)
        self.result.errors += result.errors
        for code, count in result.statuses.items():
            self.result.statuses[code] = self.result.statuses.get(code, 0) + count

    @property
    def rate(self) -> float:
        return len(self.result.latencies) / self.seconds if self.seconds else 0.0

    def report(self) -> None:
        result = self.result
        answered = sum(result.statuses.values())
        p50, p99 = load.percentile(result.latencies, 50) * 1000, load.percentile(result.latencies, 99) * 1000
        print(f"{self.label:<8} {self.rate:8.1f} req/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   "
              f"worker CPU {self.cpu / max(answered, 1) * 1000:5.2f} ms/req   "
              f"statuses {dict(sorted(result.statuses.items()))}   client errors {result.errors}")


def _exactly_once(bootstrap: str, topic: str, accepted: list[str]) -> None:
    counts: dict[str, int] = {}
    for _, _, value in read_topic(bootstrap, topic, timeout=120):
        doc = json.loads(value or b"{}")
        if doc.get("type") == "delivery.received":
            delivery = doc["data"]["delivery_id"]
            counts[delivery] = counts.get(delivery, 0) + 1
    once = sum(1 for d in accepted if counts.get(d) == 1)
    missing = sum(1 for d in accepted if d not in counts)
    doubled = sum(1 for d in accepted if counts.get(d, 0) > 1)
    unanswered = len(set(counts) - set(accepted))
    print(f"exactly-once: {len(accepted)} deliveries answered 2xx; {once} in Kafka exactly once, "
          f"{missing} missing, {doubled} more than once; {unanswered} in Kafka without a 2xx (client gave up)")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ingress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each slice")
    parser.add_argument("--slices", type=int, default=4, help="alternating ingress / bare slices per phase")
    parser.add_argument("--clients", type=int, default=32, help="concurrent keep-alive connections")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("SHIPLINE_WEB_WORKERS", "2")))
    parser.add_argument("--threads", type=int, default=16, help="gthread threads per gunicorn worker")
    parser.add_argument("--linger-ms", type=int, default=None, help="producer linger.ms (default: the app's)")
    args = parser.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        bootstrap, db = services(stack)
        prefix = f"bench{run_id}"
        ensure_topics(bootstrap, Topics(prefix), partitions=6)
        stack.callback(delete_prefixed, bootstrap, prefix)
        port = free_port()
        env = {
            "SHIPLINE_DATA_DIR": str(BENCH / f"run-{run_id}"),
            "SHIPLINE_HTTP": f"127.0.0.1:{port}",
            "SHIPLINE_WEB_WORKERS": str(args.workers),
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "DATABASE_URL": db,
            "SHIPLINE_TOPIC_PREFIX": prefix,
            "SHIPLINE_DB_SCHEMA": prefix,
            "SHIPLINE_ADMIN_TOKEN": uuid.uuid4().hex,
            "SHIPLINE_SECRET_KEY": Fernet.generate_key().decode(),
            "SHIPLINE_LOG_LEVEL": "WARNING",
        }
        stack.callback(_drop_schemas, db, prefix)
        linger = "app default" if args.linger_ms is None else args.linger_ms
        print(f"ingress bench: {args.seconds:g} s per phase in {args.slices} alternating slices, "
              f"{args.clients} clients, gunicorn {args.workers} "
              f"workers x {args.threads} threads (gthread), producer linger.ms {linger}, Kafka {bootstrap}, "
              f"{os.cpu_count()} cores shared with everything else running")
        factory = "ingress.serve:app_factory()" if args.linger_ms is None else \
            f"ingress.serve:app_factory(linger_ms={args.linger_ms})"
        base, master = gunicorn(stack, env, BENCH / "ingress.log", app=factory, threads=args.threads)
        app = requests.post(f"{base}/api/v1/apps", json={"name": "shop", "namespace": "bench",
                                                         "repo_url": "https://github.com/acme/shop"},
                            headers={"Authorization": f"Bearer {env['SHIPLINE_ADMIN_TOKEN']}"}, timeout=30).json()
        body = json.dumps(PUSH).encode()
        from ingress.crypto import signature

        make = _request_maker(f"/api/v1/webhooks/github/{app['id']}", f"127.0.0.1:{port}", body,
                              {"X-Hub-Signature-256": signature(app["github_secret"], body)})
        ingress = Phase("ingress", master, port, make)

        bare_port = free_port()
        bare_env = {**env, "SHIPLINE_HTTP": f"127.0.0.1:{bare_port}"}
        _, bare_master = gunicorn(stack, bare_env, BENCH / "bare.log", app="bench.ingress.bare:create()",
                                  threads=args.threads)
        bare = Phase("bare", bare_master, bare_port, _request_maker("/bare", f"127.0.0.1:{bare_port}", body, {}))
        # alternate slices, so a machine that slows down or speeds up mid-run moves both alike
        for i in range(args.slices):
            for phase in (ingress, bare):
                phase.slice(args, run_id, i, args.seconds / args.slices)
        ingress.report()
        bare.report()
        print(f"ratio    {ingress.rate / bare.rate if bare.rate else float('nan'):.2f} (ingress / bare Flask)")
        _exactly_once(bootstrap, Topics(prefix).inbound, ingress.result.accepted)
    return 0


def _drop_schemas(db: str, prefix: str) -> None:
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (prefix + "%",)).fetchall()
        for (name,) in rows:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


if __name__ == "__main__":
    sys.exit(main())
