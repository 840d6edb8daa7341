"""Build: clone a commit, pick or generate a Dockerfile, ``docker build``, run the tests, tag.

The pipeline of Shipyard (clone -> Dockerfile -> build -> test) for one ``build.image``:

1. ``git clone`` of the app's repository (https or ``file://``) and a detached checkout of the
   exact commit (``GIT_TERMINAL_PROMPT=0``: a private repo fails instead of waiting for a password).
2. **Docker apps**: the repo's Dockerfile (``app.build.dockerfile``, relative to the repo root,
   default ``<context>/Dockerfile``; ``app.build.context``, default the repo root), or one
   generated when the repo has none (``generate_dockerfile``):

   * ``static`` (an ``index.html``, or nothing recognisable): busybox ``httpd`` serving the repo
     from our local base image ``shipline/busybox:latest``; works with no registry at all;
   * ``python`` (``requirements.txt``, ``pyproject.toml`` or ``app.py``/``main.py``):
     ``FROM python:3.11-slim``, ``pip install -r requirements.txt``, CMD the app's command
     (default ``python app.py``);
   * ``node`` (``package.json``): ``FROM node:20-slim``, ``npm ci``/``npm install``, CMD the app's
     command (default ``npm start``).

   ``app.build.template`` forces a template and ``app.build.base_image`` replaces the FROM image.
   No image registry is reachable from this machine, so the Python and Node templates only build
   where those base images exist locally (load them with ``docker load`` or point
   ``base_image`` at a local image); the static template always builds.
   ``docker build`` runs through the SDK on the host network, its output streamed line by line
   to ``<data_dir>/logs/builds/<app>/<build>.log``.
3. ``app.build.test_command`` (optional) runs in the built image (``sh -c``); a non-zero exit
   fails the build and the image is removed.
4. The image is tagged ``sl-<scope>/<app-name>-a<app-id>:<build>-<sha7>`` (``image_tag``: unique
   per app and per stack sharing the engine); the last ``keep_images`` images of the app are
   retained (older ones removed unless a release still uses them); when the app is retired, all
   of them go (``Builder.retire``).

**Process apps** have no image: the "build" is the clone itself, kept as a release folder
``<data_dir>/deployer/releases/<app>/<build>-<sha7>`` that the app's command runs from; the test
command runs there, and the build's tag is ``process:<folder>``.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docker.errors import ImageNotFound

from deployer.store import Store
from deployer.strategies import scope_of
from deployer.strategies.process import PREFIX, release_path
from shipline.infra.docker_engine import BASE_IMAGE

log = logging.getLogger(__name__)

TEMPLATES = ("static", "python", "node")
DEFAULT_BASES = {"static": BASE_IMAGE, "python": "python:3.11-slim", "node": "node:20-slim"}
LOG_TAIL = 16 * 1024


class BuildFailed(RuntimeError):
    def __init__(self, reason: str, exit_code: int = 1) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


class BuildCancelled(RuntimeError):
    pass


class BuildLog:
    """A build's (or a deployment's) log file; calling it appends a timestamped line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", buffering=1)

    def __call__(self, line: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        for part in str(line).rstrip("\n").splitlines() or [""]:
            self._fh.write(f"{stamp} {part}\n")

    def raw(self, text: str) -> None:
        self._fh.write(text)

    def close(self) -> None:
        self._fh.close()

    def tail(self, limit: int = LOG_TAIL) -> str:
        try:
            data = self.path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode(errors="replace")


@dataclass(frozen=True)
class BuildOutcome:
    status: str  # succeeded | failed | cancelled
    exit_code: int
    image_id: str
    tags: list[str] = field(default_factory=list)
    commit: str = ""
    reason: str = ""


# ------------------------------------------------------------------------------ pure helpers


def sanitize(name: str) -> str:
    """A Docker repository path component from an app name: lowercase [a-z0-9], separated by one
    ``.``, one or two ``_`` or any number of ``-`` (other runs of separators become ``-``)."""
    out = re.sub(r"[^a-z0-9._-]+", "-", (name or "app").lower())
    out = re.sub(r"[._-]{2,}", lambda m: m.group() if re.fullmatch(r"-+|__", m.group()) else "-", out)
    return out.strip("._-") or "app"


def image_repository(app: dict[str, Any], scope: str = "") -> str:
    """``sl-<scope>/<app name>-a<app id>``: the app's images, unique per app and per stack.

    App names are unique only within a namespace and come back after a delete, and several
    stacks (scopes) share one engine, so the name alone would make two apps' builds of one commit
    share a tag; the app id (and the scope) keep them apart, the name keeps it readable.
    """
    app_id = app.get("app_id")
    name = sanitize(str(app.get("name") or "app"))
    repo = f"{name}-a{int(app_id)}" if app_id is not None and str(app_id) != "" else name
    return f"sl-{scope}/{repo}" if scope else repo


def image_tag(app: dict[str, Any], build: int, sha: str, scope: str = "") -> str:
    """``<image_repository>:<build>-<sha7>``. Tags are stored with each build and release, never
    parsed back except for the build number (``_build_number``), so older tags (``<name>:<build>-<sha7>``)
    keep working."""
    return f"{image_repository(app, scope)}:{build}-{sha[:7]}"


def detect_template(src: Path) -> str:
    if (src / "package.json").exists():
        return "node"
    if any((src / f).exists() for f in ("requirements.txt", "pyproject.toml", "app.py", "main.py")):
        return "python"
    return "static"


def generate_dockerfile(template: str, app: dict[str, Any]) -> str:
    """The Dockerfile for a repo that has none (see the module docstring)."""
    if template not in TEMPLATES:
        raise BuildFailed(f"unknown build template {template!r} (known: {', '.join(TEMPLATES)})")
    build = app.get("build") or {}
    base = build.get("base_image") or DEFAULT_BASES[template]
    command = app.get("command")
    if template == "static":
        root = build.get("root") or "."
        return (
            f"FROM {base}\n"
            f"COPY {root} /www/\n"
            'CMD ["sh", "-c", "exec httpd -f -p ${PORT:-8080} -h /www"]\n'
        )
    if template == "python":
        cmd = command or "python app.py"
        return (
            f"FROM {base}\n"
            "WORKDIR /app\n"
            "ENV PYTHONUNBUFFERED=1\n"
            "COPY . /app\n"
            "RUN if [ -f requirements.txt ]; then pip install --no-cache-dir -r requirements.txt; "
            "elif [ -f pyproject.toml ]; then pip install --no-cache-dir .; fi\n"
            f'CMD ["sh", "-c", {_json_str(cmd)}]\n'
        )
    if template == "node":
        cmd = command or "npm start"
        return (
            f"FROM {base}\n"
            "WORKDIR /app\n"
            "ENV NODE_ENV=production\n"
            "COPY . /app\n"
            "RUN if [ -f package-lock.json ]; then npm ci --omit=dev; else npm install --omit=dev; fi\n"
            f'CMD ["sh", "-c", {_json_str(cmd)}]\n'
        )
    raise BuildFailed(f"unknown build template {template!r} (known: {', '.join(TEMPLATES)})")


def base_images(dockerfile: str) -> list[tuple[str, str]]:
    """(image, stage name) of every FROM line (``--platform`` flags skipped, ARGs not expanded)."""
    out = []
    for line in dockerfile.splitlines():
        words = line.strip().split()
        if not words or words[0].upper() != "FROM":
            continue
        words = [w for w in words[1:] if not w.startswith("--")]
        if words:
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
            out.append((words[0], stage))
    return out


def _json_str(s: str) -> str:
    import json

    return json.dumps(s)


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise BuildFailed(f"path {rel!r} leaves the repository")
    return path


# --------------------------------------------------------------------------------- git clone


def run_cmd(argv: list[str], log: Callable[[str], None], stop: threading.Event, cwd: Path | None = None,
            env: dict[str, str] | None = None, timeout: float = 600) -> int:
    """Run a command with its output going to the log; cancelled when ``stop`` is set."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    done = False
    while not done:
        if stop.is_set() or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            if stop.is_set():
                raise BuildCancelled("cancelled: the deployer is stopping")
            raise BuildFailed(f"{argv[0]} took longer than {timeout:g}s")
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            done = True
        else:
            log(line.decode(errors="replace"))
    return proc.wait()


def clone(repo_url: str, commit: str, dest: Path, log: Callable[[str], None], stop: threading.Event) -> str:
    """Clone ``repo_url`` into ``dest`` and check out ``commit`` exactly; returns the full sha."""
    if not repo_url:
        raise BuildFailed("the app has no repository URL")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    git = ["git", "-c", "safe.directory=*", "-c", "advice.detachedHead=false"]
    log(f"$ git clone {repo_url} && git checkout {commit}")
    code = run_cmd(git + ["clone", "--quiet", "--no-checkout", repo_url, str(dest)], log, stop, env=env)
    if code != 0:
        raise BuildFailed(f"git clone {repo_url} failed (exit {code})", code)
    code = run_cmd(git + ["-C", str(dest), "checkout", "--quiet", "--detach", commit], log, stop, env=env)
    if code != 0:
        raise BuildFailed(f"commit {commit} not found in {repo_url} (exit {code})", code)
    out = subprocess.run(git + ["-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True, env=env)
    sha = out.stdout.strip()
    log(f"checked out {sha}")
    return sha


# ----------------------------------------------------------------------------------- builder


class Builder:
    def __init__(self, data_dir: Path, client_factory: Callable[[], Any], store: Store, keep_images: int,
                 stop: threading.Event) -> None:
        self.data_dir = Path(data_dir)
        self._client_factory = client_factory
        self.store = store
        self.keep_images = max(1, keep_images)
        self.stop = stop
        self.scope = scope_of(self.data_dir)

    @property
    def client(self) -> Any:
        try:
            return self._client_factory()
        except Exception as exc:  # noqa: BLE001 - EngineUnavailable, socket errors ...
            raise BuildFailed(f"no Docker engine: {exc}") from exc

    def build_log_path(self, app_id: int, build: int) -> Path:
        return self.data_dir / "logs" / "builds" / str(app_id) / f"{build}.log"

    # ----------------------------------------------------------------------- entry point

    def build(self, app: dict[str, Any], build: int, commit: str, repo_url: str, log: BuildLog) -> BuildOutcome:
        app_id = int(app.get("app_id", 0))
        strategy = app.get("strategy") or "docker"
        log(f"build #{build} of app {app_id} ({app.get('name')}) at {commit}, strategy {strategy}")
        try:
            if strategy == "process":
                outcome = self._build_release(app, build, commit, repo_url or app.get("repo_url") or "", log)
            else:
                outcome = self._build_image(app, build, commit, repo_url or app.get("repo_url") or "", log)
        except BuildCancelled as exc:
            log(str(exc))
            return BuildOutcome("cancelled", 143, "", [], commit, str(exc))
        except BuildFailed as exc:
            log(f"build failed: {exc}")
            return BuildOutcome("failed", exc.exit_code or 1, "", [], commit, str(exc))
        log(f"build {outcome.status}: {', '.join(outcome.tags)}")
        return outcome

    # ----------------------------------------------------------------------- process apps

    def release_dir(self, app_id: int, build: int, sha: str) -> Path:
        return self.data_dir / "deployer" / "releases" / str(app_id) / f"{build}-{sha[:7]}"

    def _build_release(self, app: dict[str, Any], build: int, commit: str, repo_url: str,
                       log: BuildLog) -> BuildOutcome:
        app_id = int(app.get("app_id", 0))
        tmp = self.data_dir / "deployer" / "releases" / str(app_id) / f".{build}-tmp"
        sha = clone(repo_url, commit, tmp, log, self.stop)
        dest = self.release_dir(app_id, build, sha)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        tag = f"{PREFIX}{dest}"
        self._test(app, log, cwd=dest)
        self.store.add_image(app_id, build, tag, tag, sha)
        self.retain(app_id)
        return BuildOutcome("succeeded", 0, tag, [tag], sha)

    # ------------------------------------------------------------------------ docker apps

    def _build_image(self, app: dict[str, Any], build: int, commit: str, repo_url: str, log: BuildLog,
                     tag: str | None = None, retain: bool = True) -> BuildOutcome:
        app_id = int(app.get("app_id", 0))
        with tempfile.TemporaryDirectory(prefix=f"build-{app_id}-{build}-", dir=self._work_dir()) as work:
            src = Path(work) / "src"
            sha = clone(repo_url, commit, src, log, self.stop)
            tag = tag or image_tag(app, build, sha, self.scope)
            context, dockerfile = self._dockerfile(app, src, log)
            image_id = self._docker_build(context, dockerfile, tag, app, build, sha, log)
        try:
            self._test(app, log, image=tag)
        except BuildFailed:
            self._remove_image(tag)
            raise
        self.store.add_image(app_id, build, tag, image_id, sha)
        if retain:
            self.retain(app_id)
        return BuildOutcome("succeeded", 0, image_id, [tag], sha)

    def _work_dir(self) -> str:
        path = self.data_dir / "deployer" / "work"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _dockerfile(self, app: dict[str, Any], src: Path, log: BuildLog) -> tuple[Path, Path]:
        build = app.get("build") or {}
        context = _inside(src, build.get("context") or ".")
        if not context.is_dir():
            raise BuildFailed(f"build context {build.get('context')!r} is not a folder of the repository")
        if build.get("dockerfile"):
            dockerfile = _inside(src, build["dockerfile"])
            if not dockerfile.is_file():
                raise BuildFailed(f"Dockerfile {build['dockerfile']!r} not found in the repository")
            log(f"using the repository's {build['dockerfile']}")
            return context, dockerfile
        if (context / "Dockerfile").is_file():
            log("using the repository's Dockerfile")
            return context, context / "Dockerfile"
        template = build.get("template") or detect_template(context)
        text = generate_dockerfile(template, app)
        dockerfile = context / "Dockerfile.shipline"
        dockerfile.write_text(text)
        ignore = context / ".dockerignore"
        if not ignore.exists():
            ignore.write_text(".git\nDockerfile.shipline\n")
        log(f"no Dockerfile in the repository: generated one ({template} template):")
        for line in text.splitlines():
            log(f"    {line}")
        return context, dockerfile

    def _docker_build(self, context: Path, dockerfile: Path, tag: str, app: dict[str, Any], build: int,
                      sha: str, log: BuildLog) -> str:
        client = self.client
        self._check_bases(client, dockerfile, log)
        log(f"$ docker build -t {tag} -f {dockerfile.name} {context.name}")
        chunks: queue.Queue[tuple[str, Any]] = queue.Queue()
        # one label only: every LABEL is a build step (a container) in the classic builder; the app and
        # the build number are in the tag already
        labels = {"shipline.commit": sha}

        def pump() -> None:
            try:
                for chunk in client.api.build(
                    path=str(context), dockerfile=str(dockerfile), tag=tag, rm=True, forcerm=True,
                    network_mode="host", decode=True, labels=labels, pull=False,
                ):
                    chunks.put(("chunk", chunk))
                chunks.put(("end", None))
            except Exception as exc:  # noqa: BLE001 - reported as a failed build
                chunks.put(("error", exc))

        # the stream is read on a thread so a SIGTERM can abandon a silent build step at once
        threading.Thread(target=pump, daemon=True, name=f"build-{tag}").start()
        image_id = ""
        while True:
            if self.stop.is_set():
                raise BuildCancelled("cancelled: the deployer is stopping")
            try:
                kind, item = chunks.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "end":
                break
            if kind == "error":
                raise BuildFailed(f"docker build: {item}")
            if "stream" in item:
                log.raw(item["stream"])
            elif "status" in item:
                log(item["status"])
            if "error" in item:
                raise BuildFailed(f"docker build: {item['error'].strip()}")
            aux = item.get("aux") or {}
            if aux.get("ID"):
                image_id = aux["ID"]
        if not image_id:
            image_id = str(client.images.get(tag).id)
        log(f"built image {image_id} tagged {tag}")
        return image_id

    def _check_bases(self, client: Any, dockerfile: Path, log: BuildLog) -> None:
        """Every FROM image must exist locally: nothing is pulled (no registry is reachable from here,
        and a pull attempt would send traffic off the machine)."""
        stages: set[str] = set()
        for image, stage in base_images(dockerfile.read_text(errors="replace")):
            if image.lower() != "scratch" and image not in stages:
                try:
                    client.images.get(image)
                except Exception as exc:  # noqa: BLE001 - ImageNotFound, or a malformed reference
                    raise BuildFailed(
                        f"base image {image} is not available locally and no registry is reachable: "
                        f"load it with 'docker load' or set build.base_image to a local image"
                    ) from exc
            if stage:
                stages.add(stage)
        log("base images present locally")

    def _test(self, app: dict[str, Any], log: BuildLog, *, image: str | None = None, cwd: Path | None = None) -> None:
        test = (app.get("build") or {}).get("test_command")
        if not test:
            return
        log(f"$ {test}   (test command)")
        if image is not None:
            code = self._test_in_container(image, test, log)
        else:
            env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
            env["CI"] = "true"
            code = run_cmd(["/bin/sh", "-c", test], log, self.stop, cwd=cwd, env=env)
        if code != 0:
            raise BuildFailed(f"test command exited with {code}", code)
        log("tests passed")

    def _test_in_container(self, image: str, test: str, log: BuildLog) -> int:
        client = self.client
        c = client.containers.run(image, ["sh", "-c", test], detach=True, network_mode="host", init=True,
                                  environment={"CI": "true"}, labels={"shipline.test": "1"})
        try:
            code: int | None = None
            while code is None:
                if self.stop.is_set():
                    raise BuildCancelled("cancelled: the deployer is stopping")
                try:
                    code = int(c.wait(timeout=1).get("StatusCode", 1))
                except Exception:  # noqa: BLE001 - read timeout while the tests run
                    code = None
            log.raw(c.logs().decode(errors="replace"))
            return code
        finally:
            try:
                c.remove(force=True)
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------- rollback support

    def rebuild(self, app: dict[str, Any], commit: str, image: str, log: Any) -> str:
        """Recreate a pruned image (or release folder) from its commit, under the same name."""
        app_id = int(app.get("app_id", 0))
        repo = app.get("repo_url") or ""
        blog = log if isinstance(log, BuildLog) else _Adapter(log)
        if image.startswith(PREFIX) or (app.get("strategy") == "process"):
            path = release_path(image) or self.release_dir(app_id, 0, commit)
            tmp = path.with_name(path.name + ".tmp")
            clone(repo, commit, tmp, blog, self.stop)
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
            return f"{PREFIX}{path}"
        build = _build_number(image)
        outcome = self._build_image(app, build, commit, repo, blog, tag=image, retain=False)  # type: ignore[arg-type]
        return outcome.tags[0]

    def retain(self, app_id: int, keep: int | None = None, in_use: set[str] | None = None) -> list[str]:
        """Keep the newest ``keep`` (default ``keep_images``) builds of an app; remove the older
        images / release folders and forget them, except those ``in_use`` (by default the current
        release's and an in-flight rollout's). Returns the tags removed.

        A tag another app of this store also holds (an older tag of a same-named app) is forgotten
        for this app but stays on the engine. An image the engine refuses to remove (a container
        still uses it) or cannot reach stays recorded, so the next retain tries again; one already
        gone is simply forgotten. Never raises for an image.
        """
        keep = self.keep_images if keep is None else max(0, keep)
        if in_use is None:
            in_use = set()
            release = self.store.release(app_id)
            if release is not None:
                in_use.add(release.image)
            rollout = self.store.rollout(app_id)
            if rollout is not None:
                in_use.add(rollout.image)
        removed = []
        for _build, tag, _image_id, _commit in self.store.images(app_id)[keep:]:
            if tag in in_use:
                continue
            if tag.startswith(PREFIX):
                path = release_path(tag)
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)
            elif self.store.apps_with_image(tag) - {app_id}:
                log.info("image %s of app %s is also another app's: left on the engine", tag, app_id)
            elif not self._remove_image(tag):
                continue
            self.store.forget_image(app_id, tag)
            removed.append(tag)
        return removed

    def retire(self, app_id: int) -> list[str]:
        """The app was deleted and its instances are stopped: remove every image / release folder
        it kept (build logs stay). Idempotent; never raises (what cannot go now is logged)."""
        try:
            removed = self.retain(app_id, keep=0, in_use=set())
        except Exception:  # noqa: BLE001 - a retire must report whatever happens to the artifacts
            log.exception("retire app %s: its images could not be removed", app_id)
            return []
        # what the store does not list: a process rebuild's folder, an 'empty' release, a leftover clone
        shutil.rmtree(self.data_dir / "deployer" / "releases" / str(int(app_id)), ignore_errors=True)
        if removed:
            log.info("retired app %s: removed %s", app_id, ", ".join(removed))
        return removed

    def _remove_image(self, tag: str) -> bool:
        """Remove a tag from the engine: True when it is gone (also when it already was)."""
        try:
            self.client.images.remove(tag, force=False, noprune=False)
        except ImageNotFound:
            return True
        except Exception as exc:  # noqa: BLE001 - still used by a container (409), or no engine
            log.warning("image %s stays for now: %s", tag, exc)
            return False
        return True


class _Adapter:
    """Lets a plain ``log(str)`` callable stand in for a BuildLog."""

    def __init__(self, fn: Callable[[str], None]) -> None:
        self.fn = fn

    def __call__(self, line: str) -> None:
        self.fn(line)

    def raw(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                self.fn(line)


def _build_number(image: str) -> int:
    """The build number in a tag of ours, old (``<name>:<build>-<sha7>``) or new form; 0 if none."""
    m = re.search(r":(\d+)-[0-9a-f]{7}$", image)
    return int(m.group(1)) if m else 0
