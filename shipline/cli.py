"""``shipline``: bring the stack up or down, run one service, and talk to a running stack."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from shipline import config

SERVICE_COMMANDS = {
    "web": "ingress",
    "streams": "streams",
    "deployer": "deployer",
    "projector": "projections",
    "dispatcher": "outbound",
}
PLUGINS = ("projections.cli", "outbound.cli")


def _pid_file(settings: config.Settings) -> Path:
    return settings.data_dir / "run" / "shipline.pid"


def _running_pid(settings: config.Settings) -> int | None:
    try:
        pid = int(_pid_file(settings).read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def readyz(settings: config.Settings, timeout: float = 3.0) -> tuple[int, dict]:  # type: ignore[type-arg]
    url = f"http://{settings.http_host}:{settings.http_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {"down": ["web"]}


def wait_ready(settings: config.Settings, timeout: float, alive=lambda: True) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if readyz(settings)[0] == 200:
            return True
        time.sleep(0.5)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    settings = config.load()
    if _running_pid(settings):
        print(f"Shipline is already running (pid {_running_pid(settings)}); `shipline down` stops it.")
        return 1
    if args.detach:
        return _up_detached(settings, args)
    from shipline import stack
    from shipline.supervisor import Supervisor

    started = time.monotonic()
    run_dir = settings.data_dir / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    _pid_file(settings).write_text(str(os.getpid()))
    print(f"Shipline: data in {settings.data_dir}; preparing infrastructure (first run downloads Kafka)...")
    infra = stack.infrastructure(settings)
    docker = stack.docker_available(settings) if not args.no_docker else False
    services = stack.services(settings)
    sup = Supervisor(infra + services, run_dir)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for child in infra:
            sup.start_child(child)
        stack.wait_infrastructure(settings)
        for child in services:
            sup.start_child(child)
        watcher = threading.Thread(target=sup.watch, daemon=True)
        watcher.start()
        if wait_ready(settings, 180, alive=lambda: not stop.is_set()):
            print(
                f"Shipline is ready after {time.monotonic() - started:.1f}s: {settings.public_url} "
                f"(docker engine: {'yes' if docker else 'no'}). Ctrl-C stops it.",
                flush=True,
            )
            if not args.no_demo and not stop.is_set():
                _run_demo(settings, docker)
        elif not stop.is_set():
            print(f"Shipline did not become ready: {readyz(settings)[1]}", file=sys.stderr)
        stop.wait()
    finally:
        print("Shipline: stopping...", flush=True)
        t0 = time.monotonic()
        sup.stop()
        _pid_file(settings).unlink(missing_ok=True)
        print(f"Shipline: stopped in {time.monotonic() - t0:.1f}s.", flush=True)
    return 0


def _run_demo(settings: config.Settings, docker: bool) -> None:
    if importlib.util.find_spec("shipline.demo") is None:
        return
    from shipline import demo

    try:
        demo.run(settings, docker=docker)
    except Exception as exc:  # noqa: BLE001 - the stack stays up for inspection
        print(f"demo failed: {exc}", file=sys.stderr, flush=True)


def _up_detached(settings: config.Settings, args: argparse.Namespace) -> int:
    log_path = settings.data_dir / "run" / "stack.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "shipline.cli", "up"]
    if args.no_demo:
        argv.append("--no-demo")
    if args.no_docker:
        argv.append("--no-docker")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    print(f"Shipline starting in the background (pid {proc.pid}); log: {log_path}")
    if wait_ready(settings, 240, alive=lambda: proc.poll() is None):
        print(f"Shipline is ready: {settings.public_url}")
        return 0
    print(f"Shipline did not become ready; see {log_path}", file=sys.stderr)
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    settings = config.load()
    code = _stop_supervisor(settings)
    if args.apps:
        # The data plane (HAProxy and app instances) outlives the services on purpose, so
        # deployed apps keep serving through a restart; --apps takes it down too.
        from deployer.teardown import stop_everything

        stop_everything(settings)
        print("Deployed apps and the proxy stopped.")
    return code


def _stop_supervisor(settings: config.Settings) -> int:
    pid = _running_pid(settings)
    if pid is None:
        print("Shipline is not running.")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("Shipline stopped.")
            return 0
        time.sleep(0.2)
    print(f"Shipline (pid {pid}) did not stop within 20s", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    settings = config.load()
    pid = _running_pid(settings)
    code, body = readyz(settings)
    status_file = settings.data_dir / "run" / "status.json"
    services = json.loads(status_file.read_text()).get("services", {}) if status_file.exists() else {}
    if args.json:
        print(json.dumps({"pid": pid, "ready": code == 200, "readyz": body, "services": services}, indent=2))
    else:
        print(f"supervisor: {'pid ' + str(pid) if pid else 'not running'}; /readyz: {code or 'no answer'} {body}")
        for name, info in services.items():
            state = "up" if info.get("alive") else "DOWN"
            print(f"  {name:<11} {state:<5} pid {info.get('pid')}  restarts {info.get('restarts')}")
    return 0 if code == 200 else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from shipline import demo

    settings = config.load()
    if readyz(settings)[0] != 200:
        print("No ready stack at", settings.public_url, "- start one with `shipline up --detach`", file=sys.stderr)
        return 1
    return demo.run(settings, docker=not args.no_docker)


def cmd_service(args: argparse.Namespace) -> int:
    import runpy

    sys.argv = [f"shipline {args.command}"]
    runpy.run_module(SERVICE_COMMANDS[args.command], run_name="__main__", alter_sys=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shipline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring the whole stack up (local Kafka, PostgreSQL, services) and run the demo")
    up.add_argument("--detach", action="store_true", help="run in the background; `shipline down` stops it")
    up.add_argument("--no-demo", action="store_true", help="do not run the push-to-deploy demo once ready")
    up.add_argument("--no-docker", action="store_true", help="do not start or use a Docker engine")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop a detached stack (deployed apps keep serving)")
    down.add_argument("--apps", action="store_true", help="also stop every deployed app and the proxy")
    down.set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="what runs and whether it is ready")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    demo = sub.add_parser("demo", help="run the push-to-deploy demo against a running stack")
    demo.add_argument("--no-docker", action="store_true")
    demo.set_defaults(func=cmd_demo)
    for name, module in SERVICE_COMMANDS.items():
        sub.add_parser(name, help=f"run the {name} service alone (python -m {module})").set_defaults(
            func=cmd_service
        )
    for plugin in PLUGINS:
        if importlib.util.find_spec(plugin.split(".")[0]) and _has(plugin):
            importlib.import_module(plugin).register(sub)
    return parser


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
