"""Instance ports from ``SHIPLINE_APP_PORTS``, recorded so two instances never get the same one.

Allocations live in ``<data_dir>/deployer/ports.json`` (port -> owning instance id) under an
``flock``, so several deployer processes on one machine share the range safely. A port is only
handed out if it is not recorded and nothing on the machine is listening on it right now (other
programs use ports too). The search starts at a random point of the range so concurrent stacks
on one machine (tests) rarely probe the same ports.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path


class NoFreePort(RuntimeError):
    pass


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # host networking: also 0.0.0.0
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class PortAllocator:
    def __init__(self, data_dir: Path, port_range: tuple[int, int]) -> None:
        self.lo, self.hi = port_range
        if not 0 < self.lo <= self.hi < 65536:
            raise ValueError(f"bad port range {port_range}")
        self.dir = Path(data_dir) / "deployer"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / "ports.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        with open(self.dir / "ports.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                try:
                    table: dict[str, str] = json.loads(self.file.read_text() or "{}")
                except FileNotFoundError:
                    table = {}
                before = dict(table)
                yield table
                if table != before:
                    tmp = self.file.with_suffix(".tmp")
                    tmp.write_text(json.dumps(table, sort_keys=True))
                    os.replace(tmp, self.file)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def allocate(self, owner: str) -> int:
        """A port for ``owner`` (the same one again if it already holds one)."""
        with self._locked() as table:
            for held, who in table.items():
                if who == owner:
                    return int(held)
            size = self.hi - self.lo + 1
            start = random.randrange(size)
            for i in range(size):
                port = self.lo + (start + i) % size
                if str(port) in table or not port_is_free(port):
                    continue
                table[str(port)] = owner
                return port
        raise NoFreePort(f"no free port in {self.lo}-{self.hi}")

    def release(self, port: int) -> None:
        with self._locked() as table:
            table.pop(str(port), None)

    def release_owner(self, owner: str) -> None:
        with self._locked() as table:
            for port in [p for p, who in table.items() if who == owner]:
                del table[port]

    def allocated(self) -> dict[int, str]:
        with self._locked() as table:
            return {int(p): w for p, w in table.items()}

    def keep_only(self, owners: set[str]) -> None:
        """Forget every allocation whose owner is not in ``owners`` (reconciliation)."""
        with self._locked() as table:
            for port in [p for p, who in table.items() if who not in owners]:
                del table[port]
