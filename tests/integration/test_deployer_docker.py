"""The deployer on the real Docker engine and a real HAProxy: images built from local git commits
on the registry-free busybox base image, rolling updates with zero failed requests, a failed
health check that keeps v1 serving, rollback (also to a pruned image), jobs, redelivery, SIGTERM.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.errors import ImageNotFound

from deployer.build import image_repository
from deployer.rollout import Timing
from deployer.service import Deployer, DeployerService
from deployer.strategies import scope_of
from deployer.teardown import stop_everything
from shipline import codec, kafka
from shipline.config import Settings
from shipline.envelope import Envelope, wrap
from shipline.infra.docker_engine import (
    BASE_IMAGE,
    engine_running,
    ensure_base_image,
    ensure_engine,
    stop_engine,
)
from shipline.messages import BuildImage, DeployRelease, Message, RetireApp, RunJob
from tests.conftest import ROOT, free_port, free_ports_in_a_row

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------- shared helpers


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """The real engine (started by our code when none answers) and the local base image.

    Like Kafka and PostgreSQL in ``tests/conftest.py``, an engine this session started is left
    running for the next session, except in CI.
    """
    host = os.environ.get("DOCKER_HOST", "")
    was_running = bool(host) or engine_running()
    client = ensure_engine(host, client_timeout=900)
    ensure_base_image(client)
    yield client
    if os.environ.get("CI") and not was_running:
        stop_engine()


def deployer_settings(settings: Settings, app_id: int, **changes: Any) -> Settings:
    """The test's settings with a proxy port for ``app_id`` that is free right now."""
    return dataclasses.replace(settings, proxy_port=free_ports_in_a_row(1) - app_id, health_interval=0.2, **changes)


class Repo:
    """A local git repository whose commits are the app's versions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "dev@example.com")
        self.git("config", "user.name", "dev")

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for name, text in files.items():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            (self.path / name).write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port.split("/")[0]), timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace").strip()
    finally:
        conn.close()


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60, pause: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error
            last = exc
        time.sleep(pause)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


class Load:
    """A background client hitting the proxy without pause; every answer is recorded."""

    def __init__(self, url: str, clients: int = 2) -> None:
        self.url = url
        self.stop = threading.Event()
        self.ok: dict[str, int] = {}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = get(self.url)
                if status == 200:
                    self.ok[body] = self.ok.get(body, 0) + 1
                else:
                    self.failures.append(f"HTTP {status}: {body[:80]}")
            except Exception as exc:  # noqa: BLE001
                self.failures.append(repr(exc))

    @property
    def total(self) -> int:
        return sum(self.ok.values())


class Reports:
    """Reads the inbound topic (where the deployer reports) from the beginning and remembers everything."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = kafka.consumer(bootstrap, f"reports-reader-{time.monotonic_ns()}", [topic])
        self.seen: list[Envelope] = []

    def wait(self, type_name: str, timeout: float = 120, **fields: Any) -> Envelope:
        def match(env: Envelope) -> bool:
            return env.type == type_name and all(getattr(env.data, k) == v for k, v in fields.items())

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for env in self.seen:
                if match(env):
                    return env
            msg = self.consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                self.seen.append(codec.decode(msg.value()))
        raise AssertionError(f"no {type_name} {fields} report; saw {[(e.type, e.data) for e in self.seen]}")

    def all(self, type_name: str, **fields: Any) -> list[Envelope]:
        return [e for e in self.seen if e.type == type_name and all(getattr(e.data, k) == v for k, v in fields.items())]

    def close(self) -> None:
        self.consumer.close()


def command(msg: Message) -> Envelope:
    return wrap(msg, source="shipline/streams", correlationid=f"delivery-{random.randrange(10**9)}")


def static_site(version: str) -> dict[str, str]:
    return {"index.html": f"{version}\n"}


def scope_containers(client: Any, settings: Settings) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"shipline.scope={scope_of(settings.data_dir)}"})


@pytest.fixture
def app_id() -> int:
    return random.randrange(1, 900)


@pytest.fixture
def dsettings(settings: Settings, app_id: int, docker_client: Any) -> Iterator[Settings]:
    s = deployer_settings(settings, app_id)
    yield s
    stop_everything(s)
    name = image_repository(app_config(app_id, s), scope_of(s.data_dir))
    for image in docker_client.images.list(name=name):
        for tag in image.tags:
            try:
                docker_client.images.remove(tag)
            except Exception:  # noqa: BLE001
                pass


@pytest.fixture
def deployer(dsettings: Settings) -> Iterator[Deployer]:
    d = Deployer(dsettings, threading.Event())
    yield d
    d.close()


def app_config(app_id: int, settings: Settings, **extra: Any) -> dict[str, Any]:
    return {"app_id": app_id, "name": f"app{app_id}-{scope_of(settings.data_dir)}", "namespace": "t",
            "strategy": "docker", "health_path": "/", **extra}


