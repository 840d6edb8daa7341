"""Health checks of new instances: ``GET http://127.0.0.1:<port><health_path>`` until 2xx/3xx.

Like Kamal: poll every ``health_interval`` seconds (default 1) until ``health_timeout`` (default
30). An instance that exits while we wait fails at once, with its last output as the reason.
Connections go straight to the instance (never through an HTTP proxy from the environment).
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable


def probe(port: int, path: str = "/", timeout: float = 2.0) -> tuple[bool, str]:
    path = path if path.startswith("/") else "/" + path
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "shipline-health", "Connection": "close"})
        resp = conn.getresponse()
        resp.read(65536)
        if 200 <= resp.status < 400:
            return True, f"HTTP {resp.status}"
        return False, f"GET {path} answered HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"GET {path}: {exc.__class__.__name__}: {exc}"
    finally:
        conn.close()


def wait_healthy(
    port: int,
    path: str,
    *,
    interval: float,
    timeout: float,
    alive: Callable[[], tuple[bool, str]],
    stop: threading.Event,
) -> tuple[bool, str]:
    """(True, "") once healthy; (False, reason) on timeout, exit of the instance, or stop."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    last = "no answer yet"
    while True:
        if stop.is_set():
            return False, "the deployer is stopping"
        ok, why = alive()
        if not ok:
            return False, why
        ok, last = probe(port, path, timeout=min(2.0, max(0.5, interval)))
        if ok:
            return True, ""
        if time.monotonic() >= deadline:
            return False, f"not healthy within {timeout:g}s: {last}"
        # quick retries during the first second: most instances need a moment to bind their port
        pause = min(0.1, interval) if time.monotonic() - started < 1.0 else interval
        stop.wait(max(0.0, min(pause, deadline - time.monotonic())))
