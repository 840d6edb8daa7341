"""The main job: `shipline demo` against a running stack does push -> build -> deploy -> v2 -> rollback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack(extra_env={"SHIPLINE_HEALTH_INTERVAL": "0.2"})
    try:
        s.up()
        yield s
    finally:
        s.remove()


def test_demo_runs_push_to_deploy_to_the_end(stack: Stack) -> None:
    result = stack.cli("demo", "--no-docker", timeout=600)
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}\n{stack.log_tail(150)}"
    assert "'hello from shipline-demo v1'" in out
    assert "revision 2 deployed" in out and "'hello from shipline-demo v2'" in out
    assert "revision 3 (rollback to v1) deployed" in out
    assert "the subscriber got build_finish" in out
    assert "delivery.accepted" in out and "build.queued" in out and "deployed" in out
