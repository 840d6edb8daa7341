"""How an instance of a release runs: a Docker container or a plain local process.

Both strategies expose the same small surface, so the rollout does not care which one runs:

* ``ensure_artifact(app, image, commit, log)`` — make sure the release's image (or release
  folder) exists, rebuilding it from its commit when it was pruned; returns the reference;
* ``start(app, image, revision, instance_id, port, env, log)`` -> ``Instance``;
* ``alive(instance)`` -> ``(bool, reason)``; ``stop(instance)``;
* ``running_ids()`` -> ids of every instance of this deployer's scope that exists on the machine
  (for reconciliation after a crash);
* ``run_job(app, image, job, env, log_path, stop)`` -> ``(exit_code, log)``.

Every instance gets ``PORT`` (the port the deployer allocated) in its environment and must listen
on 127.0.0.1 (or all addresses) at that port; containers use host networking.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

from deployer.store import Instance


class StartFailed(RuntimeError):
    """An instance could not be started (bad image, missing command ...)."""


class Strategy(Protocol):
    kind: str

    def ensure_artifact(self, app: dict[str, Any], image: str, commit: str, log: Any) -> str: ...

    def start(self, app: dict[str, Any], image: str, revision: int, instance_id: str, port: int,
              env: dict[str, str], log: Any) -> Instance: ...

    def alive(self, inst: Instance) -> tuple[bool, str]: ...

    def stop(self, inst: Instance, timeout: float = 10) -> None: ...

    def running_ids(self) -> dict[str, Instance | None]: ...

    def run_job(self, app: dict[str, Any], image: str, job: int, env: dict[str, str], log_path: Path,
                stop: Any) -> tuple[int, str]: ...


def scope_of(data_dir: Path) -> str:
    """A short tag naming this data dir's containers and processes (several stacks share an engine)."""
    return hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]


def app_env(app: dict[str, Any]) -> dict[str, str]:
    """The app's instance environment variables (``app["env"]``, a dict of strings), if any."""
    env = app.get("env") or {}
    if isinstance(env, list):  # Shipmight's [{name, value}] shape
        env = {e.get("name"): e.get("value") for e in env if isinstance(e, dict)}
    return {str(k): str(v) for k, v in env.items() if k}
