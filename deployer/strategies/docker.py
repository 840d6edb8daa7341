"""Strategy ``docker``: each instance is a container of the release's image, on the host network.

``docker run`` through the SDK with ``--network host`` (no bridge exists; all traffic stays on
127.0.0.1), ``--init`` (so SIGTERM stops a shell-less server promptly), ``PORT`` and the app's
environment, restart policy ``unless-stopped`` (a crashed instance or a restarted engine brings it
back), and labels naming the deployer scope, app, revision and port, by which reconciliation
finds them again. If the app has a ``command`` it replaces the image's CMD (run by ``sh -c``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from deployer.store import Instance
from deployer.strategies import StartFailed, app_env


class DockerStrategy:
    kind = "docker"

    def __init__(self, client_factory: Callable[[], Any], scope: str,
                 rebuild: Callable[[dict[str, Any], str, str, Any], str],
                 engine_up: Callable[[], bool] = lambda: True) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self.scope = scope
        self.rebuild = rebuild
        self._engine_up = engine_up

    def available(self) -> bool:
        """Whether an engine is there to look at without starting one (reconciliation only looks)."""
        return self._client is not None or self._engine_up()

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = self._client_factory()
            except Exception as exc:  # noqa: BLE001 - EngineUnavailable, socket errors ...
                raise StartFailed(f"no Docker engine: {exc}") from exc
        return self._client

    def labels(self, app: dict[str, Any], revision: int, port: int = 0) -> dict[str, str]:
        return {
            "shipline.scope": self.scope,
            "shipline.app": str(app.get("app_id", "")),
            "shipline.revision": str(revision),
            "shipline.port": str(port),
        }

    # ------------------------------------------------------------------------- artifacts

    def ensure_artifact(self, app: dict[str, Any], image: str, commit: str, log: Any) -> str:
        if not image:
            raise StartFailed("no image to deploy")
        try:
            self.client.images.get(image)
            return image
        except ImageNotFound:
            pass
        if commit and app.get("repo_url"):
            log(f"image {image} is gone: rebuilding it from commit {commit}")
            return self.rebuild(app, commit, image, log)
        # never pulled: no registry is reachable from here, and a lookup would leave 127.0.0.1
        raise StartFailed(f"image {image} is not on this engine and the app has no repository to rebuild it from")

    # ------------------------------------------------------------------------- instances

    def start(self, app: dict[str, Any], image: str, revision: int, instance_id: str, port: int,
              env: dict[str, str], log: Any) -> Instance:
        command = app.get("command")
        environment = {**app_env(app), **env, "PORT": str(port)}
        with contextlib.suppress(NotFound):  # a leftover of an interrupted attempt with the same name
            self.client.containers.get(instance_id).remove(force=True)
        try:
            container = self.client.containers.run(
                image,
                command=["sh", "-c", command] if command else None,
                name=instance_id,
                detach=True,
                network_mode="host",
                init=True,
                environment=environment,
                labels=self.labels(app, revision, port),
                restart_policy={"Name": "unless-stopped"},
            )
        except DockerException as exc:
            raise StartFailed(f"docker run {image}: {exc}") from exc
        log(f"started container {instance_id} ({container.short_id}) from {image} on port {port}")
        return Instance(id=instance_id, kind=self.kind, port=port, revision=revision, image=image)

    def alive(self, inst: Instance) -> tuple[bool, str]:
        try:
            c = self.client.containers.get(inst.id)
        except NotFound:
            return False, f"container {inst.id} is gone"
        except DockerException as exc:
            return False, f"docker: {exc}"
        state = c.attrs.get("State", {})
        if state.get("Running") and not state.get("Restarting"):
            return True, ""
        tail = ""
        with contextlib.suppress(DockerException):
            tail = c.logs(tail=20).decode(errors="replace").strip()[-600:]
        return False, (f"container {inst.id} is {state.get('Status')} (exit code {state.get('ExitCode')})"
                       + (f"; last output: {tail}" if tail else ""))

    def stop(self, inst: Instance, timeout: float = 10) -> None:
        try:
            c = self.client.containers.get(inst.id)
        except NotFound:
            return
        with contextlib.suppress(NotFound, APIError):
            c.stop(timeout=int(timeout))
        with contextlib.suppress(NotFound, APIError):
            c.remove(force=True)

    def running_ids(self) -> dict[str, Instance | None]:
        out: dict[str, Instance | None] = {}
        for c in self.client.containers.list(all=True, filters={"label": f"shipline.scope={self.scope}"}):
            labels = c.labels or {}
            if "shipline.job" in labels:
                continue
            out[c.name] = Instance(id=c.name, kind=self.kind, port=int(labels.get("shipline.port") or 0),
                                   revision=int(labels.get("shipline.revision") or 0), image="")
        return out

    # ------------------------------------------------------------------------------ jobs

    def run_job(self, app: dict[str, Any], image: str, job: int, env: dict[str, str], log_path: Path,
                stop: Any) -> tuple[int, str]:
        """Run a container to completion (its CMD, or the app's command); a job found after a crash is awaited."""
        name = f"sl-{self.scope}-a{app.get('app_id', 0)}-job{job}"
        command = app.get("command")
        try:
            c = self.client.containers.get(name)
        except NotFound:
            try:
                c = self.client.containers.run(
                    image, command=["sh", "-c", command] if command else None, name=name, detach=True,
                    network_mode="host", init=True, environment={**app_env(app), **env},
                    labels={**self.labels(app, 0), "shipline.job": str(job)},
                )
            except DockerException as exc:
                raise StartFailed(f"docker run {image}: {exc}") from exc
        code: int | None = None
        cancelled = False
        while code is None:
            if stop.is_set():
                with contextlib.suppress(DockerException):
                    c.stop(timeout=2)
                cancelled = True
            try:
                code = int(c.wait(timeout=1).get("StatusCode", -1))
            except DockerException:
                code = None  # wait timed out: still running
            except Exception:  # noqa: BLE001 - requests' read timeout when the job is still running
                code = None
            if code is None:
                time.sleep(0.05)
        text = ""
        with contextlib.suppress(DockerException):
            text = c.logs().decode(errors="replace")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(text)
        with contextlib.suppress(DockerException):
            c.remove(force=True)
        if cancelled:
            text += "\n[cancelled: the deployer is stopping]"
        return code, text[-64 * 1024:]
