"""What every benchmark needs first: Kafka, PostgreSQL, free ports, and gunicorn serving an app.

Kafka and PostgreSQL are ``KAFKA_BOOTSTRAP_SERVERS`` / ``DATABASE_URL`` when set, else our own
``shipline.infra`` servers under ``.shipline-bench/`` (ports ``SHIPLINE_BENCH_KAFKA_PORT`` 29092
and ``SHIPLINE_BENCH_PG_PORT`` 25432), adopted when already running and stopped again at the end
when this run started them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import requests

from ingress.serve import APP, THREADS, gunicorn_argv
from shipline.config import load as load_settings

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".shipline-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kafka_bootstrap(stack: ExitStack, name: str = "kafka", port_env: str = "SHIPLINE_BENCH_KAFKA_PORT",
          port: int = 29092) -> str:
    """The bootstrap address of the broker to measure against."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "")
    if bootstrap:
        return bootstrap
    from shipline.infra.kafka import LocalKafka

    broker = LocalKafka(BENCH / name, ROOT / ".shipline" / "cache", port=int(os.environ.get(port_env, str(port))))
    broker.start(timeout=300)
    if not broker.adopted:
        stack.callback(broker.stop)
    return broker.bootstrap


def postgres(stack: ExitStack) -> str:
    """The URL of the PostgreSQL server to measure against."""
    db = os.environ.get("DATABASE_URL", "")
    if db:
        return db
    from shipline.infra.postgres import LocalPostgres

    server = LocalPostgres(BENCH / "postgres", port=int(os.environ.get("SHIPLINE_BENCH_PG_PORT", "25432")))
    server.start(timeout=120)
    if not server.reused:
        stack.callback(server.stop)
    return server.url


def services(stack: ExitStack) -> tuple[str, str]:
    return kafka_bootstrap(stack), postgres(stack)


def gunicorn(stack: ExitStack, env: dict[str, str], log_path: Path, *, app: str = APP,
             threads: int = THREADS) -> tuple[str, int]:
    """``app`` served by gunicorn as production serves it, on ``env``'s ``SHIPLINE_HTTP``; its base
    URL once ``/healthz`` answers anything, and the master's pid (its workers are its children)."""
    settings = load_settings(env)
    log = open(log_path, "wb")  # noqa: SIM115 - closed by the stack
    stack.callback(log.close)
    proc = subprocess.Popen(gunicorn_argv(settings, app=app, threads=threads), env={**os.environ, **env},
                            stdout=log, stderr=log, cwd=ROOT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    base = f"http://{settings.http_host}:{settings.http_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited; see {log_path}")
        try:
            requests.get(base + "/healthz", timeout=5)  # any answer: the server is up
            return base, proc.pid
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise SystemExit(f"gunicorn did not come up; see {log_path}")


__all__ = ["BENCH", "ROOT", "free_port", "gunicorn", "kafka_bootstrap", "postgres", "services"]
