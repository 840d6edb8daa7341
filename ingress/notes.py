"""Noting accepted deliveries in PostgreSQL off the request's time, in batches.

After Kafka acknowledged a delivery and the host's ``LocalIndex`` holds its id, the request is
answered; its row in ``seen_deliveries`` and the ``last_used_at`` of the hook or token that
signed it are written here by one thread per process, every ``FLUSH_EVERY`` seconds or
``BATCH`` rows, in one transaction per batch (``Store.note_deliveries``). A failed batch is
retried with back-off and nothing is dropped until ``MAX_PENDING`` rows wait; a process that
dies loses at most its unwritten batch, which ``ingress.rebuild`` restores from the log (the
records are durable) and which the host's index still dedupes meanwhile.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from typing import Protocol

from shipline import messages as m
from shipline.envelope import Envelope

log = logging.getLogger("ingress")

FLUSH_EVERY = 0.05
BATCH = 1_000
MAX_PENDING = 200_000
IDLE_EXIT = 5.0  # seconds with nothing to write before the thread ends (started again on demand)

Row = tuple[int, str, str, str | None, bool]


class NoteSink(Protocol):
    def note_deliveries(self, rows: list[Row]) -> None: ...


def rows_of(envelopes: list[Envelope]) -> list[Row]:
    rows = []
    for env in envelopes:
        msg = env.data
        if isinstance(msg, m.DeliveryReceived):
            token = msg.hook_id is None and msg.verification == "token"
            rows.append((msg.app_id, msg.delivery_id, msg.received_at, msg.hook_id, token))
    return rows


class DeliveryNotes:
    def __init__(self, sink: NoteSink, flush_every: float = FLUSH_EVERY) -> None:
        self.sink = sink
        self.flush_every = flush_every
        self._pending: deque[Row] = deque()
        self._cond = threading.Condition()
        self._writing = 0  # rows taken by the thread and not yet written
        self._thread: threading.Thread | None = None
        self._atexit = False

    def add(self, envelopes: list[Envelope]) -> None:
        rows = rows_of(envelopes)
        with self._cond:
            self._pending.extend(rows)
            while len(self._pending) > MAX_PENDING:  # the database has been away for a long while
                dropped = self._pending.popleft()
                log.warning("dropped the note of delivery %s (too many unwritten)", dropped[1])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ingress-delivery-notes", daemon=True)
                self._thread.start()
                if not self._atexit:
                    atexit.register(self.flush, 5.0)
                    self._atexit = True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every row added so far is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        backoff = self.flush_every
        idle_since = time.monotonic()
        while True:
            with self._cond:
                if not self._pending:
                    self._cond.wait(self.flush_every)
                if not self._pending:
                    if time.monotonic() - idle_since >= IDLE_EXIT:
                        self._thread = None
                        return
                    continue
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
                self._writing = len(batch)
            try:
                self.sink.note_deliveries(batch)
            except Exception as exc:  # noqa: BLE001 - retried: the rows go back in front
                log.warning("could not note %d accepted deliveries: %s; retrying", len(batch), type(exc).__name__)
                with self._cond:
                    self._pending.extendleft(reversed(batch))
                    self._writing = 0
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = self.flush_every
            idle_since = time.monotonic()
            with self._cond:
                self._writing = 0
                self._cond.notify_all()
            if len(batch) < BATCH:
                time.sleep(self.flush_every)  # let a batch gather
