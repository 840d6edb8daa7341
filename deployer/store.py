"""The deployer's small local state: what runs for each app, rollouts in flight, finished commands.

An SQLite file under ``<data_dir>/deployer/state.db`` (WAL, so several deployer processes on one
machine can share it). It answers three questions after a crash:

* ``releases``: which revision of each app is serving, on which instances (the last good one);
* ``rollouts``: which rollout was in flight and how far it got (``starting`` -> ``shifting`` ->
  ``draining``), with the old and new instances, so a restart can finish or undo it;
* ``completed``: which commands are done and the reports they produced, so a command delivered
  again is answered with the same reports instead of being carried out twice.

Plus ``images`` (what each build produced, for retention and rollback) and ``jobs``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    app_id INTEGER PRIMARY KEY,
    revision INTEGER NOT NULL,
    image TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    strategy TEXT NOT NULL,
    instances TEXT NOT NULL,
    app TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    app_id INTEGER PRIMARY KEY,
    command_id TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    image TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    strategy TEXT NOT NULL,
    phase TEXT NOT NULL,
    new_instances TEXT NOT NULL,
    old_instances TEXT NOT NULL,
    app TEXT NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS completed (
    command_id TEXT PRIMARY KEY,
    app_id INTEGER NOT NULL,
    type TEXT NOT NULL,
    reports TEXT NOT NULL,
    completed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    app_id INTEGER NOT NULL,
    build INTEGER NOT NULL,
    tag TEXT NOT NULL,
    image_id TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (app_id, tag)
);
"""


@dataclass
class Instance:
    """One running copy of a release: a container or a process, listening on ``port``."""

    id: str  # container name, or the process instance name
    kind: str  # docker | process
    port: int
    revision: int
    image: str
    pid: int = 0  # process strategy: session leader pid
    starttime: int = 0  # process strategy: /proc start time, guards against pid reuse
    slot: str = ""  # proxy server slot while it takes traffic

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Instance:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _dump(instances: list[Instance]) -> str:
    return json.dumps([asdict(i) for i in instances])


def _load(text: str) -> list[Instance]:
    return [Instance.from_dict(d) for d in json.loads(text or "[]")]


