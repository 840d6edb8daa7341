"""Kill -9 each part of a running stack in turn under load, then prove nothing was lost or doubled.

Used by ``python -m bench.faults`` (long run) and ``tests/e2e/test_faults.py`` (short run in CI).
Load: signed GitHub pushes round-robin over several process-strategy apps, each subscribed to
every event by a local receiver. Faults: an ingress (gunicorn) worker, the stream worker, the
deployer, the projector, the dispatcher, the Kafka broker and PostgreSQL, each killed with
SIGKILL and restarted by the supervisor. Afterwards, from the Kafka log, the tables and the
receiver: every delivery answered 2xx is in the history exactly once; no sequence, build number
or revision is doubled or skipped; every subscribed event reached the receiver with one stable
delivery id; while Kafka was down the ingress never answered 2xx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import requests

from shipline import codec, kafka

PROBE_GRACE = 2.0
TARGETS = ["web", "streams", "deployer", "projector", "dispatcher", "kafka", "postgres"]


class Receiver:
    """Records every outbound delivery; answers 204."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str]] = []  # (event id from webhook-id header, X-Shipline-Delivery)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    event_id = json.loads(body).get("id", "")
                except ValueError:
                    event_id = ""
                with outer.lock:
                    outer.got.append((event_id or self.headers.get("webhook-id", ""),
                                      self.headers.get("X-Shipline-Delivery", "")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks"


@dataclass
class Fault:
    target: str
    killed_at: float
    recovered_s: float | None = None
    kafka_back_at: float | None = None


@dataclass
class Result:
    faults: list[Fault] = field(default_factory=list)
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    sequence_problems: list[str] = field(default_factory=list)
    outbound_missing: list[str] = field(default_factory=list)
    outbound_unstable: list[str] = field(default_factory=list)
    outage_answers: Counter[int] = field(default_factory=Counter)
    outbound_expected: int = 0
    kafka_timeline: list[str] = field(default_factory=list)
    pending: str = ""
    events: int = 0
    builds: int = 0
    revisions: int = 0
    deployed: int = 0
    quiesced: bool = False
    elapsed: float = 0.0

    @property
    def accepted(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    @property
    def refused(self) -> int:
        return self.sent - self.accepted

    @property
    def outage_2xx(self) -> int:
        return sum(n for s, n in self.outage_answers.items() if 200 <= s < 300)

    def table(self) -> str:
        faults = ", ".join(
            f"{f.target} (back in {f.recovered_s:.1f}s)" if f.recovered_s is not None else f"{f.target} (NOT BACK)"
            for f in self.faults
        )
        rows = [
            ("faults injected (kill -9)", f"{len(self.faults)}: {faults}"),
            ("deliveries sent", str(self.sent)),
            ("  accepted (2xx)", str(self.accepted)),
            ("  refused (503 / no answer)", f"{self.refused}  {dict(sorted(self.statuses.items()))}"),
            ("lost", f"{len(self.lost)}  {self.lost[:5]}"),
            ("duplicated", f"{len(self.duplicated)}  {self.duplicated[:5]}"),
            ("sequence/build/revision gaps or doubles", f"{len(self.sequence_problems)}  {self.sequence_problems[:5]}"),
            ("outbound events expected", str(self.outbound_expected)),
            ("  never delivered", f"{len(self.outbound_missing)}  {self.outbound_missing[:5]}"),
            ("outbound delivery id unstable", f"{len(self.outbound_unstable)}"),
            ("answers while Kafka was down", f"{dict(self.outage_answers)} (2xx: {self.outage_2xx})"),
            ("  kafka outage", "; ".join(self.kafka_timeline)),
            ("events in the log", str(self.events)),
            ("builds / revisions / deployed", f"{self.builds} / {self.revisions} / {self.deployed}"),
            ("quiesced", "yes" if self.quiesced else f"NO (timed out: {self.pending})"),
            ("elapsed", f"{self.elapsed:.0f}s"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


APP_PY = """import os
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


class FaultRun:
    def __init__(self, stack: Any, apps: int = 3, rate: float = 4.0, settle: float = 6.0,
                 targets: list[str] | None = None, quiesce_timeout: float = 300.0, say: Any = print) -> None:
        self.stack = stack
        self.n_apps = apps
        self.rate = rate
        self.settle = settle
        self.targets = targets or TARGETS
        self.quiesce_timeout = quiesce_timeout
        self.say = say
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {stack.admin_token}"
        self.result = Result()
        self.answers: list[tuple[float, float, str, int, int]] = []  # (start, end, delivery, app, status)
        self.apps: list[dict[str, Any]] = []
        self.stop_load = threading.Event()
        self.receiver = Receiver()

    # ------------------------------------------------------------------ setup

    def _repo(self, name: str) -> tuple[str, str]:
        repo = self.stack.data_dir / "fault-repos" / name
        repo.mkdir(parents=True)
        (repo / "serve.py").write_text(APP_PY)
        for args in (["init", "-q", "-b", "main"], ["add", "-A"],
                     ["-c", "user.name=F", "-c", "user.email=f@x", "commit", "-qm", "v1"]):
            subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                             text=True).stdout.strip()
        return f"file://{repo}", sha

    probe_topic = "faults.probe"

    def setup(self) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.stack.bootstrap})
        admin.create_topics([NewTopic(self.probe_topic, 1, 1)])[self.probe_topic].result(30)
        base = self.stack.base
        for i in range(self.n_apps):
            name = f"fault-{i}-{uuid.uuid4().hex[:4]}"
            url, sha = self._repo(name)
            resp = self.http.post(f"{base}/api/v1/apps", json={
                "name": name, "namespace": "faults", "repo_url": url, "strategy": "process",
                "command": "python3 serve.py"}, timeout=30)
            resp.raise_for_status()
            app = resp.json() | {"sha": sha, "repo_url": url}
            sub = self.http.post(f"{base}/api/v1/apps/{app['id']}/subscriptions",
                                 json={"url": self.receiver.url, "events": ["*"]}, timeout=30)
            sub.raise_for_status()
            app["subscription_id"] = sub.json()["id"]
            self.apps.append(app)
        self.say(f"  {self.n_apps} apps, each subscribed to '*' at {self.receiver.url}; load {self.rate}/s")

    # ------------------------------------------------------------------- load

    def _push(self, app: dict[str, Any]) -> None:
        delivery = str(uuid.uuid4())
        body = json.dumps({
            "ref": "refs/heads/main", "after": app["sha"], "deleted": False,
            "repository": {"clone_url": app["repo_url"], "name": app["name"], "id": app["id"],
                           "owner": {"login": "faults", "id": 1}},
            "head_commit": {"id": app["sha"], "message": f"push {delivery[:8]}",
                            "author": {"name": "F", "email": "f@x", "username": "f"}},
        }).encode()
        sig = "sha256=" + hmac.new(app["github_secret"].encode(), body, hashlib.sha256).hexdigest()
        start = time.time()
        try:
            status = requests.post(app["github_webhook_url"], data=body, timeout=15, headers={
                "Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": delivery,
                "X-Hub-Signature-256": sig}).status_code
        except requests.RequestException:
            status = 0
        self.answers.append((start, time.time(), delivery, app["id"], status))

    def load(self) -> None:
        i = 0
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        workers: list[threading.Thread] = []
        while not self.stop_load.is_set():
            app = self.apps[i % len(self.apps)]
            t = threading.Thread(target=self._push, args=(app,), daemon=True)
            t.start()
            workers.append(t)
            i += 1
            next_at += interval
            self.stop_load.wait(max(0.0, next_at - time.monotonic()))
        for t in workers:
            t.join(20)

    # ----------------------------------------------------------------- faults

    def _status(self) -> dict[str, Any]:
        path = self.stack.data_dir / "run" / "status.json"
        return json.loads(path.read_text())["services"]  # type: ignore[no-any-return]

    def _victim(self, target: str) -> int:
        pid = self._status()[target]["pid"]
        if target == "web":  # an ingress worker: a child of the gunicorn master
            out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
            if out:
                return int(out[0])
        return int(pid)

    def _wait_ready(self, timeout: float = 120) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.stack.readyz().status_code == 200:
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.2)
        return False

    def _kafka_back(self, timeout: float = 120) -> float | None:
        """When the broker acknowledges a write again (a probe record on ``faults.probe``):
        measured with a real produce, not read from cached metadata."""
        from shipline.envelope import wrap
        from shipline.messages import DeployHookDeleted

        # reconnect fast: librdkafka's default back-off grows to 10 s and would date "back" late
        p = kafka.producer(self.stack.bootstrap, **{"message.timeout.ms": 1000, "reconnect.backoff.ms": 20,
                                                    "reconnect.backoff.max.ms": 200})
        probe = wrap(DeployHookDeleted(app_id=0, hook_id="probe"), source="faults")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kafka.send_sync(p, self.probe_topic, probe, timeout=1.5)
                return time.time()
            except kafka.NotDurable:
                time.sleep(0.1)
        return None

    def inject(self, target: str) -> None:
        pid = self._victim(target)
        fault = Fault(target, killed_at=time.time())
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)  # let the supervisor and /readyz notice
        t0 = time.monotonic()
        if target == "kafka":
            fault.kafka_back_at = self._kafka_back()
        if self._wait_ready():
            fault.recovered_s = time.monotonic() - t0 + 1.0
        self.result.faults.append(fault)
        self.say(f"  killed {target} (pid {pid}); "
                 + (f"ready again after {fault.recovered_s:.1f}s" if fault.recovered_s else "NOT ready again"))

    # ----------------------------------------------------------------- checks

    def _events(self) -> list[Any]:
        c = kafka.consumer(self.stack.bootstrap, f"faults-{uuid.uuid4().hex}", ["shipline.events"])
        out = []
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 3.0:
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            idle_since = time.monotonic()
            try:
                out.append(codec.decode(msg.value()))
            except codec.InvalidRecord:
                pass
        c.close()
        return out

    def _projected(self) -> set[str]:
        port = self.stack.env["SHIPLINE_PG_PORT"]
        with psycopg.connect(f"postgresql://shipline@127.0.0.1:{port}/shipline", connect_timeout=5) as conn:
            return {r[0] for r in conn.execute("SELECT delivery_id FROM shipline_projections.deliveries")}

    def quiesce(self) -> list[Any]:
        accepted = {d for _, _, d, _, s in self.answers if 200 <= s < 300}
        deadline = time.monotonic() + self.quiesce_timeout
        events: list[Any] = []
        while time.monotonic() < deadline:
            try:
                projected = self._projected()
            except psycopg.Error:
                time.sleep(1)
                continue
            events = self._events()
            expected = set(self._expected_outbound(events))
            with self.receiver.lock:
                delivered = {did for _, did in self.receiver.got}
            settled = self._settled(events)
            if accepted <= projected and expected <= delivered and settled:
                self.result.quiesced = True
                return events
            self.result.pending = (f"{len(accepted - projected)} accepted deliveries not projected, "
                                   f"{len(expected - delivered)} outbound deliveries not received, "
                                   f"builds/deploys settled: {settled}")
            time.sleep(2)
        return events or self._events()

    def _expected_outbound(self, events: list[Any]) -> dict[str, str]:
        """delivery id -> event id of every event the receiver must get (deterministic ids)."""
        from outbound.events import matches
        from outbound.ingest import delivery_id

        subs = {a["id"]: a["subscription_id"] for a in self.apps}
        since: dict[int, int] = {}
        for e in events:
            if e.type == "subscription.created" and e.data.subscription_id == subs.get(e.data.app_id):
                since[e.data.app_id] = e.sequence
        return {
            delivery_id(subs[e.data.app_id], e.id): e.id
            for e in events
            if e.data.app_id in since and e.sequence > since[e.data.app_id] and matches(["*"], e.type)
        }

    @staticmethod
    def _settled(events: list[Any]) -> bool:
        """Every queued build finished and every released revision reached an end state."""
        builds = {(e.data.app_id, e.data.build) for e in events if e.type == "build.queued"}
        finished = {(e.data.app_id, e.data.build) for e in events if e.type == "build.finished"}
        requested = {(e.data.app_id, e.data.revision) for e in events if e.type == "deploy.requested"}
        ended = {(e.data.app_id, e.data.revision) for e in events
                 if e.type in ("deployed", "deploy.failed", "deploy.superseded")}
        return builds <= finished and requested <= ended

    def check(self, events: list[Any]) -> None:
        r = self.result
        app_ids = {a["id"] for a in self.apps}
        events = [e for e in events if e.data.app_id in app_ids]
        unique = {e.id: e for e in events}  # identical re-sends (at-least-once) collapse by id
        r.events = len(unique)
        accepted = {d for _, _, d, _, s in self.answers if 200 <= s < 300}
        projected = self._projected()
        r.lost = sorted(accepted - projected)
        per_delivery = Counter(e.data.delivery_id for e in unique.values() if e.type == "delivery.accepted")
        r.duplicated = sorted(d for d, n in per_delivery.items() if n > 1)
        r.lost += sorted(d for d in accepted if per_delivery[d] == 0 and d not in r.lost)
        by_app: dict[int, list[Any]] = defaultdict(list)
        for e in unique.values():
            by_app[e.data.app_id].append(e)
        for app_id, evs in by_app.items():
            seqs = Counter(e.sequence for e in evs)
            doubled = [s for s, n in seqs.items() if n > 1]
            expected = set(range(1, max(seqs) + 1)) if seqs else set()
            missing = sorted(expected - set(seqs))
            if doubled or missing:
                r.sequence_problems.append(f"app {app_id}: sequence doubled {doubled[:3]} missing {missing[:3]}")
            for kind, attr in (("build.queued", "build"), ("deploy.requested", "revision")):
                nums = Counter(getattr(e.data, attr) for e in evs if e.type == kind)
                if nums and (any(n > 1 for n in nums.values()) or set(nums) != set(range(1, max(nums) + 1))):
                    r.sequence_problems.append(f"app {app_id}: {kind} numbers {sorted(nums)}")
        r.builds = sum(1 for e in unique.values() if e.type == "build.queued")
        r.revisions = sum(1 for e in unique.values() if e.type == "deploy.requested")
        r.deployed = sum(1 for e in unique.values() if e.type == "deployed")
        with self.receiver.lock:
            got = list(self.receiver.got)
        expected = self._expected_outbound(list(unique.values()))
        received = {did for _, did in got}
        r.outbound_expected = len(expected)
        r.outbound_missing = sorted(eid for did, eid in expected.items() if did not in received)
        delivery_ids: dict[str, set[str]] = defaultdict(set)
        for eid, did in got:
            if eid:
                delivery_ids[eid].add(did)
        r.outbound_unstable = sorted(eid for eid, dids in delivery_ids.items() if len(dids) > 1)
        for fault in r.faults:
            if fault.target != "kafka":
                continue
            # The probe notices the broker back within ~1.5 s; a request that ended more than
            # PROBE_GRACE before that never had a broker to acknowledge it.
            back = fault.kafka_back_at or time.time()
            down_to = back - PROBE_GRACE
            first_2xx = min((end for start, end, _d, _a, status in self.answers
                             if start >= fault.killed_at and 200 <= status < 300), default=None)
            r.kafka_timeline.append(
                f"broker acks again {back - fault.killed_at:.1f}s after the kill; first 2xx answered "
                + (f"{first_2xx - fault.killed_at:.1f}s after" if first_2xx else "never"))
            for start, end, _d, _a, status in self.answers:
                if fault.killed_at <= start and end <= down_to:  # the whole request saw no broker
                    r.outage_answers[status] += 1

    # ------------------------------------------------------------------- run

    def run(self) -> Result:
        t0 = time.monotonic()
        self.setup()
        loader = threading.Thread(target=self.load, daemon=True)
        loader.start()
        time.sleep(self.settle)
        for target in self.targets:
            self.inject(target)
            time.sleep(self.settle)
        self.stop_load.set()
        loader.join(60)
        self.result.sent = len(self.answers)
        self.result.statuses = Counter(s for *_, s in self.answers)
        self.say(f"  load stopped after {self.result.sent} deliveries; waiting for the pipeline to settle")
        events = self.quiesce()
        self.check(events)
        self.result.elapsed = time.monotonic() - t0
        return self.result
