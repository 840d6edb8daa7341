"""Steady, paced HTTP load in a process of its own (``bench.deploy``'s client side).

It lives in a module (not ``__main__``) so the ``spawn`` start method can import it.
"""

from __future__ import annotations

import http.client
import multiprocessing as mp
import threading
import time
from typing import Any


def _load_worker(port: int, rate: float, threads: int, stop: Any, out: Any) -> None:
    """A separate process: ``rate`` requests/s over ``threads`` keep-alive connections, paced."""
    counts: dict[int, int] = {}
    failures: list[str] = []
    bodies: dict[str, int] = {}
    lock = threading.Lock()
    interval = threads / rate
    start = time.monotonic()

    def run(offset: float) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not stop.is_set():
            due = start + offset + n * interval
            n += 1
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/")
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace").strip()
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
                with lock:
                    second = int(time.monotonic() - start)
                    counts[second] = counts.get(second, 0) + 1
                    if resp.status == 200:
                        bodies[body] = bodies.get(body, 0) + 1
                    else:
                        failures.append(f"HTTP {resp.status}")
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                with lock:
                    failures.append(repr(exc))

    workers = [threading.Thread(target=run, args=(i * interval / threads,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put({"counts": counts, "failures": failures, "bodies": bodies})


class Load:
    def __init__(self, port: int, rate: float, threads: int) -> None:
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.queue = ctx.Queue()
        self.proc = ctx.Process(target=_load_worker, args=(port, rate, threads, self.stop, self.queue), daemon=True)

    def __enter__(self) -> Load:
        self.proc.start()
        return self

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        result = self.queue.get(timeout=60)
        self.proc.join(10)
        return result

    def __exit__(self, *exc: object) -> None:
        if self.proc.is_alive():
            self.stop.set()
            self.proc.join(10)


