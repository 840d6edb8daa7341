"""Process helpers of the local infrastructure (no services needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shipline.infra.files import pid_alive

pytestmark = pytest.mark.unit


def test_a_zombie_is_not_alive():
    """A broker killed while its parent has not reaped it must count as gone, or stop() waits forever."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # exited, not yet waited for: a zombie
        with open(f"/proc/{child.pid}/stat") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
