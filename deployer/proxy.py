"""The reverse proxy in front of every app: a real HAProxy driven through its runtime API.

Design (why it looks like this):

* **One HAProxy per data dir**, master-worker mode, daemonised: it is not a child of the
  deployer, so a deployer crash or restart never takes an app offline. Its files live under
  ``<data_dir>/proxy/``: ``haproxy.cfg`` (written by us), ``state.json`` (the desired state),
  ``haproxy.pid`` (the master), ``master.sock`` (master CLI) and ``haproxy.log``.
* **One frontend per app** bound on ``127.0.0.1:<proxy_port + app_id>``: a stable address that
  never changes between releases, recorded in the state file.
* **Pre-provisioned server slots**: each app's backend is written with ``slots`` servers
  (default 4, at least twice the instance count so old and new fit side by side), parked in
  maintenance on a placeholder address. A rollout therefore only needs the runtime API:
  ``set server <b>/<s> addr 127.0.0.1 port <p>``, ``set server ... weight <w>`` in steps,
  ``set server ... state drain``, then ``state maint``. No reload happens during a rollout.
* **Reloads only when an app's frontend/backend must be added or grown** (first deploy of an
  app): the config is rewritten from ``state.json`` (which always mirrors the runtime state,
  weights included) and the master is told to ``reload``. Reloads are seamless: the master hands
  the listening sockets to the new worker (``expose-fd listeners``), the old worker finishes its
  connections, so no request on another app's frontend fails.
* **``state.json`` is the source of truth**, guarded by an ``flock`` so several deployer
  processes on one machine can drive the same HAProxy: every mutation takes the lock, applies
  the runtime command and records it. If HAProxy died it is restarted from that state.
* Requests are protected from a server that goes away under them by ``retry-on conn-failure
  empty-response`` and ``option redispatch`` (a failed attempt is retried on another server).

Runtime commands go through the master CLI prefixed with ``@1`` (the current worker), so a
command never reaches an old worker that is finishing after a reload.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PLACEHOLDER_PORT = 1
MAX_WEIGHT = 256
DEFAULT_SLOTS = 4
_SUN_PATH_MAX = 100


class ProxyError(RuntimeError):
    """HAProxy could not be started, reloaded or driven."""


@dataclass
class Slot:
    name: str
    addr: str = "127.0.0.1"
    port: int = PLACEHOLDER_PORT
    weight: int = 0
    state: str = "maint"  # ready | drain | maint
    instance: str = ""  # who holds the slot (instance id), "" when free

    @property
    def free(self) -> bool:
        return self.instance == ""


@dataclass
class AppProxy:
    app_id: int
    port: int
    slots: list[Slot] = field(default_factory=list)

    @property
    def backend(self) -> str:
        return f"app_{self.app_id}"

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise ProxyError(f"app {self.app_id} has no server slot {name}")


@dataclass
class ProxyState:
    apps: dict[int, AppProxy] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"apps": [asdict(a) for a in self.apps.values()]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> ProxyState:
        doc = json.loads(text) if text.strip() else {"apps": []}
        apps = {}
        for a in doc.get("apps", []):
            apps[int(a["app_id"])] = AppProxy(int(a["app_id"]), int(a["port"]), [Slot(**s) for s in a["slots"]])
        return cls(apps)


def render_config(state: ProxyState, *, stats_socket: Path) -> str:
    """The whole haproxy.cfg for a state (pure: unit-tested)."""
    lines = [
        "# written by shipline's deployer from state.json; edits are overwritten",
        "global",
        "    master-worker",
        f"    stats socket {stats_socket} mode 600 level admin expose-fd listeners",
        "    stats timeout 1m",
        "    hard-stop-after 60s",
        "    maxconn 8192",
        "    noreuseport",  # a stale HAProxy on our port makes start-up fail instead of sharing traffic
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-request 10s",
        "    timeout http-keep-alive 10s",
        "    timeout queue 10s",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "",
    ]
    for app in sorted(state.apps.values(), key=lambda a: a.app_id):
        lines += [
            f"frontend {app.backend}",
            f"    bind 127.0.0.1:{app.port}",
            f"    default_backend {app.backend}",
            "",
            f"backend {app.backend}",
            "    balance roundrobin",
        ]
        for s in app.slots:
            weight = s.weight if s.state == "ready" else 0
            disabled = " disabled" if s.state == "maint" else ""
            lines.append(f"    server {s.name} {s.addr}:{s.port} weight {weight}{disabled}")
        lines.append("")
    return "\n".join(lines)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _short(path: Path, name: str) -> Path:
    """Unix socket paths are limited to ~107 bytes: fall back to /run for deep data dirs."""
    candidate = path / name
    if len(str(candidate)) <= _SUN_PATH_MAX:
        return candidate
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    short = Path("/run/shipline-haproxy") / digest
    if not os.access("/run", os.W_OK):
        short = Path("/tmp/shipline-haproxy") / digest
    short.mkdir(parents=True, exist_ok=True)
    return short / name


class Proxy:
    """Drives the HAProxy of one data dir; every public method is safe across processes."""

    def __init__(self, data_dir: Path, base_port: int, slots: int = DEFAULT_SLOTS, binary: str = "haproxy") -> None:
        self.dir = Path(data_dir) / "proxy"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.base_port = base_port
        self.default_slots = slots
        self.binary = shutil.which(binary) or binary
        self.config = self.dir / "haproxy.cfg"
        self.state_file = self.dir / "state.json"
        self.pidfile = self.dir / "haproxy.pid"
        self.master_socket = _short(self.dir, "master.sock")
        self.stats_socket = _short(self.dir, "stats.sock")
        self.logfile = self.dir / "haproxy.log"

    # ------------------------------------------------------------------ state and locking

    @contextlib.contextmanager
    def _locked(self) -> Iterator[ProxyState]:
        with open(self.dir / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                state = self._load()
                yield state
                self._save(state)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _load(self) -> ProxyState:
        try:
            return ProxyState.from_json(self.state_file.read_text())
        except FileNotFoundError:
            return ProxyState()

    def _save(self, state: ProxyState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        os.replace(tmp, self.state_file)

    def state(self) -> ProxyState:
        """A snapshot of the recorded state (read without the lock: the file is replaced atomically)."""
        return self._load()

    # ------------------------------------------------------------------ process management

    def port_for(self, app_id: int) -> int:
        port = self.base_port + int(app_id)
        if not 0 < port < 65536:
            raise ProxyError(f"app {app_id}: proxy port {port} out of range (SHIPLINE_PROXY_PORT={self.base_port})")
        return port

    def url(self, app_id: int) -> str:
        app = self._load().apps.get(int(app_id))
        return f"http://127.0.0.1:{app.port if app else self.port_for(app_id)}"

    def master_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid if _state(pid) not in ("", "Z") else None

    def running(self) -> bool:
        if self.master_pid() is None:
            return False
        try:
            self.master("show proc", timeout=2)
            return True
        except ProxyError:
            return False

    def _write_config(self, state: ProxyState) -> None:
        text = render_config(state, stats_socket=self.stats_socket)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(tmp)], capture_output=True, text=True)
        if check.returncode != 0:
            raise ProxyError(f"generated haproxy config is invalid: {check.stderr.strip() or check.stdout.strip()}")
        os.replace(tmp, self.config)

    def _strays(self) -> list[int]:
        """Masters of an HAProxy started on our config file that we lost track of (pidfile gone)."""
        found = []
        mine = str(self.config)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv if a]
            if args and args[0].endswith("haproxy") and "-sf" not in args and mine in args:
                found.append(int(entry.name))
        return found

    def _start(self, state: ProxyState, timeout: float = 20) -> None:
        strays = self._strays()
        for pid in strays:
            log.warning("stopping a stray haproxy (pid %s) on %s", pid, self.config)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while strays and time.monotonic() < deadline:
            strays = [p for p in strays if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
            time.sleep(0.05)
        self._write_config(state)
        for sock in (self.master_socket, self.stats_socket):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        cmd = [self.binary, "-W", "-D", "-f", str(self.config), "-p", str(self.pidfile), "-S", str(self.master_socket)]
        with open(self.logfile, "ab") as out:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        if proc.returncode != 0:
            raise ProxyError(f"haproxy failed to start (exit {proc.returncode}); see {self.logfile}")
        self._wait_worker(state, timeout)
        log.info("haproxy started (master pid %s), config %s", self.master_pid(), self.config)

    def _wait_worker(self, state: ProxyState, timeout: float, old_worker: int | None = None) -> None:
        """Until the current worker answers and serves every frontend of ``state``."""
        deadline = time.monotonic() + timeout
        wanted = {a.backend for a in state.apps.values()}
        last = ""
        while time.monotonic() < deadline:
            try:
                worker = self.worker_pid()
                if worker is not None and worker != old_worker:
                    names = {row["pxname"] for row in self._stat_rows() if row["svname"] == "FRONTEND"}
                    if wanted <= names:
                        return
                    last = f"frontends {sorted(names)} lack {sorted(wanted - names)}"
            except ProxyError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise ProxyError(f"haproxy worker not ready within {timeout}s: {last}")

    def _reload(self, state: ProxyState, timeout: float = 30) -> None:
        self._write_config(state)
        old = self.worker_pid()
        self.master("reload", timeout=10)
        self._wait_worker(state, timeout, old_worker=old)

    def ensure_running(self) -> None:
        with self._locked() as state:
            if not self.running():
                self._start(state)

    def stop(self, timeout: float = 10) -> None:
        """Stop HAProxy (only ``shipline down`` and tests do this: apps go offline)."""
        pid = self.master_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.master_pid() is not None:
            time.sleep(0.05)
        if self.master_pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ the runtime API

    def master(self, command: str, timeout: float = 5) -> str:
        """One command on the master CLI (``@1 <cmd>`` reaches the current worker)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(str(self.master_socket))
                s.sendall(command.encode() + b"\n")
                s.shutdown(socket.SHUT_WR)  # non-interactive: the CLI answers and closes
                chunks = []
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
        except OSError as exc:
            raise ProxyError(f"haproxy master CLI: {command!r}: {exc}") from exc
        return b"".join(chunks).decode(errors="replace")

    def runtime(self, command: str) -> str:
        """A runtime API command on the current worker; a non-empty answer other than a notice is an error."""
        out = self.master(f"@1 {command}").strip()
        if out and not out.startswith(("Done", "no need to change")) and "changed from" not in out:
            raise ProxyError(f"haproxy refused {command!r}: {out}")
        return out

    def worker_pid(self) -> int | None:
        out = self.master("show proc", timeout=3)
        section = ""
        for line in out.splitlines():
            if line.startswith("#"):
                section = line.strip("# ").lower()
                continue
            parts = line.split()
            if section == "workers" and len(parts) >= 2 and parts[1] == "worker":
                try:
                    return int(parts[0])
                except ValueError:
                    continue
        return None

    def _stat_rows(self) -> list[dict[str, str]]:
        out = self.master("@1 show stat", timeout=5)
        text = out.lstrip("# ").strip()
        if not text or "pxname" not in text.splitlines()[0]:
            raise ProxyError(f"unexpected show stat answer: {out[:200]!r}")
        return list(csv.DictReader(io.StringIO(text)))

    def stats(self, app_id: int) -> dict[str, dict[str, str]]:
        """Live per-server stats of an app's backend: slot name -> CSV row (status, weight, scur ...)."""
        backend = f"app_{int(app_id)}"
        return {r["svname"]: r for r in self._stat_rows() if r["pxname"] == backend}

    # ------------------------------------------------------------------ app operations

    def ensure_app(self, app_id: int, min_slots: int | None = None) -> int:
        """Make sure the app's frontend and backend exist with enough slots; returns the proxy port.

        If HAProxy cannot take the change (its port is taken by another program ...), the recorded
        state is left as it was, so the other apps' next reload is not poisoned by it.
        """
        need = max(self.default_slots, min_slots or 0)
        with self._locked() as state:
            running = self.running()
            app = state.apps.get(int(app_id))
            before = None if app is None else AppProxy(app.app_id, app.port, [Slot(**asdict(x)) for x in app.slots])
            changed = False
            if app is None:
                port = self.port_for(app_id)
                if not _port_free(port):
                    raise ProxyError(f"proxy port {port} for app {app_id} is in use by another program "
                                     f"(SHIPLINE_PROXY_PORT={self.base_port} + app id)")
                app = AppProxy(int(app_id), port, [])
                state.apps[app.app_id] = app
                changed = True
            while len(app.slots) < need:
                app.slots.append(Slot(f"s{len(app.slots) + 1}"))
                changed = True
            try:
                if not running:
                    self._start(state)
                elif changed:
                    self._reload(state)
            except (ProxyError, OSError, subprocess.SubprocessError) as exc:
                if before is None:
                    state.apps.pop(int(app_id), None)
                else:
                    state.apps[int(app_id)] = before
                with contextlib.suppress(ProxyError):
                    self._write_config(state)
                raise ProxyError(f"haproxy could not add app {app_id}: {exc}") from exc
            return app.port

    def remove_app(self, app_id: int) -> None:
        with self._locked() as state:
            if state.apps.pop(int(app_id), None) is not None and self.running():
                self._reload(state)

    def add_server(self, app_id: int, instance: str, port: int, addr: str = "127.0.0.1", weight: int = 0) -> str:
        """Put an instance into a free slot with the given weight (0 = ready but no traffic yet)."""
        with self._locked() as state:
            self._ensure_alive(state)
            app = state.apps[int(app_id)]
            existing = [s for s in app.slots if s.instance == instance]
            slot = existing[0] if existing else next((s for s in app.slots if s.free), None)
            if slot is None:
                raise ProxyError(f"app {app_id}: no free server slot (have {len(app.slots)})")
            b = f"{app.backend}/{slot.name}"
            self.runtime(f"set server {b} state maint")
            self.runtime(f"set server {b} addr {addr} port {int(port)}")
            self.runtime(f"set server {b} weight {int(weight)}")
            self.runtime(f"set server {b} state ready")
            slot.addr, slot.port, slot.weight = addr, int(port), int(weight)
            slot.state, slot.instance = "ready", instance
            return slot.name

    def set_weights(self, app_id: int, weights: dict[str, int]) -> None:
        """Set several slots' weights under one lock (one traffic-shift step)."""
        with self._locked() as state:
            self._ensure_alive(state)
            app = state.apps[int(app_id)]
            for name, weight in weights.items():
                weight = max(0, min(MAX_WEIGHT, int(weight)))
                self.runtime(f"set server {app.backend}/{name} weight {weight}")
                app.slot(name).weight = weight

    def drain(self, app_id: int, slot_name: str) -> None:
        with self._locked() as state:
            self._ensure_alive(state)
            app = state.apps[int(app_id)]
            self.runtime(f"set server {app.backend}/{slot_name} state drain")
            app.slot(slot_name).state = "drain"

    def wait_idle(self, app_id: int, slot_name: str, timeout: float = 30) -> bool:
        """Until the slot has no current session (drained); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.stats(app_id).get(slot_name)
            if row is None or int(row.get("scur") or 0) == 0:
                return True
            time.sleep(0.05)
        return False

    def release(self, app_id: int, slot_name: str) -> None:
        """Disable a slot (maintenance, placeholder address) and free it."""
        with self._locked() as state:
            self._ensure_alive(state)
            app = state.apps[int(app_id)]
            b = f"{app.backend}/{slot_name}"
            self.runtime(f"set server {b} state maint")
            self.runtime(f"set server {b} weight 0")
            slot = app.slot(slot_name)
            slot.state, slot.weight, slot.instance, slot.port = "maint", 0, "", PLACEHOLDER_PORT

    def slots_of(self, app_id: int) -> list[Slot]:
        app = self._load().apps.get(int(app_id))
        return list(app.slots) if app else []

    def _ensure_alive(self, state: ProxyState) -> None:
        if not self.running():
            log.warning("haproxy was not running: starting it from %s", self.state_file)
            self._start(state)
