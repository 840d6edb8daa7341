"""Take down everything the deployer runs for one data dir: app instances and the proxy.

A deployer restart never does this (apps keep serving while it is down); ``shipline down`` and
the tests do, through ``stop_everything(settings)``.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from deployer.proxy import Proxy
from deployer.strategies import scope_of
from deployer.strategies.process import ProcessStrategy
from shipline.config import Settings

log = logging.getLogger(__name__)


def stop_everything(settings: Settings, docker: bool = True) -> None:
    data = Path(settings.data_dir)
    scope = scope_of(data)
    processes = ProcessStrategy(data, scope, rebuild=lambda *a: "")
    for inst in processes.running_ids(include_jobs=True).values():
        if inst is not None:
            processes.stop(inst, timeout=5)
    if docker:
        with contextlib.suppress(Exception):  # no engine: nothing of ours can run there
            from shipline.infra.docker_engine import DEFAULT_SOCKET, engine_client

            client = engine_client(settings.docker_host or f"unix://{DEFAULT_SOCKET}", 60)
            for c in client.containers.list(all=True, filters={"label": f"shipline.scope={scope}"}):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
    Proxy(data, settings.proxy_port).stop()
