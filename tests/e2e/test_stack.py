"""`shipline up` from nothing: ready, stops within 10 s, restarts with the log intact."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from shipline import codec, kafka
from shipline.envelope import wrap
from shipline.messages import DeployHookDeleted
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.remove()


def test_up_ready_stop_within_10s_and_restart_keeps_the_log(stack: Stack) -> None:
    first = stack.up()
    assert stack.readyz().status_code == 200
    assert first < 180, f"first start took {first:.0f}s"
    assert stack.cli("status").returncode == 0

    marker = wrap(DeployHookDeleted(app_id=424242, hook_id="marker"), source="e2e", sequence=1)
    kafka.send_sync(kafka.producer(stack.bootstrap), "shipline.events", marker)

    took = stack.down()
    assert took < 10, f"stop took {took:.1f}s"
    assert stack.cli("status").returncode != 0

    second = stack.up()
    assert second < 30, f"second start took {second:.1f}s"
    c = kafka.consumer(stack.bootstrap, f"e2e-{time.monotonic_ns()}", ["shipline.events"])
    found = False
    deadline = time.monotonic() + 60
    while not found and time.monotonic() < deadline:
        msg = c.poll(0.5)
        if msg is not None and msg.error() is None:
            found = codec.decode(msg.value()).id == marker.id
    c.close()
    assert found, "a record produced before the restart is gone"
