"""The deployer's pure parts and local pieces: proxy config, Dockerfile generation, tags, the
store, the port allocator, health probes, process instances and jobs (no Kafka, no Docker)."""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from deployer.build import (
    BuildFailed,
    _build_number,
    _inside,
    base_images,
    clone,
    detect_template,
    generate_dockerfile,
    image_tag,
    sanitize,
)
from deployer.health import probe, wait_healthy
from deployer.locks import AppLocks
from deployer.ports import PortAllocator, port_is_free
from deployer.proxy import AppProxy, Proxy, ProxyState, Slot, render_config
from deployer.rollout import Rollouts, Timing, _app_of
from deployer.service import outcome_message, report
from deployer.store import Instance, Release, Rollout, Store
from deployer.strategies import app_env, scope_of
from deployer.strategies.process import ProcessStrategy
from shipline import codec
from shipline.envelope import derive_id, wrap
from shipline.messages import Deployed, DeployFailed, DeployRelease

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------------------------ proxy


def test_proxy_config_has_one_frontend_per_app_on_its_stable_port_and_slots_in_their_state() -> None:
    state = ProxyState({
        3: AppProxy(3, 8003, [Slot("s1", port=20001, weight=100, state="ready", instance="a"),
                              Slot("s2", port=20002, weight=40, state="drain", instance="b"), Slot("s3")]),
        1: AppProxy(1, 8001, [Slot("s1")]),
    })
    cfg = render_config(state, stats_socket=Path("/x/stats.sock"))
    assert "master-worker" in cfg and "expose-fd listeners" in cfg
    assert cfg.index("frontend app_1") < cfg.index("frontend app_3")
    assert "bind 127.0.0.1:8003" in cfg and "bind 127.0.0.1:8001" in cfg
    assert "server s1 127.0.0.1:20001 weight 100\n" in cfg
    assert "server s2 127.0.0.1:20002 weight 0\n" in cfg  # draining: no new traffic after a reload
    assert "server s3 127.0.0.1:1 weight 0 disabled" in cfg
    assert "retry-on conn-failure empty-response" in cfg and "option redispatch" in cfg
    assert ProxyState.from_json(state.to_json()) == state


def test_generated_haproxy_config_is_valid_for_the_real_haproxy(tmp_path: Path) -> None:
    state = ProxyState({5: AppProxy(5, 18005, [Slot("s1", port=21000, weight=100, state="ready", instance="i"),
                                               Slot("s2")])})
    path = tmp_path / "haproxy.cfg"
    path.write_text(render_config(state, stats_socket=tmp_path / "s.sock"))
    out = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------ build


# the repository[:tag] grammar of distribution/reference (no registry host, no digest)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*:[\w][\w.-]{{0,127}}")


def test_image_tags_are_app_name_and_id_in_the_stack_scope_build_and_short_sha() -> None:
    assert image_tag({"app_id": 3, "name": "My App!"}, 12, "abcdef0123456789", "1234abcd") == (
        "sl-1234abcd/my-app-a3:12-abcdef0")
    assert image_tag({"app_id": 4}, 1, "0" * 40, "1234abcd") == "sl-1234abcd/app-a4:1-0000000"
    assert image_tag({"app_id": 4, "name": "web"}, 1, "0" * 40) == "web-a4:1-0000000"  # no scope given
    assert sanitize("__") == "app" and sanitize("a..b._c__d--e") == "a-b-c__d--e"
    for name in ("My App!", "a..b", "x._-y", "-.lead", "UPPER_case.dots", "ünïcode", "9"):
        tag = image_tag({"app_id": 7, "name": name}, 2, "f" * 40, "00ff00ff")
        assert _REFERENCE.fullmatch(tag), tag


