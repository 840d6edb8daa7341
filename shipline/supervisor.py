"""Run a set of child processes: prefixed logs, restart with back-off, a status file, clean stop.

The supervisor is deliberately small: children are plain processes (``python -m <service>``,
the Kafka broker's java, PostgreSQL's postgres), each restarted when it dies, with a back-off
that resets after a minute of good health. ``status.json`` (rewritten every second) is what
``/readyz`` and ``shipline status`` read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    popen_kwargs: dict[str, Any] = field(default_factory=dict)
    before_start: Callable[[], None] | None = None
    infra: bool = False  # stopped after every service, so services can flush first
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    def __init__(self, children: list[Child], run_dir: Path, out: IO[str] | None = None) -> None:
        self.children = children
        self.run_dir = run_dir
        self.out = out or sys.stdout
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle

    def start_child(self, child: Child) -> None:
        if child.before_start:
            child.before_start()
        kwargs: dict[str, Any] = {
            "stdout": subprocess.PIPE,
            "stderr": subprocess.STDOUT,
            "stdin": subprocess.DEVNULL,
            "start_new_session": True,  # Ctrl-C reaches the supervisor only; it stops children in order
            **child.popen_kwargs,
        }
        if child.env is not None:
            kwargs["env"] = child.env
        child.process = subprocess.Popen(child.argv, **kwargs)
        child.started_at = time.monotonic()
        threading.Thread(target=self._pump, args=(child, child.process), daemon=True).start()
        self.log(child.name, f"started (pid {child.process.pid})")

    def _pump(self, child: Child, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        width = max(len(c.name) for c in self.children)
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            with self._lock:
                print(f"{child.name:<{width}} | {line}", file=self.out, flush=True)

    def log(self, name: str, message: str) -> None:
        width = max(len(c.name) for c in self.children)
        with self._lock:
            print(f"{name:<{width}} | [supervisor] {message}", file=self.out, flush=True)

    def start_all(self) -> None:
        for child in self.children:
            self.start_child(child)

    def watch(self) -> None:
        """Restart dead children until ``stop`` is called; rewrite the status file every second."""
        while not self.stopping.is_set():
            now = time.monotonic()
            for child in self.children:
                if child.alive or self.stopping.is_set():
                    continue
                if child.process is not None and child.next_start == 0.0:
                    code = child.process.returncode
                    healthy_for = now - child.started_at
                    if healthy_for > 60:
                        child.restarts = 0
                    delay = min(0.5 * (2 ** child.restarts), 10.0)
                    child.next_start = now + delay
                    self.log(child.name, f"exited with {code}; restarting in {delay:.1f}s")
                if now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    try:
                        self.start_child(child)
                    except Exception as exc:  # noqa: BLE001 - keep supervising the others
                        self.log(child.name, f"could not start: {exc}")
                        child.next_start = now + 2.0
            self.write_status()
            self.stopping.wait(0.2)

    def write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "updated": time.time(),
            "services": {
                c.name: {"alive": c.alive, "pid": c.process.pid if c.process else None, "restarts": c.restarts}
                for c in self.children
            },
        }
        tmp = self.run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(status))
        tmp.replace(self.run_dir / "status.json")

    def stop(self, timeout: float = 8.0) -> None:
        """SIGTERM every child (services first, infrastructure last), SIGKILL what outlives ``timeout``."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        services = [c for c in self.children if not c.infra]
        infra = [c for c in self.children if c.infra]
        for group in (services[::-1], infra[::-1]):
            for child in group:
                if child.alive:
                    assert child.process is not None
                    try:
                        child.process.send_signal(signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.log(child.name, "did not stop in time; killing")
                    child.process.kill()
                    child.process.wait(5)
        (self.run_dir / "status.json").unlink(missing_ok=True)
