"""Strategy ``process``: the app's ``command`` as a local process, for machines without Docker.

The release is a folder (``process:<path>``, made by ``deployer.build`` from a commit); the
command runs from it through ``/bin/sh -c`` with ``PORT`` set, in a session of its own so it
outlives a deployer crash (the proxy keeps sending it traffic; a restarted deployer finds it
again). Its output goes to ``<data_dir>/logs/instances/<app>/<instance>.log``. Each process
carries ``SHIPLINE_SCOPE`` and ``SHIPLINE_INSTANCE`` in its environment, which is how
reconciliation recognises our processes on the machine (``/proc/<pid>/environ``), and its
``/proc`` start time is recorded so a reused pid is never mistaken for it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployer.store import Instance
from deployer.strategies import StartFailed, app_env

PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
PREFIX = "process:"


def release_path(image: str) -> Path | None:
    if not image:
        return None
    return Path(image[len(PREFIX):] if image.startswith(PREFIX) else image)


def proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a pid, None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])  # state, starttime (field 22 of the whole line)


def proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


class ProcessStrategy:
    kind = "process"

    def __init__(self, data_dir: Path, scope: str, rebuild: Callable[[dict[str, Any], str, str, Any], str]) -> None:
        self.data_dir = Path(data_dir)
        self.scope = scope
        self.rebuild = rebuild
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------------- artifacts

    def ensure_artifact(self, app: dict[str, Any], image: str, commit: str, log: Any) -> str:
        path = release_path(image)
        if path is not None and path.is_dir():
            return image
        if path is None and not app.get("repo_url"):
            empty = self.data_dir / "deployer" / "releases" / str(app.get("app_id", "app")) / "empty"
            empty.mkdir(parents=True, exist_ok=True)
            return f"{PREFIX}{empty}"
        if not (commit and app.get("repo_url")):
            raise StartFailed(f"release folder {path} is gone and the app has no repository to rebuild it from")
        log(f"release folder {path} is gone: rebuilding it from commit {commit}")
        return self.rebuild(app, commit, image, log)

    # ------------------------------------------------------------------------- instances

    def _env(self, app: dict[str, Any], extra: dict[str, str], instance_id: str) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
        env.update(app_env(app))
        env.update(extra)
        env["SHIPLINE_SCOPE"] = self.scope
        env["SHIPLINE_INSTANCE"] = instance_id
        return env

    def _spawn(self, argv: list[str], cwd: Path, env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        self._children[proc.pid] = proc
        return proc

    def start(self, app: dict[str, Any], image: str, revision: int, instance_id: str, port: int,
              env: dict[str, str], log: Any) -> Instance:
        command = app.get("command")
        if not command:
            raise StartFailed("the process strategy needs the app's 'command'")
        cwd = release_path(image) or self.data_dir
        if not cwd.is_dir():
            raise StartFailed(f"release folder {cwd} does not exist")
        log_file = self.data_dir / "logs" / "instances" / str(app.get("app_id", "app")) / f"{instance_id}.log"
        full_env = self._env(app, {**env, "PORT": str(port)}, instance_id)
        proc = self._spawn(["/bin/sh", "-c", command], cwd, full_env, log_file)
        st = proc_state(proc.pid)
        log(f"started process {instance_id} (pid {proc.pid}) on port {port}: {command} (log {log_file})")
        return Instance(id=instance_id, kind=self.kind, port=port, revision=revision, image=image,
                        pid=proc.pid, starttime=st[1] if st else 0)

    def alive(self, inst: Instance) -> tuple[bool, str]:
        child = self._children.get(inst.pid)
        if child is not None and child.poll() is not None:
            return False, f"process exited with code {child.returncode}{self._tail(inst)}"
        st = proc_state(inst.pid)
        if st is None or st[0] == "Z" or (inst.starttime and st[1] != inst.starttime):
            return False, f"process {inst.pid} is gone{self._tail(inst)}"
        return True, ""

    def _tail(self, inst: Instance) -> str:
        for path in (self.data_dir / "logs" / "instances").glob(f"*/{inst.id}.log"):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")[-600:].strip()
                return f"; last output: {text}" if text else ""
        return ""

    def stop(self, inst: Instance, timeout: float = 10) -> None:
        if not self.alive(inst)[0]:
            self._reap(inst.pid)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(inst.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap(inst.pid)
            if not self.alive(inst)[0]:
                break
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(inst.pid, signal.SIGKILL)  # whatever is left of its process group
        self._reap(inst.pid)

    def _reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.5)
                self._children.pop(pid, None)

    def running_ids(self, include_jobs: bool = False) -> dict[str, Instance | None]:
        """Session leaders on this machine that carry our scope: instance id -> a minimal Instance."""
        found: dict[str, Instance | None] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if os.getsid(pid) != pid:
                    continue
            except OSError:
                continue
            env = proc_environ(pid)
            if env.get("SHIPLINE_SCOPE") != self.scope or "SHIPLINE_INSTANCE" not in env:
                continue
            if "-job" in env["SHIPLINE_INSTANCE"] and not include_jobs:
                continue
            st = proc_state(pid)
            if st is None or st[0] == "Z":
                continue
            found[env["SHIPLINE_INSTANCE"]] = Instance(
                id=env["SHIPLINE_INSTANCE"], kind=self.kind, port=int(env.get("PORT") or 0), revision=0, image="",
                pid=pid, starttime=st[1],
            )
        return found

    # ------------------------------------------------------------------------------ jobs

    def run_job(self, app: dict[str, Any], image: str, job: int, env: dict[str, str], log_path: Path,
                stop: Any) -> tuple[int, str]:
        """Run the app's command to completion; a job found running after a crash is waited for."""
        command = app.get("command")
        if not command:
            raise StartFailed("a process job needs the app's 'command'")
        cwd = release_path(image) or self.data_dir
        if not cwd.is_dir():
            cwd = self.data_dir
        instance_id = f"sl-{self.scope}-a{app.get('app_id', 0)}-job{job}"
        exit_file = log_path.with_suffix(".exit")
        pid = next((i.pid for iid, i in self.running_ids(include_jobs=True).items() if iid == instance_id and i), None)
        if pid is None and not exit_file.exists():
            full_env = self._env(app, env, instance_id)
            # the exit status goes to a file too, so a deployer restarted mid-job can still read it
            argv = ["/bin/sh", "-c", 'sh -c "$0"; code=$?; echo $code > "$1"; exit $code', command, str(exit_file)]
            pid = self._spawn(argv, cwd, full_env, log_path).pid
        while pid is not None and not exit_file.exists():
            st = proc_state(pid)
            child = self._children.get(pid)
            if child is not None:
                child.poll()
            if st is None or st[0] == "Z":
                break
            if stop.is_set():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                time.sleep(0.5)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self._reap(pid)
                return 143, _read(log_path) + "\n[cancelled: the deployer is stopping]"
            time.sleep(0.05)
        if pid is not None:
            self._reap(pid)
        try:
            code = int(exit_file.read_text().strip())
        except (OSError, ValueError):
            code = -1
        return code, _read(log_path)


def _read(path: Path, limit: int = 64 * 1024) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace")
