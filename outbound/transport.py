"""One HTTP POST to a pinned, checked address, with keep-alive connections reused per target.

Built on ``http.client`` rather than requests: redirects are never followed (a 3xx is a failure
like any other), the connection goes to the address the SSRF guard approved (``ssrf.Target.ip``)
while TLS still verifies the certificate for the host name, and the overhead per request stays
small enough for thousands of deliveries a second.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from outbound import ssrf

MAX_LOGGED_BODY = 20 * 1024
MAX_READ = 1024 * 1024  # beyond this the rest of a response is not read; the connection is dropped
IDLE_PER_TARGET = 16
RESOLVE_TTL = 5.0  # seconds a resolved and checked address is reused


@dataclass
class Response:
    status: int | None  # None: no HTTP answer (refused, timeout, connection error)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None
    duration: float = 0.0  # seconds

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _PinnedHTTPS(http.client.HTTPSConnection):
    """Connects to the checked IP; SNI and certificate verification use the URL's host name."""

    def __init__(self, target: ssrf.Target, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(target.ip, target.port, timeout=timeout, context=context)
        self._server_name = target.host
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)


class Transport:
    def __init__(self, allow: Iterable[ssrf.Network], resolver=socket.getaddrinfo) -> None:  # type: ignore[no-untyped-def]
        self.allow = tuple(allow)
        self.resolver = resolver
        self._idle: dict[tuple[str, str, int, str], list[http.client.HTTPConnection]] = {}
        self._busy: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._tls = ssl.create_default_context()
        self._targets: dict[str, tuple[ssrf.Target, float]] = {}

    def _target(self, url: str) -> ssrf.Target:
        """The checked, pinned target; a checked answer is reused for a few seconds (it stays pinned)."""
        now = time.monotonic()
        cached = self._targets.get(url)
        if cached is not None and cached[1] > now:
            return cached[0]
        target = ssrf.resolve(url, self.allow, self.resolver)
        if len(self._targets) > 10000:
            self._targets.clear()
        self._targets[url] = (target, now + RESOLVE_TTL)
        return target

    def _connection(self, target: ssrf.Target, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        key = (target.scheme, target.ip, target.port, target.host)
        with self._lock:
            if self._closed:
                raise ConnectionError("transport closed")
            idle = self._idle.get(key)
            if idle:
                reused = idle.pop()
                self._busy.add(reused)
                return reused, True
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            conn = _PinnedHTTPS(target, timeout, self._tls)
        else:
            conn = http.client.HTTPConnection(target.ip, target.port, timeout=timeout)
        with self._lock:
            self._busy.add(conn)
        return conn, False

    def _release(self, target: ssrf.Target, conn: http.client.HTTPConnection, reusable: bool) -> None:
        key = (target.scheme, target.ip, target.port, target.host)
        with self._lock:
            self._busy.discard(conn)
            if reusable and not self._closed:
                idle = self._idle.setdefault(key, [])
                if len(idle) < IDLE_PER_TARGET:
                    idle.append(conn)
                    return
        conn.close()

    def post(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Response:
        started = time.monotonic()
        try:
            target = self._target(url)
        except ssrf.Refused as exc:
            return Response(None, error=f"refused: {exc}", duration=time.monotonic() - started)
        deadline = started + timeout
        for attempt in (1, 2):
            try:
                conn, reused = self._connection(target, timeout)
            except ConnectionError as exc:
                return Response(None, error=str(exc), duration=time.monotonic() - started)
            try:
                result = self._exchange(conn, target, body, headers, deadline)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._release(target, conn, False)
                if reused and attempt == 1 and time.monotonic() < deadline:
                    continue  # a stale keep-alive connection: retry once on a fresh one
                return Response(None, error=_describe(exc), duration=time.monotonic() - started)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._release(target, conn, False)
                return Response(None, error=_describe(exc), duration=time.monotonic() - started)
            response, reusable = result
            self._release(target, conn, reusable)
            response.duration = time.monotonic() - started
            return response
        raise AssertionError("unreachable")

    def _exchange(
        self, conn: http.client.HTTPConnection, target: ssrf.Target, body: bytes, headers: dict[str, str],
        deadline: float,
    ) -> tuple[Response, bool]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        conn.timeout = left
        if conn.sock is not None:
            conn.sock.settimeout(left)
        conn.request("POST", target.path, body=body, headers={"Host": target.host_header, **headers})
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        if conn.sock is not None:
            conn.sock.settimeout(left)
        resp = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        complete = True
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out reading the response body")
            if conn.sock is not None:
                conn.sock.settimeout(left)
            chunk = resp.read(65536) if size < MAX_READ else b""  # read(), not read1(): it closes at the end
            if not chunk:
                complete = resp.isclosed() or size < MAX_READ
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
        reusable = complete and not resp.will_close and resp.isclosed()
        return (
            Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data[:MAX_LOGGED_BODY]),
            reusable,
        )

    def close(self) -> None:
        """Close every connection, idle or in use: a request in flight fails at once (shutdown)."""
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle] + list(self._busy)
            self._idle.clear()
        for conn in conns:
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