# ----------------------------------------------------------------------------------- engine


def test_a_container_of_the_local_base_image_answers_http_on_loopback(docker_client: Any) -> None:
    assert ensure_base_image(docker_client) == docker_client.images.get(BASE_IMAGE).id  # idempotent
    port = free_port()
    c = docker_client.containers.run(BASE_IMAGE, ["sh", "-c", f"echo base > /www/index.html && "
                                                 f"exec httpd -f -p 127.0.0.1:{port} -h /www"],
                                     detach=True, network_mode="host", init=True, labels={"shipline.test": "1"})
    try:
        assert wait_until("httpd in the container", lambda: get(f"http://127.0.0.1:{port}") == (200, "base"))
    finally:
        c.remove(force=True)


# ----------------------------------------------------------------------------------- builds


def test_build_from_a_local_commit_with_a_generated_dockerfile_serves_the_version(
    deployer: Deployer, dsettings: Settings, app_id: int, tmp_path: Path, docker_client: Any,
) -> None:
    repo = Repo(tmp_path / "repo")
    sha = repo.commit(static_site("v1"))
    repo.commit(static_site("v-later"))  # the build must use the exact commit, not the branch head
    app = app_config(app_id, dsettings)
    [finished] = deployer.handle(command(BuildImage(app_id=app_id, build=1, commit=sha, repo_url=repo.url, app=app)))
    b = finished.data
    assert b.status == "succeeded", b.log
    repository = image_repository(app, scope_of(dsettings.data_dir))
    assert repository == f"sl-{scope_of(dsettings.data_dir)}/{app['name']}-a{app_id}"
    assert b.tags == [f"{repository}:1-{sha[:7]}"] and b.exit_code == 0 and b.commit == sha
    log = Path(b.log_path).read_text()
    assert "generated one (static template)" in log and f"FROM {BASE_IMAGE}" in log and "Successfully tagged" in log
    image = docker_client.images.get(b.tags[0])
    assert image.id == b.image_id and image.labels["shipline.commit"] == sha
    port = free_port()
    out = docker_client.containers.run(b.tags[0], ["sh", "-c", f"httpd -p 127.0.0.1:{port} -h /www && "
                                                   f"wget -qO- http://127.0.0.1:{port}/"],
                                       network_mode="host", remove=True, init=True)
    assert out.decode().strip() == "v1"


def test_repo_dockerfile_with_a_failing_test_command_fails_the_build(
    deployer: Deployer, dsettings: Settings, app_id: int, tmp_path: Path, docker_client: Any,
) -> None:
    repo = Repo(tmp_path / "repo")
    dockerfile = f"FROM {BASE_IMAGE}\nCOPY site /www/\nCMD [\"sh\", \"-c\", \"exec httpd -f -p $PORT -h /www\"]\n"
    sha = repo.commit({"deploy/Dockerfile": dockerfile, "site/index.html": "v1\n"})
    good = app_config(app_id, dsettings,
                      build={"dockerfile": "deploy/Dockerfile", "test_command": "grep -q v1 /www/index.html"})
    [ok] = deployer.handle(command(BuildImage(app_id=app_id, build=1, commit=sha, repo_url=repo.url, app=good)))
    assert ok.data.status == "succeeded", ok.data.log
    assert "using the repository's deploy/Dockerfile" in ok.data.log and "tests passed" in ok.data.log

    bad = dict(good, build={"dockerfile": "deploy/Dockerfile", "test_command": "echo failing on purpose; exit 3"})
    [failed] = deployer.handle(command(BuildImage(app_id=app_id, build=2, commit=sha, repo_url=repo.url, app=bad)))
    f = failed.data
    assert (f.status, f.exit_code, f.tags) == ("failed", 3, [])
    assert "failing on purpose" in f.log and "test command exited with 3" in f.log
    failed_tag = f"{image_repository(good, scope_of(dsettings.data_dir))}:2-{sha[:7]}"
    assert not docker_client.images.list(name=failed_tag)  # the failed image is not kept

    missing = dict(good, build={"dockerfile": "nope/Dockerfile"})
    [gone] = deployer.handle(command(BuildImage(app_id=app_id, build=3, commit=sha, repo_url=repo.url, app=missing)))
    assert gone.data.status == "failed" and "not found" in gone.data.log

    # a generated Python Dockerfile needs a local python base image: nothing is pulled
    python = dict(good, build={"template": "python"})
    [nopull] = deployer.handle(command(BuildImage(app_id=app_id, build=4, commit=sha, repo_url=repo.url, app=python)))
    assert nopull.data.status == "failed" and "python:3.11-slim is not available locally" in nopull.data.log


