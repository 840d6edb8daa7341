"""Sending the outbox: lanes, a scheduler, a bounded pool of senders and a batching writer.

A *lane* is one (subscription, app): its deliveries go strictly in event order, one at a time, so
event n+1 is not sent before n succeeded or was given up. Lanes are independent: the scheduler
hands ready lanes to a fixed pool of sender threads. An *endpoint* is a URL (many subscriptions,
one per app, often share one); at most ``per_endpoint`` lanes send to one endpoint at once, and a
lane that finds its endpoint full parks without holding a thread, so a slow or hanging endpoint
ties up at most that many senders and delays nobody else. A lane whose head waits for a retry
takes no thread at all; it sleeps in a heap until its ``next_attempt_at``, which is in
PostgreSQL, so a restart resumes exactly there.

Failures are written synchronously (the next attempt time is durable before the lane sleeps);
successes go through a writer that batches them every few milliseconds. Until a success is written
its delivery id stays in the lane's ``unflushed`` set, so the lane never sends it twice.
"""

from __future__ import annotations

import heapq
import logging
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg

from outbound import retry, signing
from outbound.options import Options
from outbound.store import AttemptRecord, Pending, SendingSubscription, Store, ts
from outbound.transport import Transport

log = logging.getLogger(__name__)

Lane = tuple[str, int]
BATCH = 100  # deliveries read per query
SLICE = 0.5  # seconds a lane keeps a sender before it yields to others
RESCAN = 2.0  # seconds between full scans of the outbox (wake-ups missed, other writers)
FLUSH_EVERY = 0.02


@dataclass(eq=False)
class LaneState:
    key: Lane
    running: bool = False
    queued: bool = False
    parked: bool = False
    dirty: bool = False
    wake_at: float | None = None
    endpoint: str | None = None  # set while the lane holds a slot of that endpoint
    unflushed: set[str] = field(default_factory=set)


class _Idle:
    pass


class _Yield:
    pass


class _Parked:
    pass


@dataclass(frozen=True)
class _Wait:
    at: float


IDLE, YIELD, PARKED = _Idle(), _Yield(), _Parked()
Result = _Idle | _Yield | _Wait | _Parked


def endpoint_of(url: str) -> str:
    """Requests to the same URL share one endpoint limit, whichever subscriptions (apps) they serve."""
    return url


