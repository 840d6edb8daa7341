"""What every ingress process on this host must agree on at once, without a database round trip.

One SQLite file per ingress schema under ``<SHIPLINE_DATA_DIR>/ingress/``, shared by the gunicorn
workers (WAL mode: readers never wait for the writer), holds two things:

- the **delivery ids accepted** here (per app, with the day accepted), written before the 2xx
  answer, so a redelivery reaching any worker answers 200 ``{"duplicate": true}``;
- a **credentials generation**, bumped after every committed credentials change, so every worker
  reloads its snapshot of apps, hooks and tokens before its next request (a deleted deploy hook
  is refused on the very next request, whichever worker serves it). It lives beside the SQLite
  file, in an 8-byte file every process maps shared (``Generation``): every request reads it, and
  a read of mapped memory is a load, where a SQLite read is a call that gives up the GIL (with 16
  threads contending for it, each such hand-off costs far more than the read).

Measured (bench.ingress): one PostgreSQL round trip per request halved the ingress's throughput
on this 2-core machine; these lookups cost a few microseconds in-process. PostgreSQL stays the
durable record (``seen_deliveries`` is written in batches by ``ingress.notes``) and the file is
only a cache: when it is new, or was filled for another store, it is filled from PostgreSQL
(``fill``), and it can be deleted while the ingress is stopped. ``synchronous=NORMAL`` in WAL
mode loses nothing when a process dies, only the last commits on power loss; a delivery id lost
that way is published again and streams, which remembers each app's recent deliveries, records
it as a duplicate.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from shipline.config import Settings

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    app_id INTEGER NOT NULL,
    delivery_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    PRIMARY KEY (app_id, delivery_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_by_day ON seen (day);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID;
"""
BUSY_MS = 10_000  # a writer holds the file's lock for microseconds; this only bounds a stuck one
FILL_WAIT_MS = 600_000  # a worker starting while another fills the index from millions of rows


def today(at: float | None = None) -> int:
    """Days since the epoch (UTC): the granularity of the dedupe window."""
    return int((time.time() if at is None else at) // 86_400)


class GenerationUnavailable(RuntimeError):
    """The host's generation file cannot be mapped or locked (like a ``sqlite3.Error``: answered 503)."""


class Generation:
    """A counter shared by every process on the host through one mapped 8-byte file.

    ``value()`` reads the mapping (no system call); ``bump()`` increments it under an exclusive
    ``flock``, so concurrent bumps from several processes never lose one. A reader that races a
    bump sees the old or the new value (the 8-byte store is aligned), and a value it has not seen
    before only makes it reload, so even a torn read would cost a reload, never a missed change.
    The mapping is made on first use and again in a forked child.
    """

    SIZE = 8

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._map: mmap.mmap | None = None
        self._pid = -1

    def _mapped(self) -> mmap.mmap:
        mapping = self._map
        if mapping is not None and self._pid == os.getpid():
            return mapping
        try:
            return self._map_file()
        except OSError as exc:
            raise GenerationUnavailable(f"{self.path}: {exc.strerror or exc}") from exc

    def _map_file(self) -> mmap.mmap:
        with self._lock:
            if self._map is None or self._pid != os.getpid():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    if os.fstat(fd).st_size < self.SIZE:
                        os.ftruncate(fd, self.SIZE)  # zero-filled: generation 0
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    self._map = mmap.mmap(fd, self.SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd)  # the mapping keeps the file
                self._pid = os.getpid()
            return self._map

    def value(self) -> int:
        return int(struct.unpack_from("<Q", self._mapped())[0])

    def bump(self) -> None:
        mapping = self._mapped()
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise GenerationUnavailable(f"{self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                struct.pack_into("<Q", mapping, 0, struct.unpack_from("<Q", mapping)[0] + 1)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class LocalIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._generation = Generation(path.with_name(path.name + ".generation"))

    @classmethod
    def of(cls, settings: Settings) -> LocalIndex:
        """The host's index of the settings' ingress schema."""
        return cls(settings.data_dir / "ingress" / f"index-{settings.schema('ingress')}.sqlite3")

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use and again in a forked child."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(SCHEMA)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    # ------------------------------------------------------------------ credentials generation

    def generation(self) -> int:
        return self._generation.value()

    def bump(self) -> None:
        """Tell every process on this host that the credentials changed (call after the commit)."""
        self._generation.bump()

    # ----------------------------------------------------------------------- accepted deliveries

    def seen(self, app_ids: list[int], delivery_id: str, since_day: int) -> set[int]:
        """Those of ``app_ids`` that accepted ``delivery_id`` on ``since_day`` or later."""
        if len(app_ids) == 1:
            row = self._conn().execute(
                "SELECT 1 FROM seen WHERE app_id = ? AND delivery_id = ? AND day >= ?",
                (app_ids[0], delivery_id, since_day),
            ).fetchone()
            return set(app_ids) if row else set()
        marks = ",".join("?" * len(app_ids))
        rows = self._conn().execute(
            f"SELECT app_id FROM seen WHERE app_id IN ({marks}) AND delivery_id = ? AND day >= ?",
            (*app_ids, delivery_id, since_day),
        ).fetchall()
        return {int(r[0]) for r in rows}

    def add(self, app_ids: list[int], delivery_id: str, day: int) -> None:
        self._conn().executemany(
            "INSERT INTO seen VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET day = excluded.day",
            [(app_id, delivery_id, day) for app_id in app_ids],
        )

    def prune(self, before_day: int) -> int:
        return self._conn().execute("DELETE FROM seen WHERE day < ?", (before_day,)).rowcount

    def fill(self, store: str, rows: Iterable[tuple[int, str, int]]) -> int:
        """Fill the index from the accepted deliveries of ``store`` (its identity in PostgreSQL), once:
        the first process to take the write lock loads them, the others find the mark and skip. An
        index filled for another store (the schema was dropped and made again, so app ids start
        at 1 again) is emptied first: its ids would turn new deliveries into false duplicates.
        Returns how many rows were loaded."""
        conn = self._conn()
        conn.execute(f"PRAGMA busy_timeout = {FILL_WAIT_MS}")  # another worker may be filling it
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'store'").fetchone()
            if row is not None and row[0] == store:
                conn.execute("COMMIT")
                return 0
            conn.execute("DELETE FROM seen")
            loaded = 0
            batch: list[tuple[int, str, int]] = []
            for item in rows:
                batch.append(item)
                if len(batch) >= 10_000:
                    conn.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", batch)
                    loaded, batch = loaded + len(batch), []
            conn.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", batch)
            loaded += len(batch)
            conn.execute("INSERT INTO meta VALUES ('store', ?) ON CONFLICT DO UPDATE SET value = excluded.value",
                         (store,))
            conn.execute("COMMIT")
            return loaded
        except BaseException:
            conn.execute("ROLLBACK")
            raise