# ----------------------------------------------------------------------------------- deploys


def test_rolling_update_and_rollback_through_kafka_with_zero_failed_requests(
    dsettings: Settings, app_id: int, tmp_path: Path, docker_client: Any,
) -> None:
    repo = Repo(tmp_path / "repo")
    app = app_config(app_id, dsettings, repo_url=repo.url)
    stop = threading.Event()
    service = DeployerService(dsettings, stop)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    producer = kafka.producer(dsettings.bootstrap_servers)
    reports = Reports(dsettings.bootstrap_servers, dsettings.topics.inbound)

    def send(msg: Message) -> Envelope:
        env = command(msg)
        kafka.send_sync(producer, dsettings.topics.commands, env)
        return env

    try:
        tags = {}
        shas = {}
        for n in (1, 2):
            shas[n] = repo.commit(static_site(f"v{n}"))
            send(BuildImage(app_id=app_id, build=n, commit=shas[n], repo_url=repo.url, app=app))
            built = reports.wait("build.finished", build=n).data
            assert built.status == "succeeded", built.log
            tags[n] = built.tags[0]
        assert reports.wait("build.started", build=1).data.log_path.endswith("/1.log")

        first = send(DeployRelease(app_id=app_id, revision=1, image=tags[1], commit=shas[1], app=app))
        deployed = reports.wait("deployed", revision=1)
        assert deployed.correlationid == first.correlationid and deployed.causationid == first.id
        url = deployed.data.url
        assert url == f"http://127.0.0.1:{dsettings.proxy_port + app_id}"
        assert get(url) == (200, "v1")

        with Load(url) as load:
            wait_until("load running", lambda: load.total > 20)
            send(DeployRelease(app_id=app_id, revision=2, image=tags[2], commit=shas[2], app=app))
            v2 = reports.wait("deployed", revision=2).data
            assert v2.image == tags[2] and len(v2.instances) == 1
            wait_until("v2 answering", lambda: load.ok.get("v2", 0) > 20)
            assert get(url) == (200, "v2")

            # rollback to revision 1's image, after pruning it: rebuilt from its commit
            docker_client.images.remove(tags[1])
            rollback = send(DeployRelease(app_id=app_id, revision=3, image=tags[1], commit=shas[1], app=app))
            v3 = reports.wait("deployed", revision=3).data
            assert v3.image == tags[1]
            wait_until("v1 answering again", lambda: get(url) == (200, "v1"))
            seen = dict(load.ok)
            wait_until("more v1 answers", lambda: load.ok.get("v1", 0) > seen.get("v1", 0) + 20)
        assert load.failures == [], load.failures[:5]
        assert load.ok.get("v1", 0) > 0 and load.ok.get("v2", 0) > 0
        log = Path(reports.wait("deploy.started", revision=3).data.log_path).read_text()
        assert "is gone: rebuilding it from commit" in log and "traffic shift 4/4" in log

        # one revision serves: a single container, revision 3's
        running = scope_containers(docker_client, dsettings)
        assert [c.labels["shipline.revision"] for c in running] == ["3"]

        # the same command delivered again is answered from the store, not deployed twice
        kafka.send_sync(producer, dsettings.topics.commands, rollback)
        wait_until("the redelivered command answered", _poll_reports(reports, "deployed", 2, revision=3))
        again = reports.all("deployed", revision=3)
        assert again[0].id == again[1].id and again[0].data == again[1].data
        assert [c.name for c in scope_containers(docker_client, dsettings)] == [c.name for c in running]

        # deleting the app retires it on the real engine: its container goes, its address stops answering
        retire = send(RetireApp(app_id=app_id, app=app))
        retired = reports.wait("app.retired", app_id=app_id)
        assert retired.causationid == retire.id
        assert (retired.data.stopped, retired.data.revision, retired.data.url) == (
            [c.name for c in running], 3, url)
        assert [c for c in scope_containers(docker_client, dsettings) if c.status == "running"] == []
        wait_until("the app's address refusing connections", lambda: refused(url), timeout=15)
        # and its images are gone from the engine (the live one too); its build logs stay
        for tag in tags.values():
            with pytest.raises(ImageNotFound):
                docker_client.images.get(tag)
        assert docker_client.images.list(name=image_repository(app, scope_of(dsettings.data_dir))) == []
        assert Path(reports.wait("build.started", build=1).data.log_path).is_file()
    finally:
        stop.set()
        runner.join(15)
        reports.close()
    assert not runner.is_alive()


def refused(url: str) -> bool:
    """Nothing listens on the URL's address any more."""
    try:
        get(url, timeout=2)
    except ConnectionRefusedError:
        return True
    return False


def _poll_reports(reports: Reports, type_name: str, count: int, **fields: Any) -> Callable[[], bool]:
    def check() -> bool:
        msg = reports.consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            reports.seen.append(codec.decode(msg.value()))
        return len(reports.all(type_name, **fields)) >= count
    return check


