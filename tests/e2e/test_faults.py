"""The short fault run: kill -9 every part once under load; nothing lost, nothing doubled."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.faults.harness import FaultRun
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack(extra_env={"SHIPLINE_HEALTH_INTERVAL": "0.2", "SHIPLINE_RETRY_SCALE": "0.01"})
    try:
        s.up()
        yield s
    finally:
        s.remove()


@pytest.mark.timeout(900)  # ~80 s of load and faults, then up to 300 s for the pipeline to settle
def test_kill_each_part_in_turn_under_load(stack: Stack) -> None:
    result = FaultRun(stack, apps=3, rate=3.0, settle=5.0, quiesce_timeout=300).run()
    table = result.table()
    print(table)
    assert all(f.recovered_s is not None for f in result.faults), table
    assert result.accepted > 0, table
    assert result.quiesced, f"{table}\n{stack.log_tail(60)}"
    assert result.lost == [], table
    assert result.duplicated == [], table
    assert result.sequence_problems == [], table
    assert result.outbound_missing == [] and result.outbound_unstable == [], table
    assert result.outage_2xx == 0, table