def test_same_named_apps_never_share_an_image_tag() -> None:
    sha = "abcdef0123456789"
    tags = {
        image_tag({"app_id": 1, "namespace": "team-a", "name": "web"}, 1, sha, "1234abcd"),
        image_tag({"app_id": 2, "namespace": "team-b", "name": "web"}, 1, sha, "1234abcd"),  # other namespace
        image_tag({"app_id": 3, "namespace": "team-a", "name": "web"}, 1, sha, "1234abcd"),  # re-created
        image_tag({"app_id": 1, "namespace": "team-a", "name": "web"}, 1, sha, "5678ef01"),  # other stack
    }
    assert len(tags) == 4


def test_the_build_number_is_read_back_from_old_and_new_tags() -> None:
    assert _build_number("my-app:12-abcdef0") == 12  # the form before app ids were in tags
    assert _build_number("sl-1234abcd/my-app-a3:12-abcdef0") == 12
    assert _build_number(image_tag({"app_id": 30, "name": "a-a1"}, 7, "0123456789", "1234abcd")) == 7
    assert _build_number("busybox:latest") == 0


def test_template_detection(tmp_path: Path) -> None:
    assert detect_template(tmp_path) == "static"
    (tmp_path / "app.py").write_text("")
    assert detect_template(tmp_path) == "python"
    (tmp_path / "package.json").write_text("{}")
    assert detect_template(tmp_path) == "node"


def test_generated_dockerfiles() -> None:
    static = generate_dockerfile("static", {})
    assert static.startswith("FROM shipline/busybox:latest\n") and "httpd -f -p ${PORT" in static
    python = generate_dockerfile("python", {"command": "gunicorn app:app"})
    assert "FROM python:3.11-slim" in python and "requirements.txt" in python and '"gunicorn app:app"' in python
    node = generate_dockerfile("node", {"build": {"base_image": "local/node:20"}})
    assert node.startswith("FROM local/node:20\n") and "npm ci" in node and '"npm start"' in node
    with pytest.raises(BuildFailed):
        generate_dockerfile("cobol", {})


def test_base_images_of_a_dockerfile() -> None:
    text = "FROM --platform=linux/amd64 node:20 AS deps\nRUN x\nfrom deps\nFROM scratch\n"
    assert base_images(text) == [("node:20", "deps"), ("deps", ""), ("scratch", "")]


def test_dockerfile_and_context_paths_cannot_leave_the_repository(tmp_path: Path) -> None:
    assert _inside(tmp_path, "sub/Dockerfile") == (tmp_path / "sub/Dockerfile").resolve()
    with pytest.raises(BuildFailed):
        _inside(tmp_path, "../../etc/passwd")


