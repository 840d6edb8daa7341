"""One lock per app, held while a command of that app is carried out or recovered.

An ``flock`` on ``<data_dir>/deployer/locks/<app>.lock``: the kernel drops it when the holder
dies, so a lock that can be taken means nobody is working on that app any more, which is how a
restarted deployer knows a recorded rollout was abandoned (and not in progress in a sibling
deployer process sharing the data dir).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class AppLocks:
    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "deployer" / "locks"
        self.dir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def hold(self, app_id: int, blocking: bool = True) -> Iterator[bool]:
        """Yields True when the lock is held; False (non-blocking only) when someone else has it."""
        fd = os.open(self.dir / f"{int(app_id)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
