"""``python -m ingress``: the public HTTP app (ingress, read API, console) under gunicorn."""

from __future__ import annotations

import subprocess
import threading

from ingress.serve import gunicorn_argv
from shipline.bootstrap import run
from shipline.config import Settings


def main(settings: Settings, stop: threading.Event) -> int:
    proc = subprocess.Popen(gunicorn_argv(settings))
    while not stop.is_set():
        if proc.poll() is not None:
            return proc.returncode
        stop.wait(0.5)
    proc.terminate()  # gunicorn stops gracefully on SIGTERM within --graceful-timeout
    try:
        return proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


if __name__ == "__main__":
    run("ingress", main)