def _git_repo(path: Path, files: dict[str, str]) -> str:
    path.mkdir(parents=True)
    run = lambda *a: subprocess.run(["git", "-C", str(path), *a], check=True, capture_output=True, text=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    run("config", "user.email", "t@example.com")
    run("config", "user.name", "t")
    for name, text in files.items():
        (path / name).write_text(text)
    run("add", ".")
    run("commit", "-q", "-m", "c")
    return run("rev-parse", "HEAD").stdout.strip()


def test_clone_checks_out_the_exact_commit_and_rejects_unknown_ones(tmp_path: Path) -> None:
    first = _git_repo(tmp_path / "repo", {"v": "1"})
    (tmp_path / "repo" / "v").write_text("2")
    subprocess.run(["git", "-C", str(tmp_path / "repo"), "commit", "-qam", "two"], check=True)
    lines: list[str] = []
    sha = clone(f"file://{tmp_path / 'repo'}", first, tmp_path / "out", lines.append, threading.Event())
    assert sha == first and (tmp_path / "out" / "v").read_text() == "1"
    with pytest.raises(BuildFailed):
        clone(f"file://{tmp_path / 'repo'}", "f" * 40, tmp_path / "out2", lines.append, threading.Event())


# ------------------------------------------------------------------------------------ store


def test_store_records_completion_with_reports_and_ends_the_rollout_atomically(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    inst = Instance("i1", "process", 20001, 2, "process:/x", pid=5, starttime=9, slot="s1")
    r = Rollout(7, "cmd-1", "corr", 2, "process:/x", "abc", "process", "starting", [inst], [], {"name": "a"}, 1.0)
    store.save_rollout(r)
    assert store.rollout(7) == r
    store.switch_release(r, Release(7, 2, "process:/x", "abc", "process", [inst], {"name": "a"}))
    assert store.rollout(7).phase == "draining"  # type: ignore[union-attr]
    assert store.release(7).instances == [inst]  # type: ignore[union-attr]
    assert store.completed("cmd-1") is None
    store.complete("cmd-1", 7, "deploy.release", [b'{"x":1}'], drop_rollout=True)
    assert store.completed("cmd-1") == [b'{"x":1}']
    assert store.rollout(7) is None
    store.complete("cmd-1", 7, "deploy.release", [b'{"y":2}'])  # a second completion changes nothing
    assert store.completed("cmd-1") == [b'{"x":1}']


def test_retiring_an_app_forgets_its_release_and_rollout_with_the_completion(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    inst = Instance("i1", "process", 20001, 2, "process:/x", pid=5, starttime=9, slot="s1")
    for app in (7, 8):
        store.set_release(Release(app, 2, "process:/x", "abc", "process", [inst], {"name": "a"}))
        store.save_rollout(Rollout(app, f"cmd-{app}", "c", 3, "process:/y", "def", "process", "starting", [], [inst],
                                   {"name": "a"}, 1.0))
    store.complete("retire-7", 7, "app.retire", [b'{"r":1}'], forget_app=True)
    assert store.release(7) is None and store.rollout(7) is None and store.completed("retire-7") == [b'{"r":1}']
    assert store.release(8) is not None and store.rollout(8) is not None  # other apps are untouched


def test_store_lists_images_newest_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    for b in (1, 3, 2):
        store.add_image(1, b, f"a:{b}-0000000", f"id{b}", "c")
    assert [i[0] for i in store.images(1)] == [3, 2, 1]
    store.forget_image(1, "a:3-0000000")
    assert [i[0] for i in store.images(1)] == [2, 1]


# ------------------------------------------------------------------------------------ ports


def test_port_allocator_hands_out_distinct_free_ports_and_remembers_owners(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    lo = busy.getsockname()[1]
    alloc = PortAllocator(tmp_path, (lo, lo + 7))
    given = []
    with pytest.raises(RuntimeError, match="no free port"):
        for n in range(9):
            given.append(alloc.allocate(f"i{n}"))
    assert given and len(set(given)) == len(given) and lo not in given  # the busy one is skipped
    assert alloc.allocate("i0") == given[0]  # same owner, same port
    alloc.release_owner("i0")
    assert given[0] not in alloc.allocated()
    assert PortAllocator(tmp_path, (lo, lo + 7)).allocated() == {p: f"i{n}" for n, p in enumerate(given) if n}
    busy.close()
    assert port_is_free(lo)


# ----------------------------------------------------------------------------------- health


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200 if self.path == "/up" else 500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_health_probe_and_wait() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert probe(port, "/up")[0]
        ok, why = probe(port, "/down")
        assert not ok and "500" in why
        stop = threading.Event()
        assert wait_healthy(port, "/up", interval=0.1, timeout=5, alive=lambda: (True, ""), stop=stop) == (True, "")
        ok, why = wait_healthy(port, "/down", interval=0.1, timeout=0.5, alive=lambda: (True, ""), stop=stop)
        assert not ok and "not healthy within" in why
        ok, why = wait_healthy(port, "/up", interval=0.1, timeout=5, alive=lambda: (False, "exited 3"), stop=stop)
        assert (ok, why) == (False, "exited 3")
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------- process


def test_process_instance_gets_port_and_env_and_is_found_again_after_a_restart(tmp_path: Path) -> None:
    www = tmp_path / "rel"
    www.mkdir()
    (www / "index.html").write_text("hello")
    scope = scope_of(tmp_path)
    strat = ProcessStrategy(tmp_path, scope, rebuild=lambda *a: "")
    app = {"app_id": 3, "command": "exec busybox httpd -f -p 127.0.0.1:$PORT -h .", "env": {"X": "1"}}
    alloc = PortAllocator(tmp_path, (20000, 29999))
    port = alloc.allocate("i")
    inst = strat.start(app, f"process:{www}", 1, f"sl-{scope}-a3-r1-1-ab", port, {}, lambda line: None)
    try:
        ok, _ = wait_healthy(port, "/index.html", interval=0.1, timeout=30, alive=lambda: strat.alive(inst),
                             stop=threading.Event())
        assert ok
        # a fresh strategy object (a restarted deployer) finds the process by its environment
        again = ProcessStrategy(tmp_path, scope, rebuild=lambda *a: "").running_ids()
        assert set(again) == {inst.id} and again[inst.id].pid == inst.pid  # type: ignore[union-attr]
        assert ProcessStrategy(tmp_path, "other", rebuild=lambda *a: "").running_ids() == {}
    finally:
        strat.stop(inst, timeout=5)
    assert not strat.alive(inst)[0]
    assert not probe(port, "/index.html")[0]


def test_process_job_runs_to_completion_with_env_and_exit_code(tmp_path: Path) -> None:
    strat = ProcessStrategy(tmp_path, scope_of(tmp_path), rebuild=lambda *a: "")
    app = {"app_id": 3, "command": 'echo "greeting=$GREETING"; exit 4'}
    code, text = strat.run_job(app, "", 1, {"GREETING": "hi"}, tmp_path / "job.log", threading.Event())
    assert code == 4 and "greeting=hi" in text


def test_process_job_is_cancelled_by_stop(tmp_path: Path) -> None:
    strat = ProcessStrategy(tmp_path, scope_of(tmp_path), rebuild=lambda *a: "")
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    code, text = strat.run_job({"app_id": 1, "command": "sleep 30"}, "", 2, {}, tmp_path / "j.log", stop)
    assert code == 143 and "cancelled" in text and time.monotonic() - started < 10


# ---------------------------------------------------------------------------------- reports


def test_reports_have_deterministic_ids_and_carry_the_command_correlation() -> None:
    cmd = wrap(DeployRelease(app_id=4, revision=2, image="a:1-abcdef0", commit="c", app={}), source="streams",
               correlationid="delivery-9")
    from deployer.rollout import Outcome

    ok = outcome_message(4, Outcome(True, 2, "a:1-abcdef0", "c", [Instance("i", "docker", 20001, 2, "a")],
                                    duration=1.23456, url="http://127.0.0.1:8004"), "a", "c")
    assert isinstance(ok, Deployed) and ok.instances == ["127.0.0.1:20001"] and ok.url == "http://127.0.0.1:8004"
    failed = outcome_message(4, Outcome(False, 2, step="health", reason="timeout"), "a", "c")
    assert isinstance(failed, DeployFailed) and (failed.step, failed.reason) == ("health", "timeout")
    env = report(cmd, ok)
    assert env.id == derive_id(cmd.id, "deployed") == report(cmd, ok).id
    assert env.correlationid == "delivery-9" and env.causationid == cmd.id and env.source == "shipline/deployer"
    assert codec.decode(codec.encode(env), strict=True).data == ok


def test_instance_ids_name_their_app_and_env_shapes() -> None:
    assert _app_of("sl-1234abcd-a42-r3-1-beef") == 42
    assert _app_of("sl-a1234567-a42-r3-1-beef") == 42  # a scope that looks like an app part
    assert _app_of("sl-a1234567-a7-job3") == 7
    assert _app_of("nothing") is None and _app_of("sl-1234abcd") is None
    assert app_env({"env": {"A": 1}}) == {"A": "1"}
    assert app_env({"env": [{"name": "B", "value": "2"}]}) == {"B": "2"}


# -------------------------------------------------------------------------------- retention


def test_process_builds_are_release_folders_and_only_the_newest_are_retained(tmp_path: Path) -> None:
    from deployer.build import Builder, BuildLog

    repo = tmp_path / "repo"
    _git_repo(repo, {"VERSION": "0"})
    store = Store(tmp_path / "data" / "state.db")
    builder = Builder(tmp_path / "data", lambda: None, store, keep_images=2, stop=threading.Event())
    app = {"app_id": 9, "strategy": "process", "repo_url": f"file://{repo}", "command": "true",
           "build": {"test_command": "test -f VERSION"}}
    tags = {}
    for n in (1, 2, 3, 4):
        (repo / "VERSION").write_text(str(n))
        subprocess.run(["git", "-C", str(repo), "commit", "-qam", f"v{n}"], check=True)
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        log = BuildLog(tmp_path / f"build{n}.log")
        outcome = builder.build(app, n, sha.strip(), app["repo_url"], log)
        log.close()
        assert outcome.status == "succeeded" and "tests passed" in log.tail()
        tags[n] = outcome.tags[0]
        assert (Path(tags[n].removeprefix("process:")) / "VERSION").read_text() == str(n)
        if n == 1:  # build 1 goes live and stays live: it is never pruned while in use
            store.set_release(Release(9, 1, tags[1], sha.strip(), "process", [], app))
    kept = {b for b, *_ in store.images(9)}
    assert kept == {4, 3, 1}
    assert Path(tags[1].removeprefix("process:")).is_dir()
    assert not Path(tags[2].removeprefix("process:")).exists()

    failing = dict(app, build={"test_command": "echo nope; exit 7"})
    log = BuildLog(tmp_path / "build5.log")
    outcome = builder.build(failing, 5, sha.strip(), app["repo_url"], log)
    assert (outcome.status, outcome.exit_code) == ("failed", 7) and "nope" in log.tail()


# ------------------------------------------------------------------------------------ retire


class FakeStrategy:
    """What runs, by instance id; ``stop`` takes it away (a stand-in for containers / processes)."""

    def __init__(self, kind: str, running: set[str]) -> None:
        self.kind = kind
        self.running = running
        self.stopped: list[str] = []

    def alive(self, inst: Instance) -> tuple[bool, str]:
        return (inst.id in self.running, "")

    def stop(self, inst: Instance, timeout: float = 10) -> None:
        self.stopped.append(inst.id)
        self.running.discard(inst.id)

    def running_ids(self) -> dict[str, Instance | None]:
        return {i: Instance(i, self.kind, 0, 0, "") for i in self.running}


def test_retire_stops_every_instance_of_the_app_in_both_strategies_and_drops_its_route(tmp_path: Path) -> None:
    scope = "abcd1234"
    docker = FakeStrategy("docker", {f"sl-{scope}-a7-r2-1-aaaa", f"sl-{scope}-a7-r1-1-stray", f"sl-{scope}-a70-r1-1-x"})
    process = FakeStrategy("process", {f"sl-{scope}-a7-r3-1-bbbb", f"sl-{scope}-a8-r1-1-cccc"})
    store = Store(tmp_path / "deployer" / "state.db")
    ports = PortAllocator(tmp_path, (20000, 29999))
    current = Instance(f"sl-{scope}-a7-r2-1-aaaa", "docker", ports.allocate(f"sl-{scope}-a7-r2-1-aaaa"), 2, "img:2")
    store.set_release(Release(7, 2, "img:2", "c2", "docker", [current], {}))
    store.save_rollout(Rollout(7, "cmd", "corr", 3, "process:/x", "c3", "process", "starting",  # abandoned
                               [Instance(f"sl-{scope}-a7-r3-1-bbbb", "process", 20001, 3, "process:/x")],
                               [current], {}, 1.0))
    proxy = Proxy(tmp_path, 8000)  # HAProxy does not run here: only its recorded state changes
    proxy._save(ProxyState({7: AppProxy(7, 8007, [Slot("s1")]), 8: AppProxy(8, 8008, [Slot("s1")])}))
    rollouts = Rollouts(data_dir=tmp_path, scope=scope, proxy=proxy, store=store, ports=ports,
                        locks=AppLocks(tmp_path), strategies={"docker": docker, "process": process},  # type: ignore[dict-item]
                        timing=Timing(), stop=threading.Event())

    retired = rollouts.retire(7)
    assert sorted(retired.stopped) == sorted([f"sl-{scope}-a7-r2-1-aaaa", f"sl-{scope}-a7-r1-1-stray",
                                              f"sl-{scope}-a7-r3-1-bbbb"])
    assert (retired.revision, retired.url) == (2, "http://127.0.0.1:8007")
    assert docker.running == {f"sl-{scope}-a70-r1-1-x"} and process.running == {f"sl-{scope}-a8-r1-1-cccc"}
    assert set(proxy.state().apps) == {8}  # app 7's frontend is gone, app 8's stays
    assert current.id not in ports.allocated().values()

    store.complete("retire", 7, "app.retire", [], forget_app=True)  # as Deployer.handle records it
    again = rollouts.retire(7)  # a new retire of the retired app: nothing left, never an error
    assert (again.stopped, again.revision, again.url) == ([], None, "")
    assert docker.stopped.count(current.id) == 1


# ----------------------------------------------------------------------- retired app's images


class FakeImages:
    """The engine's images by tag (``remove`` as docker-py: ImageNotFound, or 409 while in use)."""

    def __init__(self, tags: set[str], in_use: frozenset[str] = frozenset()) -> None:
        self.tags = set(tags)
        self.in_use = set(in_use)
        self.removed: list[str] = []

    def remove(self, tag: str, force: bool = False, noprune: bool = False) -> None:
        from docker.errors import APIError, ImageNotFound

        if tag not in self.tags:
            raise ImageNotFound(f"No such image: {tag}")
        if tag in self.in_use:
            raise APIError(f"409 Conflict: unable to remove {tag}: image is being used by a stopped container")
        self.tags.discard(tag)
        self.removed.append(tag)


class FakeContainers:
    def list(self, all: bool = False, filters: dict[str, str] | None = None) -> list[object]:  # noqa: A002
        return []


class FakeDocker:
    def __init__(self, images: FakeImages) -> None:
        self.images = images
        self.containers = FakeContainers()


def _artifacts(builder: object, store: Store, app_id: int, name: str, builds: int) -> tuple[list[str], list[Path]]:
    """``builds`` docker images and as many release folders recorded for an app, as builds leave them."""
    from deployer.build import Builder

    assert isinstance(builder, Builder)
    tags, folders = [], []
    for n in range(1, builds + 1):
        sha = f"{n:07d}" + "f" * 33
        tag = image_tag({"app_id": app_id, "name": name}, n, sha, builder.scope)
        store.add_image(app_id, n, tag, f"sha256:{app_id}{n}", sha)
        folder = builder.release_dir(app_id, 100 + n, sha)
        folder.mkdir(parents=True)
        store.add_image(app_id, 100 + n, f"process:{folder}", f"process:{folder}", sha)
        tags.append(tag)
        folders.append(folder)
    return tags, folders


def test_retiring_an_app_removes_all_its_images_and_release_folders_and_no_other_apps(tmp_path: Path) -> None:
    from deployer.service import Deployer
    from shipline.config import load
    from shipline.messages import RetireApp

    settings = load({"SHIPLINE_DATA_DIR": str(tmp_path / "data"), "SHIPLINE_ADMIN_TOKEN": "x",
                     "SHIPLINE_SECRET_KEY": "x", "SHIPLINE_KEEP_IMAGES": "2", "SHIPLINE_PROXY_PORT": "18000"})
    engine = FakeImages(set())
    d = Deployer(settings, threading.Event(), docker_client=lambda: FakeDocker(engine))
    try:
        # two apps of the same name (another namespace): app 8's artifacts must survive app 7's retire
        tags7, folders7 = _artifacts(d.builder, d.store, 7, "web", 3)
        tags8, folders8 = _artifacts(d.builder, d.store, 8, "web", 2)
        engine.tags |= set(tags7) | set(tags8)
        d.store.set_release(Release(7, 3, tags7[-1], "c", "docker", [], {}))  # live until the retire
        build_log = d.builder.build_log_path(7, 3)
        build_log.parent.mkdir(parents=True)
        build_log.write_text("audit\n")

        [retired] = d.handle(wrap(RetireApp(app_id=7, app={"app_id": 7, "name": "web"}), source="t"))
        assert retired.type == "app.retired"
        assert sorted(engine.removed) == sorted(tags7)  # also the live release's: its instances are stopped
        assert not any(f.exists() for f in folders7)
        assert not (tmp_path / "data" / "deployer" / "releases" / "7").exists()
        assert d.store.images(7) == [] and d.store.release(7) is None
        assert engine.tags == set(tags8) and all(f.is_dir() for f in folders8)
        assert len(d.store.images(8)) == 4
        assert build_log.read_text() == "audit\n"  # build logs stay

        # a new retire of the retired app: nothing left to remove, nothing fails
        [again] = d.handle(wrap(RetireApp(app_id=7, app={"app_id": 7, "name": "web"}), source="t"))
        assert again.type == "app.retired" and again.id != retired.id
        assert sorted(engine.removed) == sorted(tags7) and engine.tags == set(tags8)
    finally:
        d.close()


def test_retire_keeps_going_past_images_already_gone_or_still_used_and_never_fails(tmp_path: Path) -> None:
    from deployer.build import Builder

    store = Store(tmp_path / "state.db")
    engine = FakeImages(set())
    builder = Builder(tmp_path, lambda: FakeDocker(engine), store, keep_images=5, stop=threading.Event())
    tags, folders = _artifacts(builder, store, 3, "api", 3)
    engine.tags = {tags[0], tags[1]}  # tags[2] was removed by hand already
    engine.in_use = {tags[1]}  # a container the deployer does not know still uses it
    legacy = "api:1-0000001"  # an old-form tag another (same-named) app recorded too
    store.add_image(3, 0, legacy, "sha256:l", "c")
    store.add_image(4, 1, legacy, "sha256:l", "c")
    engine.tags.add(legacy)

    removed = builder.retire(3)
    assert sorted(removed) == sorted([tags[0], tags[2], legacy, *(f"process:{f}" for f in folders)])
    assert engine.removed == [tags[0]]  # the shared legacy tag stays for app 4
    assert engine.tags == {tags[1], legacy}
    assert [t for _b, t, *_ in store.images(3)] == [tags[1]]  # still used: recorded, tried again next time
    assert [t for _b, t, *_ in store.images(4)] == [legacy]

    engine.in_use.clear()
    assert builder.retire(3) == [tags[1]]
    assert builder.retire(3) == [] and store.images(3) == []  # a repeated retire is a no-op

    def no_engine() -> object:
        raise RuntimeError("no engine")

    tags9, _ = _artifacts(builder, store, 9, "x", 1)
    builder._client_factory = no_engine
    assert builder.retire(9) == [f"process:{builder.release_dir(9, 101, '0000001' + 'f' * 33)}"]
    assert [t for _b, t, *_ in store.images(9)] == tags9  # the image waits for an engine


def test_retain_keeps_the_newest_and_the_live_release_of_that_app_only(tmp_path: Path) -> None:
    from deployer.build import Builder

    store = Store(tmp_path / "state.db")
    engine = FakeImages(set())
    builder = Builder(tmp_path, lambda: FakeDocker(engine), store, keep_images=2, stop=threading.Event())
    store.add_image(1, 1, "a:1", "i1", "c")
    store.add_image(1, 2, "a:2", "i2", "c")
    store.add_image(1, 3, "a:3", "i3", "c")
    store.add_image(2, 1, "b:1", "j1", "c")
    engine.tags = {"a:1", "a:2", "a:3", "b:1"}
    store.set_release(Release(1, 1, "a:1", "c", "docker", [], {}))
    assert builder.retain(1) == [] and builder.retain(1, keep=1) == ["a:2"]
    assert builder.retain(1, keep=0) == ["a:3"]  # the live release's stays while the app lives
    assert engine.tags == {"a:1", "b:1"} and [t for _b, t, *_ in store.images(2)] == ["b:1"]
