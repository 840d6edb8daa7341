"""A lean closed-loop HTTP/1.1 load generator: keep-alive sockets, one thread per client.

Requests are pre-built bytes (only the delivery id header changes), and responses are parsed
just enough (status line, Content-Length), so the client spends little of the machine's two cores.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, of 2xx answers inside the window
    accepted: list[str] = field(default_factory=list)  # delivery ids answered 2xx (whole run)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0


def _read_response(sock: socket.socket, buf: bytearray) -> int:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        rest += chunk
    del buf[:]
    buf += rest[length:]
    return status


def run(host: str, port: int, make_request: Callable[[str], bytes], *, clients: int, warmup: float,
        seconds: float, label: str) -> tuple[Result, float]:
    """Drive ``clients`` connections for ``warmup + seconds``; returns the result and the window length."""
    result = Result()
    lock = threading.Lock()
    start = time.monotonic()
    window_start, window_end = start + warmup, start + warmup + seconds

    def connect() -> socket.socket | None:
        try:
            sock = socket.create_connection((host, port), timeout=30)
        except OSError:
            time.sleep(0.05)  # counted as a client error; the loop tries again
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def client(index: int) -> None:
        mine = Result()
        sock = connect()
        buf = bytearray()
        n = 0
        while True:
            now = time.monotonic()
            if now >= window_end:
                break
            if sock is None:
                mine.errors += 1
                sock = connect()
                continue
            delivery = f"{label}-{index}-{n}"
            n += 1
            t0 = time.perf_counter()
            try:
                sock.sendall(make_request(delivery))
                status = _read_response(sock, buf)
            except (OSError, ValueError):
                mine.errors += 1
                sock.close()
                sock = connect()
                buf = bytearray()
                continue
            elapsed = time.perf_counter() - t0
            mine.statuses[status] = mine.statuses.get(status, 0) + 1
            if 200 <= status < 300:
                mine.accepted.append(delivery)
                if now >= window_start:
                    mine.latencies.append(elapsed)
        if sock is not None:
            sock.close()
        with lock:
            result.latencies.extend(mine.latencies)
            result.accepted.extend(mine.accepted)
            result.errors += mine.errors
            for code, count in mine.statuses.items():
                result.statuses[code] = result.statuses.get(code, 0) + count

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result, seconds


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]
