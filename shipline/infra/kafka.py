"""A real Apache Kafka broker (KRaft, combined broker+controller) started by our own code.

No docker, no manual steps: the broker's jars come from Maven Central through ``mvn`` into the
project cache (``fetch_jars``), the storage is formatted once with a cluster id kept in the data
dir, and ``java ... kafka.Kafka server.properties`` runs with a log4j2 config of ours that writes
to ``<data>/kafka.log`` (nothing on the terminal).

Why Kafka 4.0.x (and not 4.1): faust-streaming 0.15 / aiokafka 0.14 and our confluent-kafka
client are tested against 4.0 brokers; 4.0 is the first ZooKeeper-free line (KRaft only), and
``KAFKA_VERSION`` is the newest 4.0 patch on Maven Central. The broker/controller heartbeat and
session timeouts are deliberately left at Kafka's defaults: a shortened lease fenced the broker
under CPU load in an earlier attempt. The price: on 4.0 a restarted single combined node waits out
``broker.session.timeout.ms`` (9 s) before its new incarnation may register (KAFKA-19130, fixed
in 4.1), so a restart takes ~12 s against ~3 s for a first start.

Usage::

    broker = LocalKafka(Path(".shipline/kafka"), Path(".shipline/cache"), port=9092)
    broker.start()            # or, for a supervisor: broker.prepare(); spawn broker.command()
    print(broker.bootstrap)   # "127.0.0.1:9092"
    broker.stop()

A broker started by ``start()`` runs in its own session and outlives the Python process unless
``stop()`` is called (or ``stop_at_exit=True``); a later ``start()`` on the same data dir takes it
over (pid file), and one on a port where some other Kafka already answers just uses that broker.

``python -m shipline.infra.kafka --data-dir D --cache-dir C --port P`` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any
from xml.sax.saxutils import quoteattr

from shipline.infra.files import file_lock, pid_alive

KAFKA_VERSION = "4.0.2"
SCALA_VERSION = "2.13"
LOG4J_VERSION = "2.24.3"  # the log4j2 line Kafka 4.0 ships with (slf4j 1.7 binding: log4j-slf4j-impl)
DEPENDENCY_PLUGIN_VERSION = "3.8.1"

KAFKA_MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_MAIN_CLASS = "kafka.tools.StorageTool"

HOST = "127.0.0.1"
NODE_ID = 1

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(__name__ + ".rdkafka")

_MARKER = ".fetched"
_HEAP_RE = re.compile(r"^\d+[kKmMgG]?$")

_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.shipline</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{scala}</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>{plugin}</version>
      </plugin>
    </plugins>
  </build>
</project>
"""


# --------------------------------------------------------------------------- jars


def _fetched(home: Path, libs: Path) -> bool:
    marker = home / _MARKER
    if not marker.is_file():
        return False
    jars = [line.strip() for line in marker.read_text().splitlines() if line.strip()]
    return bool(jars) and all((libs / jar).is_file() for jar in jars)