@dataclass
class Release:
    app_id: int
    revision: int
    image: str
    commit: str
    strategy: str
    instances: list[Instance]
    app: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    app_id: int
    command_id: str
    correlation_id: str
    revision: int
    image: str
    commit: str
    strategy: str
    phase: str  # starting | shifting | draining
    new: list[Instance]
    old: list[Instance]
    app: dict[str, Any]
    started_at: float


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._local = threading.local()
        self._conn().executescript(SCHEMA)  # executescript manages its own transaction

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ------------------------------------------------------------------------------ releases

    def release(self, app_id: int) -> Release | None:
        row = self._conn().execute(
            "SELECT app_id, revision, image, commit_sha, strategy, instances, app FROM releases WHERE app_id = ?",
            (app_id,),
        ).fetchone()
        if row is None:
            return None
        return Release(row[0], row[1], row[2], row[3], row[4], _load(row[5]), json.loads(row[6]))

    def releases(self) -> list[Release]:
        ids = [r[0] for r in self._conn().execute("SELECT app_id FROM releases ORDER BY app_id")]
        return [r for r in (self.release(i) for i in ids) if r is not None]

    def set_release(self, rel: Release, conn: sqlite3.Connection | None = None) -> None:
        sql = (
            "INSERT INTO releases (app_id, revision, image, commit_sha, strategy, instances, app, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (app_id) DO UPDATE SET revision = excluded.revision, "
            "image = excluded.image, commit_sha = excluded.commit_sha, strategy = excluded.strategy, "
            "instances = excluded.instances, app = excluded.app, updated_at = excluded.updated_at"
        )
        args = (rel.app_id, rel.revision, rel.image, rel.commit, rel.strategy, _dump(rel.instances),
                json.dumps(rel.app), time.time())
        if conn is not None:
            conn.execute(sql, args)
        else:
            with self._tx() as db:
                db.execute(sql, args)

    # ------------------------------------------------------------------------------ rollouts

    def rollout(self, app_id: int) -> Rollout | None:
        row = self._conn().execute(
            "SELECT app_id, command_id, correlation_id, revision, image, commit_sha, strategy, phase, "
            "new_instances, old_instances, app, started_at FROM rollouts WHERE app_id = ?",
            (app_id,),
        ).fetchone()
        if row is None:
            return None
        return Rollout(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], _load(row[8]),
                       _load(row[9]), json.loads(row[10]), row[11])

    def rollouts(self) -> list[Rollout]:
        ids = [r[0] for r in self._conn().execute("SELECT app_id FROM rollouts ORDER BY app_id")]
        return [r for r in (self.rollout(i) for i in ids) if r is not None]

    def save_rollout(self, r: Rollout) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO rollouts (app_id, command_id, correlation_id, revision, image, commit_sha, strategy, "
                "phase, new_instances, old_instances, app, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (app_id) DO UPDATE SET command_id = excluded.command_id, "
                "correlation_id = excluded.correlation_id, revision = excluded.revision, image = excluded.image, "
                "commit_sha = excluded.commit_sha, strategy = excluded.strategy, phase = excluded.phase, "
                "new_instances = excluded.new_instances, old_instances = excluded.old_instances, app = excluded.app, "
                "started_at = excluded.started_at",
                (r.app_id, r.command_id, r.correlation_id, r.revision, r.image, r.commit, r.strategy, r.phase,
                 _dump(r.new), _dump(r.old), json.dumps(r.app), r.started_at),
            )

    def switch_release(self, r: Rollout, release: Release) -> None:
        """The point of no return: the new release becomes current, the rollout goes on to drain the old."""
        with self._tx() as db:
            self.set_release(release, conn=db)
            db.execute("UPDATE rollouts SET phase = 'draining', new_instances = ?, old_instances = ? "
                       "WHERE app_id = ?", (_dump(r.new), _dump(r.old), r.app_id))
        r.phase = "draining"

    def drop_rollout(self, app_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM rollouts WHERE app_id = ?", (app_id,))

    # ----------------------------------------------------------------------------- completed

    def completed(self, command_id: str) -> list[bytes] | None:
        row = self._conn().execute("SELECT reports FROM completed WHERE command_id = ?", (command_id,)).fetchone()
        if row is None:
            return None
        return [r.encode() for r in json.loads(row[0])]

    def complete(self, command_id: str, app_id: int, type_name: str, reports: list[bytes],
                 drop_rollout: bool = False, forget_app: bool = False) -> None:
        """Record a command as done with its encoded reports, in the same transaction ending its
        rollout (``drop_rollout``) or forgetting the app's release and rollout (``forget_app``: the
        app was retired, so reconciliation must not bring it back)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO completed (command_id, app_id, type, reports, completed_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (command_id) DO NOTHING",
                (command_id, app_id, type_name, json.dumps([r.decode() for r in reports]), time.time()),
            )
            if drop_rollout or forget_app:
                db.execute("DELETE FROM rollouts WHERE app_id = ?", (app_id,))
            if forget_app:
                db.execute("DELETE FROM releases WHERE app_id = ?", (app_id,))
            # keep the table small: the last 5000 commands are plenty to answer redeliveries
            db.execute("DELETE FROM completed WHERE command_id IN (SELECT command_id FROM completed "
                       "ORDER BY completed_at DESC LIMIT -1 OFFSET 5000)")

    # -------------------------------------------------------------------------------- images

    def add_image(self, app_id: int, build: int, tag: str, image_id: str, commit: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO images (app_id, build, tag, image_id, commit_sha, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (app_id, tag) DO UPDATE SET image_id = excluded.image_id, build = excluded.build",
                (app_id, build, tag, image_id, commit, time.time()),
            )

    def images(self, app_id: int) -> list[tuple[int, str, str, str]]:
        """(build, tag, image id, commit), newest build first."""
        return [tuple(r) for r in self._conn().execute(  # type: ignore[misc]
            "SELECT build, tag, image_id, commit_sha FROM images WHERE app_id = ? ORDER BY build DESC, created_at DESC",
            (app_id,),
        )]

    def apps_with_image(self, tag: str) -> set[int]:
        """The apps that recorded ``tag`` (several only for tags from before app ids were in them)."""
        return {r[0] for r in self._conn().execute("SELECT app_id FROM images WHERE tag = ?", (tag,))}

    def forget_image(self, app_id: int, tag: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM images WHERE app_id = ? AND tag = ?", (app_id, tag))