def test_failed_health_check_keeps_v1_serving(
    dsettings: Settings, app_id: int, tmp_path: Path, docker_client: Any,
) -> None:
    d = Deployer(dsettings, threading.Event(), timing=Timing(health_interval=0.2, health_timeout=3,
                                                             shift_interval=0.1))
    repo = Repo(tmp_path / "repo")
    app = app_config(app_id, dsettings)
    sha = repo.commit(static_site("v1"))
    [b] = d.handle(command(BuildImage(app_id=app_id, build=1, commit=sha, repo_url=repo.url, app=app)))
    [ok] = d.handle(command(DeployRelease(app_id=app_id, revision=1, image=b.data.tags[0], commit=sha, app=app)))
    assert ok.type == "deployed"
    url = ok.data.url
    with Load(url, clients=1) as load:
        # v2 answers 404 on its health path: never healthy
        [failed] = d.handle(command(DeployRelease(app_id=app_id, revision=2, image=b.data.tags[0], commit=sha,
                                                  app=dict(app, health_path="/health"))))
        assert failed.type == "deploy.failed" and failed.data.step == "health"
        assert "404" in failed.data.reason
        # v3 exits at once: fails fast with its exit code and output
        [crashed] = d.handle(command(DeployRelease(app_id=app_id, revision=3, image=BASE_IMAGE, commit="",
                                                   app=dict(app, command="echo boom; exit 3"))))
        assert crashed.type == "deploy.failed" and crashed.data.step == "health"
        assert "exit code 3" in crashed.data.reason or "gone" in crashed.data.reason
        wait_until("v1 still answering", lambda: load.ok.get("v1", 0) > 10)
    assert load.failures == []
    assert get(url) == (200, "v1")
    assert [c.labels["shipline.revision"] for c in scope_containers(docker_client, dsettings)] == ["1"]
    assert d.store.release(app_id).revision == 1  # type: ignore[union-attr]
    d.close()


def test_job_runs_to_completion_with_env_vars(deployer: Deployer, dsettings: Settings, app_id: int) -> None:
    app = app_config(app_id, dsettings, kind="job", command='echo "hello $WHO from job"; exit 4')
    [done] = deployer.handle(command(RunJob(app_id=app_id, job=1, image=BASE_IMAGE, env={"WHO": "shipline"},
                                            app=app)))
    assert done.type == "job.finished"
    assert done.data.exit_code == 4 and "hello shipline from job" in done.data.log
    log = Path(dsettings.data_dir) / "logs" / "jobs" / str(app_id) / "1.log"
    assert "hello shipline from job" in log.read_text()


# ----------------------------------------------------------------------------------- SIGTERM


def deployer_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "SHIPLINE_DATA_DIR": str(settings.data_dir),
        "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "DATABASE_URL": settings.db_url,
        "SHIPLINE_TOPIC_PREFIX": settings.topic_prefix,
        "SHIPLINE_DB_SCHEMA": settings.db_schema,
        "SHIPLINE_ADMIN_TOKEN": settings.admin_token,
        "SHIPLINE_SECRET_KEY": settings.secret_key,
        "SHIPLINE_PROXY_PORT": str(settings.proxy_port),
        "SHIPLINE_HEALTH_INTERVAL": str(settings.health_interval),
        "SHIPLINE_HEALTH_TIMEOUT": str(settings.health_timeout),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def test_sigterm_cancels_a_long_build_and_stops_within_10_seconds(
    dsettings: Settings, app_id: int, tmp_path: Path,
) -> None:
    repo = Repo(tmp_path / "repo")
    sha = repo.commit({"Dockerfile": f"FROM {BASE_IMAGE}\nRUN sleep 120\n"})
    proc = subprocess.Popen([sys.executable, "-m", "deployer"], cwd=ROOT, env=deployer_env(dsettings),
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "deployer.log", "wb"))
    reports = Reports(dsettings.bootstrap_servers, dsettings.topics.inbound)
    try:
        producer = kafka.producer(dsettings.bootstrap_servers)
        kafka.send_sync(producer, dsettings.topics.commands, command(BuildImage(
            app_id=app_id, build=1, commit=sha, repo_url=repo.url, app=app_config(app_id, dsettings))))
        started = reports.wait("build.started", build=1)
        wait_until("the RUN step", lambda: "sleep 120" in Path(started.data.log_path).read_text())
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        assert time.monotonic() - t0 < 10, (tmp_path / "deployer.log").read_text()[-2000:]
        finished = reports.wait("build.finished", build=1).data
        assert (finished.status, finished.exit_code) == ("cancelled", 143)
    finally:
        if proc.poll() is None:
            proc.kill()
        reports.close()
