"""The benchmark's receiver: a separate process that checks every signature and records every request.

``python -m bench.outbound.receiver PORT SECRET FAIL_RATE``. POSTs are verified (hex HMAC of the
body) and answered 200, or 500 with probability FAIL_RATE; ``GET /_count`` returns the counts,
``GET /_dump`` every record as JSON lines: delivery id, event id, app, sequence, status, arrival
and answer times.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    port, secret, fail_rate = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
    lock = threading.Lock()
    records: list[tuple[str, str, int, int, int, float, float]] = []
    counts = {"ok": 0, "total": 0, "bad_signature": 0}
    rng = random.Random(42)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            arrived = time.time()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            good = hmac.compare_digest(expected, self.headers.get("X-Shipline-Signature", ""))
            with lock:
                status = 500 if rng.random() < fail_rate else 200
            if not good:
                status = 401
            doc = json.loads(body)
            done = time.time()  # before the answer leaves: the sender cannot have seen it yet
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            with lock:
                counts["total"] += 1
                counts["ok"] += status == 200
                counts["bad_signature"] += not good
                records.append((self.headers.get("X-Shipline-Delivery", ""), doc["id"], int(doc["subject"]),
                                int(doc.get("sequence") or 0), status, arrived, done))

        def do_GET(self) -> None:  # noqa: N802
            with lock:
                if self.path == "/_count":
                    data = json.dumps(counts).encode()
                else:
                    data = "\n".join(json.dumps(r) for r in records).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 512

    Server(("127.0.0.1", port), Handler).serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
