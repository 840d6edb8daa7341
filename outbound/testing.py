"""A real local HTTP receiver that records every request: for the tests and the benchmark.

``Receiver(policy)`` listens on 127.0.0.1 (HTTP/1.1, keep-alive) in background threads; ``policy``
is called with each ``Received`` request and returns ``(status, headers, body)``. It may block
(a hanging endpoint) on an event the caller sets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # epoch seconds when the request arrived
    done_at: float = 0.0
    status: int = 0

    @property
    def delivery(self) -> str:
        return self.headers.get("x-shipline-delivery", "")

    def json(self) -> Any:
        import json

        return json.loads(self.body)


Policy = Callable[[Received], tuple[int, dict[str, str], bytes]]


def ok(_: Received) -> tuple[int, dict[str, str], bytes]:
    return 200, {}, b"ok"


@dataclass
class Receiver:
    policy: Policy = ok
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                req = Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
                with receiver.lock:
                    receiver.requests.append(req)
                try:
                    status, headers, payload = receiver.policy(req)
                except Exception:  # noqa: BLE001 - a broken policy answers 500
                    status, headers, payload = 500, {}, b"policy failed"
                req.status = status
                req.done_at = time.time()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout, shutdown)
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def received(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_until(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll until ``check()`` is truthy and return it; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        time.sleep(interval)


class EventLog:
    """Writes sequenced events straight to a test's events topic, as streams would."""

    def __init__(self, settings: Any) -> None:
        from shipline import kafka

        self.settings = settings
        self.producer = kafka.producer(settings.bootstrap_servers)
        self.sequences: dict[int, int] = {}

    def emit(self, *messages: Any, time: str | None = None) -> list[Any]:
        from shipline import kafka
        from shipline.envelope import wrap

        envs = []
        for message in messages:
            seq = self.sequences.get(message.app_id, 0) + 1
            self.sequences[message.app_id] = seq
            envs.append(wrap(message, source="shipline/streams", sequence=seq, time=time))
        kafka.send_many_sync(self.producer, self.settings.topics.events, envs, timeout=30)
        return envs

    def subscribe(self, app_id: int, url: str, events: list[str] | None = None, secret: str | None = None,
                  subscription_id: str | None = None) -> tuple[str, str]:
        import uuid

        from outbound import signing
        from shipline.messages import SubscriptionCreated

        sid = subscription_id or str(uuid.uuid4())
        secret = secret or signing.generate()
        self.emit(SubscriptionCreated(app_id=app_id, subscription_id=sid, url=url, events=events or ["*"],
                                      secret_encrypted=signing.encrypt(self.settings.secret_key, secret),
                                      description="test"))
        return sid, secret


class Running:
    """A dispatcher running in a thread of this process (``with Running(settings) as d:``)."""

    def __init__(self, settings: Any, **overrides: Any) -> None:
        from outbound.dispatcher import Dispatcher

        self.stop = threading.Event()
        self.dispatcher = Dispatcher(settings, **overrides)
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.dispatcher.run(self.stop)),
                                       name="dispatcher", daemon=True)

    def __enter__(self) -> Any:
        self.thread.start()
        return self.dispatcher

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "dispatcher did not stop within 20 s"
