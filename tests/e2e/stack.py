"""A whole Shipline stack in a temporary data dir on free ports, driven through the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from tests.conftest import CACHE, ROOT, free_port, free_ports_in_a_row


def stack_dir() -> Path:
    """A data dir outside pytest's tmp tree: pytest resets its base to mode 0700 at every session
    start, which would lock out PostgreSQL's unprivileged user when sessions overlap."""
    path = Path(tempfile.mkdtemp(prefix="shipline-e2e-", dir="/tmp"))
    path.chmod(0o755)
    return path


class Stack:
    def __init__(self, data_dir: Path | None = None, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir or stack_dir() / "data"
        self.http_port = free_port()
        self.env = {
            **os.environ,
            "SHIPLINE_DATA_DIR": str(self.data_dir),
            "SHIPLINE_CACHE_DIR": str(CACHE),
            "SHIPLINE_HTTP": f"127.0.0.1:{self.http_port}",
            "SHIPLINE_KAFKA_PORT": str(free_port()),
            "SHIPLINE_KAFKA_CONTROLLER_PORT": str(free_port()),
            "SHIPLINE_PG_PORT": str(free_port()),
            "SHIPLINE_PROXY_PORT": str(free_ports_in_a_row(16)),  # app n's frontend: + n, bound at its deploy
            "SHIPLINE_OUTBOUND_ALLOW": "127.0.0.1/32",
            "SHIPLINE_WEB_WORKERS": "2",
            **(extra_env or {}),
        }
        for name in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
            self.env.pop(name, None)
        self.base = f"http://127.0.0.1:{self.http_port}"

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shipline.cli", *args], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def up(self) -> float:
        t0 = time.monotonic()
        result = self.cli("up", "--detach", "--no-demo")
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{self.log_tail()}"
        return time.monotonic() - t0

    def down(self) -> float:
        t0 = time.monotonic()
        result = self.cli("down", timeout=60)
        assert result.returncode == 0, result.stderr
        return time.monotonic() - t0

    def remove(self) -> None:
        """Stop the stack and its deployed apps, and delete its data dir.

        The stack's log goes to stdout first: pytest shows it only for a test that failed, and
        it is the one record of what the services did."""
        print(f"--- {self.data_dir / 'run' / 'stack.log'} (tail) ---\n{self.log_tail(200)}")
        self.cli("down", "--apps", timeout=90)
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def log_tail(self, n: int = 80) -> str:
        log = self.data_dir / "run" / "stack.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "secrets" / "admin-token").read_text().strip()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.env['SHIPLINE_KAFKA_PORT']}"

    def readyz(self) -> requests.Response:
        return requests.get(f"{self.base}/readyz", timeout=5)
