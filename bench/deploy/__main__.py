"""``python -m bench.deploy [--rate 250] [--strategies docker,process]``: steady HTTP load through
the deployer's HAProxy while revision 1 -> 2 -> rollback to 1 rolls out, once per strategy.

For each strategy it prints the requests sent and failed (goal: 0), the slowest one-second rate
seen during the run (goal: >= 200 req/s throughout), and for each deploy the time from producing
the ``deploy.release`` command to consuming the ``deployed`` report (goals: <= 5 s for the busybox
image, <= 2 s for a process). Builds happen before the clock starts. Numbers only: nothing here
asserts.

The deployer runs as its own process (``python -m deployer``), as in production, with the default
health cadence unless ``--health-interval`` says otherwise; the load runs in a separate process
so neither steals the other's interpreter. Kafka: ``KAFKA_BOOTSTRAP_SERVERS`` when set, else our
own broker under ``.shipline-bench/kafka-deploy`` (stopped again if this run started it). Docker: the engine
``shipline.infra.docker_engine`` finds or starts; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from bench.deploy.load import Load
from bench.services import BENCH, ROOT, free_port, kafka_bootstrap
from deployer.teardown import stop_everything
from shipline import codec, kafka
from shipline.config import Settings
from shipline.config import load as load_settings
from shipline.envelope import Envelope, wrap
from shipline.messages import BuildImage, DeployRelease, Message
from shipline.topics import Topics, delete_prefixed, ensure_topics

SERVE_PY = '''import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = open("VERSION").read().strip().encode()


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *a):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


# ----------------------------------------------------------------------------------- plumbing


class Reports:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = kafka.consumer(bootstrap, f"bench-deploy-{uuid.uuid4().hex[:8]}", [topic])
        self.seen: list[Envelope] = []

    def wait(self, type_names: tuple[str, ...], timeout: float = 300, **fields: Any) -> Envelope:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for env in self.seen:
                if env.type in type_names and all(getattr(env.data, k) == v for k, v in fields.items()):
                    return env
            msg = self.consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                self.seen.append(codec.decode(msg.value()))
        raise SystemExit(f"no {type_names} {fields} within {timeout}s")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _repo(path: Path, strategy: str) -> dict[int, str]:
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "config", "user.email", "bench@example.com")
    _git(path, "config", "user.name", "bench")
    shas = {}
    for n in (1, 2):
        if strategy == "docker":
            (path / "index.html").write_text(f"v{n}\n")
        else:
            (path / "serve.py").write_text(SERVE_PY)
            (path / "VERSION").write_text(f"v{n}\n")
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", f"v{n}")
        shas[n] = _git(path, "rev-parse", "HEAD")
    return shas


def _settings(run: Path, bootstrap: str, prefix: str, app_id: int, health_interval: str) -> tuple[Settings, dict]:
    env = {
        "SHIPLINE_DATA_DIR": str(run / "data"),
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
        "SHIPLINE_TOPIC_PREFIX": prefix,
        "SHIPLINE_ADMIN_TOKEN": uuid.uuid4().hex,
        "SHIPLINE_SECRET_KEY": Fernet.generate_key().decode(),
        "SHIPLINE_PROXY_PORT": str(free_port() - app_id),
        "SHIPLINE_LOG_LEVEL": "WARNING",
    }
    if health_interval:
        env["SHIPLINE_HEALTH_INTERVAL"] = health_interval
    return load_settings(env), env


# -------------------------------------------------------------------------------------- a run


def bench_strategy(strategy: str, bootstrap: str, args: argparse.Namespace) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    run = BENCH / f"deploy-{run_id}"
    prefix = f"benchdeploy{run_id}"
    app_id = 1
    settings, env = _settings(run, bootstrap, prefix, app_id, args.health_interval)
    topics = Topics(prefix)
    ensure_topics(bootstrap, topics, partitions=6)
    shas = _repo(run / "repo", strategy)
    app: dict[str, Any] = {"app_id": app_id, "name": f"bench-{run_id}", "namespace": "bench", "strategy": strategy,
                           "repo_url": f"file://{run / 'repo'}", "health_path": "/"}
    if strategy == "process":
        app["command"] = f"exec {sys.executable} serve.py"
    log = open(run / "deployer.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "deployer"], cwd=ROOT, env={**os.environ, **env},
                            stdout=log, stderr=log)
    producer = kafka.producer(bootstrap)
    reports = Reports(bootstrap, topics.inbound)

    def send(msg: Message) -> float:
        kafka.send_sync(producer, topics.commands, wrap(msg, source="bench"))
        return time.monotonic()

    try:
        tags = {}
        for n in (1, 2):
            send(BuildImage(app_id=app_id, build=n, commit=shas[n], repo_url=app["repo_url"], app=app))
            built = reports.wait(("build.finished",), build=n).data
            if built.status != "succeeded":
                raise SystemExit(f"{strategy} build {n} failed:\n{built.log}")
            tags[n] = built.tags[0]
        times: dict[str, float] = {}
        t0 = send(DeployRelease(app_id=app_id, revision=1, image=tags[1], commit=shas[1], app=app))
        first = reports.wait(("deployed", "deploy.failed"), revision=1)
        times["first deploy v1"] = time.monotonic() - t0
        if first.type != "deployed":
            raise SystemExit(f"{strategy}: {first.data}")
        port = int(first.data.url.rsplit(":", 1)[1])
        with Load(port, args.rate, args.threads) as load:
            time.sleep(args.settle)
            for label, rev, n in (("v1 -> v2", 2, 2), ("rollback -> v1", 3, 1)):
                t0 = send(DeployRelease(app_id=app_id, revision=rev, image=tags[n], commit=shas[n], app=app))
                done = reports.wait(("deployed", "deploy.failed"), revision=rev)
                times[label] = time.monotonic() - t0
                if done.type != "deployed":
                    print(f"  {strategy} revision {rev} failed: {done.data}")
                time.sleep(args.settle)
            result = load.finish()
        counts = result["counts"]
        seconds = sorted(counts)[1:-1] or sorted(counts)  # the first and last seconds are partial
        return {
            "strategy": strategy, "times": times, "requests": sum(counts.values()),
            "failed": len(result["failures"]), "failures": result["failures"][:5],
            "min_rate": min(counts[s] for s in seconds) if seconds else 0,
            "mean_rate": sum(counts[s] for s in seconds) / max(1, len(seconds)),
            "bodies": result["bodies"],
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        reports.consumer.close()
        stop_everything(settings, docker=strategy == "docker")
        delete_prefixed(bootstrap, prefix)
        if strategy == "docker":
            _remove_images(app["name"])


def _remove_images(name: str) -> None:
    try:
        from shipline.infra.docker_engine import DEFAULT_SOCKET, engine_client

        client = engine_client(os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}")
        for image in client.images.list(name=name):
            for tag in image.tags:
                client.images.remove(tag)
    except Exception:  # noqa: BLE001 - clean-up only
        pass


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=250.0, help="requests per second through the proxy")
    parser.add_argument("--threads", type=int, default=16, help="keep-alive client connections")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before/after each deploy")
    parser.add_argument("--strategies", default="docker,process")
    parser.add_argument("--health-interval", default="", help="SHIPLINE_HEALTH_INTERVAL (default: the setting's)")
    args = parser.parse_args()
    BENCH.mkdir(parents=True, exist_ok=True)
    results = []
    with ExitStack() as stack:
        # a broker of its own: other benchmarks stop theirs when they finish
        bootstrap = kafka_bootstrap(stack, "kafka-deploy", "SHIPLINE_BENCH_DEPLOY_KAFKA_PORT", 29192)
        for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
            if strategy == "docker":
                try:
                    from shipline.infra.docker_engine import ensure_base_image, ensure_engine

                    ensure_base_image(ensure_engine(os.environ.get("DOCKER_HOST", "")))
                except Exception as exc:  # noqa: BLE001
                    print(f"docker: no engine ({exc}); skipped")
                    continue
            print(f"{strategy}: building v1 and v2, then v1 -> v2 -> rollback to v1 under {args.rate:g} req/s ...",
                  flush=True)
            results.append(bench_strategy(strategy, bootstrap, args))
    print()
    print(f"{'strategy':<9} {'requests':>9} {'failed':>7} {'min req/s':>10} {'mean req/s':>11}   "
          f"{'first deploy':>12} {'v1 -> v2':>9} {'rollback':>9}   answers")
    for r in results:
        t = r["times"]
        print(f"{r['strategy']:<9} {r['requests']:>9} {r['failed']:>7} {r['min_rate']:>10} {r['mean_rate']:>11.1f}   "
              f"{t.get('first deploy v1', 0):>11.2f}s {t.get('v1 -> v2', 0):>8.2f}s "
              f"{t.get('rollback -> v1', 0):>8.2f}s   {r['bodies']}")
        if r["failures"]:
            print(f"          first failures: {r['failures']}")
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (1 min) at the end of the run")
    print("deploy times: deploy.release produced -> deployed consumed (Kafka round trip included); "
          "goals <= 5 s busybox image, <= 2 s process; failed goal 0; rate goal >= 200 req/s every second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
