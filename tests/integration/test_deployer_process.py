"""The process strategy end to end through Kafka, and crash recovery: ``kill -9`` of a deployer in
the middle of a rollout, then a restart that reconciles to exactly one serving revision."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployer.proxy import Proxy
from deployer.service import DeployerService
from deployer.strategies import scope_of
from deployer.strategies.process import ProcessStrategy, proc_state, release_path
from deployer.teardown import stop_everything
from shipline import kafka
from shipline.config import Settings
from shipline.envelope import Envelope
from shipline.messages import BuildImage, DeployRelease, Message, RetireApp, RunJob
from tests.conftest import ROOT, free_ports_in_a_row
from tests.integration.test_deployer_docker import (
    Load,
    Repo,
    Reports,
    _poll_reports,
    command,
    deployer_env,
    deployer_settings,
    get,
    refused,
    wait_until,
)

pytestmark = pytest.mark.integration

SERVE_PY = '''import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

time.sleep(float(os.environ.get("START_DELAY", "0")))


class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = open("VERSION").read().strip().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


def version(n: int) -> dict[str, str]:
    return {"serve.py": SERVE_PY, "VERSION": f"v{n}\n"}


@pytest.fixture
def app_id() -> int:
    import random

    return random.randrange(1, 900)


@pytest.fixture
def psettings(settings: Settings, app_id: int) -> Iterator[Settings]:
    s = deployer_settings(settings, app_id)
    yield s
    stop_everything(s, docker=False)


def app_config(app_id: int, repo: Repo, **extra: Any) -> dict[str, Any]:
    return {"app_id": app_id, "name": f"p{app_id}", "namespace": "t", "strategy": "process",
            "repo_url": repo.url, "command": f"exec {sys.executable} serve.py", "health_path": "/", **extra}


def serving(settings: Settings, app_id: int) -> dict[str, tuple[str, int]]:
    """slot -> (status, weight) of every slot that can take traffic, from HAProxy itself."""
    stats = Proxy(settings.data_dir, settings.proxy_port).stats(app_id)
    return {name: (row["status"], int(row["weight"] or 0)) for name, row in stats.items()
            if name not in ("FRONTEND", "BACKEND") and row["status"] != "MAINT" and int(row["weight"] or 0) > 0}


def our_processes(settings: Settings) -> dict[str, Any]:
    return ProcessStrategy(settings.data_dir, scope_of(settings.data_dir), rebuild=lambda *a: "").running_ids()


@contextlib.contextmanager
def deployer_running(settings: Settings) -> Iterator[tuple[Callable[[Envelope], Envelope], Reports]]:
    """A DeployerService on a thread of its own, ``send(envelope)`` onto its commands topic, and its
    reports; on the way out the service is stopped and must have ended."""
    stop = threading.Event()
    runner = threading.Thread(target=DeployerService(settings, stop).run, daemon=True)
    runner.start()
    producer = kafka.producer(settings.bootstrap_servers)
    reports = Reports(settings.bootstrap_servers, settings.topics.inbound)

    def send(env: Envelope) -> Envelope:
        kafka.send_sync(producer, settings.topics.commands, env)
        return env

    try:
        yield send, reports
    finally:
        stop.set()
        runner.join(15)
        reports.close()
    assert not runner.is_alive()


def test_process_strategy_end_to_end_through_kafka(psettings: Settings, app_id: int, tmp_path: Path) -> None:
    repo = Repo(tmp_path / "repo")
    app = app_config(app_id, repo)
    with deployer_running(psettings) as (send_command, reports):

        def send(msg: Message) -> Envelope:
            return send_command(command(msg))

        shas, tags = {}, {}
        for n in (1, 2):
            shas[n] = repo.commit(version(n))
            send(BuildImage(app_id=app_id, build=n, commit=shas[n], repo_url=repo.url, app=app))
            built = reports.wait("build.finished", build=n).data
            assert built.status == "succeeded", built.log
            tags[n] = built.tags[0]
            assert tags[n].startswith("process:") and tags[n].endswith(f"/{n}-{shas[n][:7]}")
            assert (Path(tags[n].removeprefix("process:")) / "VERSION").read_text() == f"v{n}\n"

        send(DeployRelease(app_id=app_id, revision=1, image=tags[1], commit=shas[1], app=app))
        url = reports.wait("deployed", revision=1).data.url
        assert get(url) == (200, "v1")
        with Load(url) as load:
            wait_until("load running", lambda: load.total > 20)
            send(DeployRelease(app_id=app_id, revision=2, image=tags[2], commit=shas[2], app=app))
            assert reports.wait("deployed", revision=2).data.image == tags[2]
            wait_until("v2 answering", lambda: load.ok.get("v2", 0) > 20)
            send(DeployRelease(app_id=app_id, revision=3, image=tags[1], commit=shas[1], app=app))  # rollback
            reports.wait("deployed", revision=3)
            wait_until("v1 answering again", lambda: get(url) == (200, "v1"))
        assert load.failures == [], load.failures[:5]
        assert [i.port for i in our_processes(psettings).values()] == [
            int(a.rsplit(":", 1)[1]) for a in reports.wait("deployed", revision=3).data.instances]

        # a failing test command fails the build; a job runs the app's command with env vars
        bad = dict(app, build={"test_command": "exit 5"})
        send(BuildImage(app_id=app_id, build=3, commit=shas[2], repo_url=repo.url, app=bad))
        assert (reports.wait("build.finished", build=3).data.status, reports.wait("build.finished", build=3)
                .data.exit_code) == ("failed", 5)
        job_app = dict(app, command='echo "job says $MESSAGE from $(cat VERSION)"; exit 2')
        send(RunJob(app_id=app_id, job=1, image=tags[2], env={"MESSAGE": "hello"}, app=job_app))
        job = reports.wait("job.finished", job=1).data
        assert job.exit_code == 2 and "job says hello from v2" in job.log


def rollout_phase(settings: Settings, app_id: int) -> str | None:
    db = sqlite3.connect(f"file:{Path(settings.data_dir) / 'deployer' / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT phase FROM rollouts WHERE app_id = ?", (app_id,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


@pytest.mark.parametrize("phase", ["starting", "shifting"])
def test_kill_9_mid_rollout_then_restart_reconciles_to_one_revision(
    psettings: Settings, app_id: int, tmp_path: Path, phase: str,
) -> None:
    import dataclasses

    # health every 2 s: the traffic shift (4 steps over one health interval) is a window to kill in
    s = dataclasses.replace(psettings, health_interval=2.0)
    repo = Repo(tmp_path / "repo")
    app = app_config(app_id, repo)
    env = deployer_env(s)
    logs = open(tmp_path / "deployer.log", "ab")

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "deployer"], cwd=ROOT, env=env, stdout=logs, stderr=logs)

    producer = kafka.producer(s.bootstrap_servers)
    reports = Reports(s.bootstrap_servers, s.topics.inbound)
    first = start()
    second: subprocess.Popen[bytes] | None = None
    try:
        shas = {n: repo.commit(version(n)) for n in (1,)}
        kafka.send_sync(producer, s.topics.commands, command(
            DeployRelease(app_id=app_id, revision=1, image="", commit=shas[1], app=app)))
        url = reports.wait("deployed", revision=1).data.url  # no build: the release is cloned from its commit
        shas[2] = repo.commit(version(2))
        # "starting": the new instance takes 3 s to listen, the kill lands while it is health-checked
        app2 = dict(app, env={"START_DELAY": "3"}) if phase == "starting" else app
        deploy2 = command(DeployRelease(app_id=app_id, revision=2, image="", commit=shas[2], app=app2))
        with Load(url) as load:
            wait_until("load running", lambda: load.total > 10)
            kafka.send_sync(producer, s.topics.commands, deploy2)
            wait_until(f"rollout phase {phase}", lambda: rollout_phase(s, app_id) == phase, pause=0.01)
            if phase == "shifting":
                wait_until("v2 taking some traffic", lambda: load.ok.get("v2", 0) > 0, timeout=10, pause=0.01)
            else:
                wait_until("v2 started", lambda: any("-r2-" in i for i in our_processes(s)), timeout=10, pause=0.01)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            revisions = sorted({i.split("-r")[1].split("-")[0] for i in our_processes(s)})
            assert revisions == ["1", "2"]  # the crash left both running
            second = start()
            reports.wait("deployed", revision=2, timeout=120)
            # the killed deployer never committed: the command comes again and is answered, not redone
            wait_until("the redelivered command answered",
                       _poll_reports(reports, "deployed", 2 if phase == "shifting" else 1, revision=2), timeout=120)
            running = our_processes(s)
            wait_until("only revision 2 serving", lambda: get(url) == (200, "v2"))
            for _ in range(20):
                assert get(url) == (200, "v2")
        assert load.failures == [], load.failures[:5]
        assert load.ok.get("v1", 0) > 0 and load.ok.get("v2", 0) > 0
        assert len(running) == 1 and next(iter(running)).split("-r")[1].startswith("2-")
        assert len(serving(s, app_id)) == 1
        assert rollout_phase(s, app_id) is None
        deployed = reports.all("deployed", revision=2)
        assert len({e.id for e in deployed}) == 1  # every answer is the same event
        assert not reports.all("deploy.failed")
        second.send_signal(signal.SIGTERM)
        second.wait(15)
        assert get(url) == (200, "v2")  # the app outlives its deployer
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
        reports.close()
        logs.close()


def test_adding_an_app_reloads_haproxy_seamlessly_and_a_taken_port_fails_only_that_deploy(
    psettings: Settings, app_id: int, tmp_path: Path,
) -> None:
    import dataclasses
    import socket

    from deployer.service import Deployer

    base = free_ports_in_a_row(4)  # the four apps' proxy ports
    psettings = dataclasses.replace(psettings, proxy_port=base - app_id)
    d = Deployer(psettings, threading.Event())
    repo = Repo(tmp_path / "repo")
    sha = repo.commit(version(1))
    a = app_config(app_id, repo)
    [ok] = d.handle(command(DeployRelease(app_id=app_id, revision=1, image="", commit=sha, app=a)))
    assert ok.type == "deployed", ok.data
    other = app_id + 1
    b = dict(app_config(other, repo), name="other")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", psettings.proxy_port + other))
    squatter.listen()
    with Load(ok.data.url) as load:
        wait_until("load running", lambda: load.total > 10)
        [failed] = d.handle(command(DeployRelease(app_id=other, revision=1, image="", commit=sha, app=b)))
        assert failed.type == "deploy.failed" and failed.data.step == "proxy" and "in use" in failed.data.reason
        assert other not in d.proxy.state().apps  # not recorded: it cannot spoil the next reload
        squatter.close()
        for app_n in (other, other + 1, other + 2):  # three new frontends: three reloads under load
            [added] = d.handle(command(DeployRelease(app_id=app_n, revision=1, image="", commit=sha,
                                                     app=dict(b, app_id=app_n))))
            assert added.type == "deployed", added.data
            assert get(added.data.url) == (200, "v1")
        before = load.total
        wait_until("more load after the reloads", lambda: load.total > before + 10)
    assert load.failures == [], load.failures[:5]
    d.close()


def release_row(settings: Settings, app_id: int) -> tuple[Any, ...] | None:
    db = sqlite3.connect(f"file:{Path(settings.data_dir) / 'deployer' / 'state.db'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute("SELECT revision, instances FROM releases WHERE app_id = ?", (app_id,)).fetchone()
    finally:
        db.close()


def test_retire_takes_the_app_off_the_proxy_and_stops_it_and_leaves_other_apps_serving(
    psettings: Settings, app_id: int, tmp_path: Path,
) -> None:
    import dataclasses

    from deployer.ports import PortAllocator

    s = dataclasses.replace(psettings, proxy_port=free_ports_in_a_row(2) - app_id)  # the two apps' proxy ports
    other = app_id + 1
    repo = Repo(tmp_path / "repo")
    sha = repo.commit(version(1))
    apps = {a: app_config(a, repo) for a in (app_id, other)}

    def instances_of(a: int) -> dict[str, Any]:
        return {iid: i for iid, i in our_processes(s).items() if f"-a{a}-" in iid}

    with deployer_running(s) as (send, reports):
        urls = {}
        for a in (app_id, other):  # no build: each release is cloned from the commit
            send(command(DeployRelease(app_id=a, revision=1, image="", commit=sha, app=apps[a])))
            urls[a] = reports.wait("deployed", app_id=a, revision=1).data.url
            assert get(urls[a]) == (200, "v1")
        [(iid, inst)] = instances_of(app_id).items()
        [(other_iid, other_inst)] = instances_of(other).items()
        folders = {a: release_path(json.loads(release_row(s, a)[1])[0]["image"]) for a in (app_id, other)}
        assert all(f is not None and f.is_dir() for f in folders.values()), folders

        with Load(urls[other]) as load:
            wait_until("load on the other app", lambda: load.total > 10)
            retire = send(command(RetireApp(app_id=app_id, app=apps[app_id])))
            retired = reports.wait("app.retired", app_id=app_id)
            before = load.total
            wait_until("more load on the other app after the retire", lambda: load.total > before + 10)
        assert load.failures == [], load.failures[:5]  # the reload removing the app is seamless for the rest

        assert retired.causationid == retire.id and retired.correlationid == retire.correlationid
        assert (retired.data.stopped, retired.data.revision, retired.data.url) == ([iid], 1, urls[app_id])
        # the report comes after the work: the instance is stopped, its process gone from the machine
        assert instances_of(app_id) == {}
        st = proc_state(inst.pid)
        assert st is None or st[1] != inst.starttime, st
        # the proxy no longer listens for the app, and HAProxy has no backend for it
        wait_until("the app's proxy address refusing connections", lambda: refused(urls[app_id]), timeout=15)
        proxy = Proxy(s.data_dir, s.proxy_port)
        assert app_id not in proxy.state().apps and proxy.stats(app_id) == {}
        # the deployer forgot it: no release to reconcile back to life, its port is free again, and
        # its release folder is gone (the other app's stays)
        assert release_row(s, app_id) is None and rollout_phase(s, app_id) is None
        assert not folders[app_id].exists() and folders[other].is_dir()  # type: ignore[union-attr]
        assert iid not in PortAllocator(s.data_dir, s.app_ports).allocated().values()
        # the other app is untouched
        assert instances_of(other) == {other_iid: other_inst} and get(urls[other]) == (200, "v1")
        assert release_row(s, other) is not None

        # the same command delivered again is answered with the same report; a new retire of the
        # retired app stops nothing and still reports
        send(retire)
        wait_until("the redelivered retire answered", _poll_reports(reports, "app.retired", 2, app_id=app_id))
        assert {e.id for e in reports.all("app.retired", app_id=app_id)} == {retired.id}
        again = send(command(RetireApp(app_id=app_id, app=apps[app_id])))

        def answer_to_again() -> list[Envelope]:
            _poll_reports(reports, "app.retired", 0)()  # reads one more record, if any
            return [e for e in reports.all("app.retired") if e.causationid == again.id]

        [second] = wait_until("the second retire reported", answer_to_again)
        assert (second.data.stopped, second.data.revision, second.data.url) == ([], None, "")
        assert refused(urls[app_id]) and get(urls[other]) == (200, "v1")
        assert instances_of(other) == {other_iid: other_inst}
