"""A Docker engine for Shipline: found, or started by our own code, and a registry-free base image.

``ensure_engine`` picks the first engine that answers:

1. ``DOCKER_HOST`` (``docker_host`` argument) when set: an external engine, nothing is started;
2. the default socket ``/var/run/docker.sock``;
3. otherwise, when we are root and ``dockerd`` is installed, it starts one in the background::

       dockerd -H unix:///var/run/docker.sock --storage-driver=vfs --iptables=false
               --ip-masq=false --bridge=none --data-root /var/lib/shipline-docker
               --exec-root /run/shipline-docker --pidfile /run/shipline-docker/dockerd.pid

   ``vfs`` works on any filesystem (including overlay roots, where overlay-on-overlay fails);
   no bridge and no iptables rules: every Shipline container uses host networking and all
   traffic stays on 127.0.0.1. The exec root is short because containerd's socket lives in it
   and unix socket paths are limited to 107 bytes. The engine is a daemon of the machine, not of
   one process: it keeps running after the caller exits and the next caller finds it on the
   default socket. So its data root and log (``/var/lib/shipline-docker``, ``dockerd.log`` in it)
   belong to the machine too, never to the caller's data folder: a stack or test run that started
   the engine and then removed its own folder would otherwise pull the image store out from under
   the engine every later caller shares (CI failed exactly so: "failed to write digest data").

No image registry is reachable, so ``ensure_base_image`` makes the base image test apps and
generated static-site Dockerfiles build ``FROM``: a ``docker import`` of a root filesystem made of
the host's statically linked ``/bin/busybox`` (Debian's ``busybox-static``) and its applet links
(``sh``, ``httpd``, ``wget``, ``echo``, ``cat``, ``sleep`` ...).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

from shipline.infra.files import file_lock

log = logging.getLogger(__name__)

__all__ = [
    "BASE_IMAGE",
    "DEFAULT_SOCKET",
    "EngineUnavailable",
    "ensure_base_image",
    "ensure_engine",
    "engine_client",
    "engine_running",
    "stop_engine",
]

DEFAULT_SOCKET = "/var/run/docker.sock"
EXEC_ROOT = Path("/run/shipline-docker")
ENGINE_ROOT = Path("/var/lib/shipline-docker")
BASE_IMAGE = "shipline/busybox:latest"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class EngineUnavailable(RuntimeError):
    """No Docker engine answers and none could be started here."""


def engine_client(base_url: str, timeout: float = 120) -> docker.DockerClient:
    return docker.DockerClient(base_url=base_url, timeout=int(timeout))


def _answers(base_url: str, client_timeout: float = 120) -> docker.DockerClient | None:
    try:
        client = engine_client(base_url, client_timeout)
        client.ping()
        return client
    except (DockerException, OSError):
        return None
    except Exception:  # noqa: BLE001 - requests raises assorted errors for a dead socket
        return None


def engine_running(docker_host: str = "") -> bool:
    """Whether an engine answers (on ``docker_host``, else the default socket) without starting one."""
    return _answers(docker_host or f"unix://{DEFAULT_SOCKET}") is not None


def dockerd_command(data_root: Path = ENGINE_ROOT, socket: str = DEFAULT_SOCKET) -> list[str]:
    dockerd = shutil.which("dockerd") or "dockerd"
    return [
        dockerd,
        "-H", f"unix://{socket}",
        "--storage-driver=vfs",
        "--iptables=false",
        "--ip-masq=false",
        "--ip6tables=false",
        "--bridge=none",
        "--data-root", str(data_root),
        "--exec-root", str(EXEC_ROOT),
        "--pidfile", str(EXEC_ROOT / "dockerd.pid"),
    ]


def ensure_engine(
    docker_host: str = "", timeout: float = 60, client_timeout: float = 120
) -> docker.DockerClient:
    """A client of a Docker engine that answers, starting a local ``dockerd`` when needed.

    ``timeout`` bounds the wait for a started engine; ``client_timeout`` is the client's HTTP read
    timeout (builds stream for long silent stretches: give them more).
    """
    if docker_host:
        client = _answers(docker_host, client_timeout)
        if client is None:
            raise EngineUnavailable(f"DOCKER_HOST={docker_host} does not answer")
        return client
    url = f"unix://{DEFAULT_SOCKET}"
    client = _answers(url, client_timeout)
    if client is not None:
        return client
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise EngineUnavailable(
            f"no Docker engine answers on {DEFAULT_SOCKET} and dockerd cannot be started here "
            "(needs root and the docker.io package)"
        )
    with file_lock(Path("/run/shipline-dockerd.lock")):
        client = _answers(url, client_timeout)  # someone else may have started it while we waited
        if client is not None:
            return client
        EXEC_ROOT.mkdir(parents=True, exist_ok=True)
        ENGINE_ROOT.mkdir(parents=True, exist_ok=True)
        logfile = ENGINE_ROOT / "dockerd.log"
        cmd = dockerd_command()
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a daemon of the machine: survives its starter
                close_fds=True,
            )
        log.info("started dockerd (pid %s), log %s", proc.pid, logfile)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            client = _answers(url, client_timeout)
            if client is not None:
                return client
            if proc.poll() is not None:
                tail = logfile.read_text(errors="replace")[-2000:]
                raise EngineUnavailable(f"dockerd exited with {proc.returncode}:\n{tail}")
            time.sleep(0.25)
        raise EngineUnavailable(f"dockerd did not answer within {timeout}s (log: {logfile})")


def stop_engine(timeout: float = 30) -> bool:
    """Stop a dockerd this module started (found by its pidfile); True when one was stopped."""
    pidfile = EXEC_ROOT / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.kill(pid, 9)
    return True


# ------------------------------------------------------------------------------- base image


def _busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.exists():
            out = subprocess.run(["file", "-L", str(path)], capture_output=True, text=True).stdout
            if "dynamically linked" not in out:
                return path
    raise EngineUnavailable("no statically linked busybox found (apt-get install busybox-static)")


def _applets(busybox: Path) -> list[str]:
    """Applet paths relative to / (``bin/sh``, ``usr/bin/wget`` ...)."""
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    return sorted({line.strip().lstrip("/") for line in out.splitlines() if line.strip()})


def rootfs_tar(busybox: Path | None = None) -> bytes:
    """A minimal root filesystem as an uncompressed tarball: busybox, its applets, /etc, /tmp."""
    busybox = busybox or _busybox()
    buf = io.BytesIO()
    now = int(time.time())

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = mode
        info.mtime = now
        tar.addfile(info)

    def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        info.mtime = now
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "root", "var", "var/www", "www",
                  "proc", "sys", "dev", "app", "home"):
            add_dir(tar, d)
        add_dir(tar, "tmp", 0o1777)
        add_file(tar, "bin/busybox", busybox.read_bytes(), 0o755)
        for applet in _applets(busybox):
            if applet == "bin/busybox":
                continue
            info = tarfile.TarInfo(applet)
            info.type = tarfile.SYMTYPE
            info.linkname = "/bin/busybox"
            info.mtime = now
            tar.addfile(info)
        add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file(tar, "etc/hosts", b"127.0.0.1 localhost\n")
    return buf.getvalue()


def ensure_base_image(client: docker.DockerClient, name: str = BASE_IMAGE) -> str:
    """Import the busybox base image once (idempotent); returns its image id."""
    try:
        return str(client.images.get(name).id)
    except ImageNotFound:
        pass
    repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    with file_lock(Path("/run/shipline-base-image.lock")):
        try:
            return str(client.images.get(name).id)
        except ImageNotFound:
            pass
        client.api.import_image_from_data(
            rootfs_tar(),
            repository=repository,
            tag=tag or "latest",
            changes=[
                "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                'CMD ["/bin/sh"]',
                "WORKDIR /",
            ],
        )
        image = client.images.get(name)
        log.info("imported base image %s (%s)", name, image.id)
        return str(image.id)