def fetch_jars(cache_dir: Path, version: str = KAFKA_VERSION) -> Path:
    """Download the broker's runtime jars into ``<cache>/kafka-<version>/libs`` and return that dir.

    Idempotent: once the marker file lists jars that are all present, no network and no mvn.
    The Maven repository used is ``<cache>/m2`` so everything stays under the cache folder.
    Safe to call from several processes at once (file lock).
    """
    cache_dir = Path(cache_dir).resolve()
    home = cache_dir / f"kafka-{version}"
    libs = home / "libs"
    if _fetched(home, libs):
        return libs
    with file_lock(cache_dir / f"kafka-{version}.lock"):
        if _fetched(home, libs):
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise RuntimeError(
                "Maven ('mvn') is needed to fetch the Kafka jars from Maven Central; "
                "install it (e.g. apt-get install maven)"
            )
        home.mkdir(parents=True, exist_ok=True)
        pom = home / "pom.xml"
        pom.write_text(
            _POM.format(version=version, scala=SCALA_VERSION, log4j=LOG4J_VERSION, plugin=DEPENDENCY_PLUGIN_VERSION)
        )
        staging = home / "libs.partial"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            f"-Dmaven.repo.local={cache_dir / 'm2'}",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        log.info("fetching Kafka %s jars with maven into %s", version, libs)
        proc = subprocess.run(cmd, cwd=home, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"mvn failed ({proc.returncode}) fetching Kafka {version}:\n{tail}")
        jars = sorted(p.name for p in staging.glob("*.jar"))
        if f"kafka_{SCALA_VERSION}-{version}.jar" not in jars:
            raise RuntimeError(f"mvn did not produce kafka_{SCALA_VERSION}-{version}.jar in {staging}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.rename(libs)
        (home / _MARKER).write_text("\n".join(jars) + "\n")
        return libs


# --------------------------------------------------------------------------- probes


def _port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _kafka_answers(bootstrap: str, timeout: float) -> bool:
    """True if a Kafka broker at ``bootstrap`` answers a metadata request within ``timeout`` s."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "logger": _rdkafka_log,  # keep librdkafka's connection errors off stderr
        "socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000)),
    }
    admin = AdminClient(config)
    try:
        md = admin.list_topics(timeout=max(timeout, 0.1))
    except KafkaException:
        return False
    return bool(md.brokers)


def _new_cluster_id() -> str:
    # Same shape as Kafka's Uuid.randomUuid().toString(): url-safe base64, no padding, no leading '-'.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _props_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _tail(path: Path, n: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


# --------------------------------------------------------------------------- broker


class LocalKafka:
    """One KRaft node (``process.roles=broker,controller``) whose state lives under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        cache_dir: Path,
        port: int = 9092,
        controller_port: int | None = None,
        heap: str = "512m",
        version: str = KAFKA_VERSION,
        *,
        probe_timeout: float = 10.0,
        stop_at_exit: bool = False,
    ) -> None:
        if not _HEAP_RE.match(heap):
            raise ValueError(f"heap must look like 512m / 1g, got {heap!r}")
        self.data_dir = Path(data_dir).resolve()
        self.cache_dir = Path(cache_dir).resolve()
        self.port = int(port)
        self.controller_port = int(controller_port) if controller_port is not None else self.port + 1
        if not (0 < self.port < 65536 and 0 < self.controller_port < 65536):
            raise ValueError(f"bad ports {self.port}/{self.controller_port}")
        if self.port == self.controller_port:
            raise ValueError("port and controller_port must differ")
        self.heap = heap
        self.version = version
        self.probe_timeout = probe_timeout  # how long an occupied port gets to prove it is Kafka
        self._proc: subprocess.Popen[bytes] | None = None
        self._orphan_pid: int | None = None  # a broker of this data dir left by an earlier process
        self._adopted = False  # someone else's broker already answers on our port
        self.stop_at_exit = stop_at_exit  # else a started broker outlives this Python process
        self._atexit_registered = False

    # ---- paths ---------------------------------------------------------------
    @property
    def libs_dir(self) -> Path:
        return self.cache_dir / f"kafka-{self.version}" / "libs"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log4j_path(self) -> Path:
        return self.data_dir / "log4j2.xml"

    @property
    def log_path(self) -> Path:
        """Kafka's own log (log4j2, WARN and up)."""
        return self.data_dir / "kafka.log"

    @property
    def out_path(self) -> Path:
        """The JVM's stdout/stderr when started by ``start()``."""
        return self.data_dir / "kafka.out"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "kafka.pid"

    @property
    def cluster_id_path(self) -> Path:
        return self.data_dir / "cluster.id"

    # ---- public info ---------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The JVM's pid if this object runs (or took over) the broker of its data dir."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        if self._orphan_pid is not None and pid_alive(self._orphan_pid):
            return self._orphan_pid
        return None

    @property
    def adopted(self) -> bool:
        """True when ``start()`` found another broker already answering on the port."""
        return self._adopted

    def is_running(self) -> bool:
        if self.pid is not None:
            return True
        if self._adopted:
            return _port_open(self.port)
        return False

    # ---- preparation -----------------------------------------------------------
    def cluster_id(self) -> str:
        """The cluster id kept in the data dir (created on first use)."""
        if self.cluster_id_path.is_file():
            cid = self.cluster_id_path.read_text().strip()
            if cid:
                return cid
        cid = self._formatted_cluster_id() or _new_cluster_id()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.cluster_id_path.write_text(cid + "\n")
        return cid

    def _formatted_cluster_id(self) -> str | None:
        meta = self.log_dir / "meta.properties"
        if not meta.is_file():
            return None
        for line in meta.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return None

    def server_properties(self) -> str:
        props = {
            "process.roles": "broker,controller",
            "node.id": str(NODE_ID),
            "controller.quorum.voters": f"{NODE_ID}@{HOST}:{self.controller_port}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": _props_escape(str(self.log_dir)),
            "auto.create.topics.enable": "false",
            "num.partitions": "6",
            "default.replication.factor": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # broker.heartbeat.interval.ms / broker.session.timeout.ms: Kafka defaults, on purpose.
        }
        lines = ["# Written by shipline.infra.kafka; regenerated on every start.\n"]
        lines += [f"{k}={v}\n" for k, v in props.items()]
        return "".join(lines)

    def log4j_config(self) -> str:
        log_file = str(self.log_path)
        return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by shipline.infra.kafka. -->