class Sender:
    def __init__(
        self,
        store: Store,
        transport: Transport,
        opts: Options,
        decrypt: Callable[[str], str],
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.transport = transport
        self.opts = opts
        self.decrypt = decrypt
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_disabled: Callable[[], None] = lambda: None
        self.database_lost = False  # set when PostgreSQL went away: the dispatcher restarts clean
        self._cond = threading.Condition()
        self._lanes: dict[Lane, LaneState] = {}
        self._ready: deque[LaneState] = deque()
        self._heap: list[tuple[float, int, LaneState]] = []
        self._counter = 0
        self._active: Counter[str] = Counter()  # endpoint -> lanes holding one of its slots
        self._parked: dict[str, deque[LaneState]] = {}
        self._disabled_at: dict[str, float] = {}
        self._work: queue.Queue[LaneState | None] = queue.Queue()
        self._successes: list[tuple[AttemptRecord, float, LaneState]] = []
        self._wcond = threading.Condition()
        self._stop = threading.Event()
        self._rescan_now = True
        self._threads: list[threading.Thread] = []
        self._secret_cache: dict[str, str] = {}
        self.sent = 0  # attempts made (for the benchmark and logs)

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._spawn("outbound-scheduler", self._schedule_loop)
        self._spawn("outbound-writer", self._write_loop)
        for i in range(self.opts.workers):
            self._spawn(f"outbound-send-{i}", self._work_loop)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads) and not self._stop.is_set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending: in-flight requests are cut (their deliveries stay pending), successes are written."""
        self._stop.set()
        self.transport.close()
        with self._cond:
            self._cond.notify_all()
        for _ in range(self.opts.workers):
            self._work.put(None)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.name != "outbound-writer":
                t.join(max(0.0, deadline - time.monotonic()))
        with self._wcond:
            self._wcond.notify_all()
        for t in self._threads:
            if t.name == "outbound-writer":
                t.join(max(0.5, deadline - time.monotonic()))

    # ------------------------------------------------------------------------------ scheduling

    def poke(self, lanes: Iterable[Lane]) -> None:
        """New work may be waiting in these lanes."""
        with self._cond:
            for key in lanes:
                lane = self._lane(key)
                self._make_ready(lane)
            self._cond.notify()

    def rescan_soon(self) -> None:
        with self._cond:
            self._rescan_now = True
            self._cond.notify()

    def _lane(self, key: Lane) -> LaneState:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = LaneState(key)
        return lane

    def _make_ready(self, lane: LaneState) -> None:
        if lane.running:
            lane.dirty = True
        elif not lane.queued and not lane.parked:
            lane.queued = True
            self._ready.append(lane)

    def _wake_at(self, lane: LaneState, at: float) -> None:
        if lane.wake_at is None or at < lane.wake_at:
            lane.wake_at = at
            self._counter += 1
            heapq.heappush(self._heap, (at, self._counter, lane))

    def _schedule_loop(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            if self._rescan_now or time.monotonic() >= next_scan:
                self._rescan_now = False
                next_scan = time.monotonic() + RESCAN
                self._rescan()
            with self._cond:
                now = self.clock()
                while self._heap and self._heap[0][0] <= now:
                    at, _, lane = heapq.heappop(self._heap)
                    if lane.wake_at == at:
                        lane.wake_at = None
                        self._make_ready(lane)
                while self._ready:
                    lane = self._ready.popleft()
                    lane.queued = False
                    self._dispatch(lane)
                if self._stop.is_set() or self._rescan_now:
                    continue
                wait = next_scan - time.monotonic()
                if self._heap:
                    wait = min(wait, self._heap[0][0] - self.clock())
                self._cond.wait(max(0.001, wait))

    def _dispatch(self, lane: LaneState) -> None:
        if lane.running:
            lane.dirty = True
            return
        lane.running = True
        self._work.put(lane)

    def _take_slot(self, lane: LaneState, endpoint: str) -> bool:
        """Hold one of the endpoint's slots, or park the lane until one frees (False)."""
        with self._cond:
            if self._active[endpoint] >= self.opts.per_endpoint:
                lane.parked = True
                self._parked.setdefault(endpoint, deque()).append(lane)
                return False
            self._active[endpoint] += 1
            lane.endpoint = endpoint
            return True

    def _rescan(self) -> None:
        try:
            lanes = self.store.pending_lanes()
            self._report_disables()
        except Exception as exc:  # noqa: BLE001 - the database may be briefly away; the next scan retries
            log.exception("outbound rescan failed")
            if isinstance(exc, psycopg.OperationalError):
                self.database_lost = True
            return
        now = self.clock()
        with self._cond:
            for sid, app, at in lanes:
                lane = self._lane((sid, app))
                if at <= now:
                    self._make_ready(lane)
                elif not lane.running:
                    self._wake_at(lane, at)
            # forget idle lanes with nothing in flight, so the map does not grow for ever
            pending = {(sid, app) for sid, app, _ in lanes}
            for key in [k for k, v in self._lanes.items() if k not in pending and not v.running and not v.queued
                        and not v.parked and not v.unflushed and v.wake_at is None]:
                del self._lanes[key]

    def _report_disables(self) -> None:
        self.on_disabled()

    # ------------------------------------------------------------------------------ sending

    def _work_loop(self) -> None:
        while True:
            lane = self._work.get()
            if lane is None or self._stop.is_set():
                return
            started = time.monotonic()
            try:
                result: Result = self._run_lane(lane, started)
            except Exception:  # noqa: BLE001 - e.g. the database is away: try the lane again later
                log.exception("outbound lane %s failed", lane.key)
                result = _Wait(self.clock() + 2.0)
            self._finished(lane, result)

    def _finished(self, lane: LaneState, result: Result) -> None:
        with self._cond:
            lane.running = False
            endpoint, lane.endpoint = lane.endpoint, None
            if endpoint is not None:
                self._active[endpoint] -= 1
                self._release(endpoint)
            if isinstance(result, _Wait):
                self._wake_at(lane, result.at)
            elif isinstance(result, _Yield):
                self._make_ready(lane)
            if lane.dirty and not lane.parked:
                lane.dirty = False
                self._make_ready(lane)
            self._cond.notify()

    def _release(self, endpoint: str) -> None:
        """A slot of ``endpoint`` freed: let as many parked lanes as there are free slots try again."""
        parked = self._parked.get(endpoint)
        free = self.opts.per_endpoint - self._active[endpoint]
        while parked and free > 0:
            waiting = parked.popleft()
            waiting.parked = False
            self._make_ready(waiting)
            free -= 1
        if parked is not None and not parked:
            del self._parked[endpoint]
        if not self._active[endpoint]:
            del self._active[endpoint]

    def _secrets(self, sub: SendingSubscription) -> list[str]:
        tokens = [sub.secret_encrypted]
        if sub.previous_secret_encrypted and sub.previous_secret_expires_at is not None \
                and sub.previous_secret_expires_at.timestamp() > self.clock():
            tokens.append(sub.previous_secret_encrypted)
        out = []
        for token in tokens:
            if token not in self._secret_cache:
                self._secret_cache[token] = self.decrypt(token)
            out.append(self._secret_cache[token])
        return out

    def _run_lane(self, lane: LaneState, started: float) -> Result:
        sid, app = lane.key
        sub = self.store.sending_subscription(sid)
        if sub is None or not sub.active:
            return IDLE
        if not self._take_slot(lane, endpoint_of(sub.url)):
            return PARKED
        try:
            secrets: list[str] | None = self._secrets(sub)
        except ValueError:
            secrets = None
        slice_end = started + SLICE
        while not self._stop.is_set():
            with self._cond:
                exclude = list(lane.unflushed)
            rows = self.store.next_pending(sid, app, exclude, BATCH)
            if not rows:
                return IDLE
            for row in rows:
                if row.next_attempt_at > self.clock():
                    return _Wait(row.next_attempt_at)
                outcome = self._attempt(lane, sub, secrets, row)
                if outcome is not None:
                    return outcome
                if self._stop.is_set() or self._disabled_at.get(sid, 0.0) >= started:
                    return IDLE
                if time.monotonic() > slice_end:
                    return YIELD
        return IDLE

    def _attempt(self, lane: LaneState, sub: SendingSubscription, secrets: list[str] | None,
                 row: Pending) -> Result | None:
        """One attempt; None when the lane may go on to its next delivery."""
        started = self.clock()
        if secrets is None:
            from outbound.transport import Response

            resp = Response(None, error="the subscription's secret cannot be decrypted with SHIPLINE_SECRET_KEY")
        else:
            headers = signing.headers(delivery_id=row.id, event=row.event_name, body=row.payload,
                                      secrets=secrets, timestamp=int(started))
            headers["X-Shipline-Event-Id"] = row.event_id
            resp = self.transport.post(sub.url, row.payload, headers, self.opts.timeout)
            self.sent += 1
        if resp.status is None and self._stop.is_set():
            return IDLE  # cut by shutdown: not an attempt the endpoint failed; it goes again after restart
        record = AttemptRecord(
            delivery_id=row.id, subscription_id=sub.id, round=row.round, attempt=row.attempts + 1,
            started_at=started, duration=resp.duration, status_code=resp.status, error=resp.error,
            response_body=resp.body.decode("utf-8", "replace") if resp.body else None,
        )
        if resp.ok:
            with self._cond:
                lane.unflushed.add(row.id)
            with self._wcond:
                self._successes.append((record, self.clock(), lane))
                if len(self._successes) >= 500:
                    self._wcond.notify()
            return None
        if record.error is None and resp.status is not None and 300 <= resp.status < 400:
            record = _with_error(record, f"redirect {resp.status} not followed")
        with self.store.pool.connection() as conn, conn.transaction():
            since = self.store.mark_failing(conn, sub.id, started)
            now = self.clock()
            decision = retry.decide(status=resp.status, retry_after=resp.headers.get("retry-after"),
                                    tries=row.tries + 1, failing_since=since, now=now, opts=self.opts, rng=self.rng)
            if isinstance(decision, retry.Retry):
                self.store.record_retry(conn, record, decision.at, decision.delay)
                return _Wait(decision.at)
            if isinstance(decision, retry.GaveUp):
                self.store.record_given_up(conn, record, "gave_up", decision.reason)
                return None
            assert isinstance(decision, retry.Disable)
            self.store.record_given_up(conn, record, "disabled", decision.reason)
            self.store.disable_subscription(conn, sub.id, decision.reason, ts(now), reported=False)
        log.warning("subscription %s disabled: %s", sub.id, decision.reason)
        self._disabled_at[sub.id] = time.monotonic()
        self.rescan_soon()
        return IDLE

    # ------------------------------------------------------------------------------ writing

    def _write_loop(self) -> None:
        while True:
            with self._wcond:
                if not self._successes and not self._stop.is_set():
                    self._wcond.wait(FLUSH_EVERY)
                items, self._successes = self._successes, []
            if items:
                try:
                    self.store.record_successes([(a, done) for a, done, _ in items])
                except Exception:  # noqa: BLE001 - keep them; lanes will not resend while unflushed
                    log.exception("could not record %d successful deliveries; retrying", len(items))
                    with self._wcond:
                        self._successes[:0] = items
                    if self._stop.wait(0.5) and not self._workers_alive():
                        return
                    continue
                with self._cond:
                    for a, _, lane in items:
                        lane.unflushed.discard(a.delivery_id)
                continue
            if self._stop.is_set() and not self._workers_alive():
                return

    def _workers_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads if t.name.startswith("outbound-send"))


def _with_error(record: AttemptRecord, error: str) -> AttemptRecord:
    import dataclasses

    return dataclasses.replace(record, error=error)