<Configuration status="WARN">
  <Appenders>
    <RollingFile name="file" fileName={quoteattr(log_file)} filePattern={quoteattr(log_file + ".%i")}>
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""

    def _java(self) -> str:
        java_home = os.environ.get("JAVA_HOME")
        if java_home and (Path(java_home) / "bin" / "java").is_file():
            return str(Path(java_home) / "bin" / "java")
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("Java 17+ is needed to run Kafka; install a JRE (e.g. openjdk-17-jre-headless)")
        return java

    def _java_cmd(self, *jvm_opts: str) -> list[str]:
        return [
            self._java(),
            *jvm_opts,
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            # log4j's own hook would stop logging halfway through Kafka's shutdown hook.
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-Djava.awt.headless=true",
            "-cp",
            f"{self.libs_dir}/*",
        ]

    def _format_storage(self) -> None:
        if (self.log_dir / "meta.properties").is_file():
            return
        cmd = [
            *self._java_cmd(),
            STORAGE_TOOL_MAIN_CLASS,
            "format",
            "--cluster-id",
            self.cluster_id(),
            "--config",
            str(self.config_path),
        ]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"formatting KRaft storage in {self.log_dir} failed:\n{proc.stdout}{proc.stderr}")

    def prepare(self) -> None:
        """Fetch the jars, write the configs and format the storage (once). No process is started."""
        fetch_jars(self.cache_dir, self.version)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.server_properties())
        self.log4j_path.write_text(self.log4j_config())
        self.cluster_id()
        self._format_storage()

    def command(self) -> list[str]:
        """The broker's java command line (call ``prepare()`` first). Runs in the foreground."""
        return [
            *self._java_cmd(
                f"-Xmx{self.heap}",
                f"-Xms{self.heap}",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:InitiatingHeapOccupancyPercent=35",
                "-XX:+ExplicitGCInvokesConcurrent",
                "-XX:+ExitOnOutOfMemoryError",
            ),
            KAFKA_MAIN_CLASS,
            str(self.config_path),
        ]

    # ---- lifecycle -----------------------------------------------------------
    def _our_orphan(self) -> int | None:
        """A live broker started earlier on this data dir (pid file + matching command line)."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        if KAFKA_MAIN_CLASS.encode() in cmdline and str(self.config_path).encode() in cmdline:
            return pid
        return None

    def _orphan_listens_here(self) -> bool:
        """Does the config that broker runs with (same file, rewritten on every start) name our port?"""
        try:
            running = self.config_path.read_text()
        except OSError:
            return False
        return f"PLAINTEXT://{HOST}:{self.port}," in running

    def start(self, timeout: float = 120) -> None:
        """Start the broker (or take over one that already answers on the port) and wait for it."""
        if self._proc is not None and self._proc.poll() is None:
            self.wait_ready(timeout)
            return
        deadline = time.monotonic() + timeout
        orphan = self._our_orphan()
        if orphan is not None:
            # Left running by an earlier process on this data dir (e.g. a previous test session).
            if self._orphan_listens_here():
                self._orphan_pid, self._adopted = orphan, False
                log.info("taking over Kafka pid %s on %s", orphan, self.bootstrap)
                self.wait_ready(timeout)
                return
            raise RuntimeError(
                f"a Kafka broker (pid {orphan}) still runs on data dir {self.data_dir} with other "
                f"ports than {self.bootstrap}; stop it first"
            )
        if _port_open(self.port):
            if _kafka_answers(self.bootstrap, min(self.probe_timeout, timeout)):
                self._adopted = True
                log.info("Kafka already answers on %s; not starting another", self.bootstrap)
                return
            raise RuntimeError(
                f"{self.bootstrap} is in use by something that does not answer as a Kafka broker; "
                f"free the port or pick another (LocalKafka(port=...))"
            )
        if _port_open(self.controller_port):
            raise RuntimeError(
                f"controller port {HOST}:{self.controller_port} is already in use; pass another controller_port"
            )
        self.prepare()
        with open(self.out_path, "ab") as out:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # a Ctrl-C in the terminal must not kill it under our feet
            )
        self._adopted = False
        self._orphan_pid = None
        self.pid_path.write_text(f"{self._proc.pid}\n")
        if self.stop_at_exit and not self._atexit_registered:
            atexit.register(self._stop_at_exit)
            self._atexit_registered = True
        try:
            self.wait_ready(max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 120) -> None:
        """Block until the broker answers a metadata request; raise if it dies or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self._orphan_pid is not None and not pid_alive(self._orphan_pid):
                raise RuntimeError(f"Kafka pid {self._orphan_pid} exited.\n{_tail(self.log_path)}")
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"Kafka exited with code {self._proc.returncode} during start-up.\n"
                    f"--- {self.out_path}:\n{_tail(self.out_path)}\n--- {self.log_path}:\n{_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"Kafka on {self.bootstrap} not ready after {timeout:.0f}s.\n"
                    f"--- {self.log_path}:\n{_tail(self.log_path)}"
                )
            if _port_open(self.port) and _kafka_answers(self.bootstrap, min(5.0, max(remaining, 0.5))):
                return
            time.sleep(0.25)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (controlled shutdown), then SIGKILL after ``timeout`` s. A broker that was
        merely found on the port (``adopted``) is left alone."""
        if self._proc is not None:
            proc, self._proc = self._proc, None
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("Kafka pid %s ignored SIGTERM for %ss; killing it", proc.pid, timeout)
                    proc.kill()
                    proc.wait()
        elif self._orphan_pid is not None:
            pid, self._orphan_pid = self._orphan_pid, None
            self._signal_and_wait(pid, timeout)
        else:
            self._adopted = False
            return
        self._adopted = False
        with contextlib.suppress(OSError):
            self.pid_path.unlink()

    @staticmethod
    def _signal_and_wait(pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while pid_alive(pid):
                time.sleep(0.05)

    def _stop_at_exit(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self.stop()

    def run_foreground(self) -> int:
        """Prepare, run the broker attached to this process's stdout/stderr, forward SIGTERM/SIGINT
        to it, and return its exit code once it exits. For supervisors."""
        self.prepare()
        proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, cwd=self.data_dir)
        self.pid_path.write_text(f"{proc.pid}\n")

        def forward(signum: int, _frame: FrameType | None) -> None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not the main thread: no forwarding
                previous[sig] = signal.signal(sig, forward)
        try:
            return proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            with contextlib.suppress(OSError):
                self.pid_path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Kafka broker (KRaft) in the foreground.")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--controller-port", type=int, default=None)
    parser.add_argument("--heap", default="512m")
    parser.add_argument("--version", default=KAFKA_VERSION)
    args = parser.parse_args(argv)
    broker = LocalKafka(args.data_dir, args.cache_dir, args.port, args.controller_port, args.heap, args.version)
    return broker.run_foreground()


if __name__ == "__main__":
    sys.exit(main())
