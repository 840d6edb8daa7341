"""Projections without services: the handler registry, audit data, the progress bar, CLI parsing and output."""

from __future__ import annotations

import argparse
import io
import json
from datetime import UTC, datetime, timedelta

import pytest

from projections import cli, queries
from projections.handlers import HANDLERS, _storable_body, audit_data
from projections.rebuild import ProgressBar, names
from projections.schema import MIGRATIONS, TABLES
from shipline import messages as m
from shipline.envelope import wrap

pytestmark = pytest.mark.unit


def test_every_event_type_has_a_fold_except_the_audit_only_ones() -> None:
    events = set(m.kinds("event"))
    assert set(HANDLERS) <= events
    assert events - set(HANDLERS) == {"request.rejected"}  # kept in audit, changes no table


def test_every_table_is_created_and_checksummed() -> None:
    sql = "\n".join(text for _, text in MIGRATIONS)
    for table in TABLES:
        assert f"CREATE TABLE {table} (" in sql
    assert "now()" not in sql and "serial" not in sql  # rows must be a pure function of the log


def test_audit_data_keeps_the_payload_and_makes_nul_storable() -> None:
    env = wrap(m.JobFinished(app_id=1, job=2, exit_code=0, log="ok", duration=1.0), source="t")
    assert json.loads(audit_data(env)) == {"app_id": 1, "job": 2, "exit_code": 0, "log": "ok", "duration": 1.0}
    nul = wrap(m.JobFinished(app_id=1, job=2, exit_code=0, log="a\x00b", duration=1.0), source="t")
    text = audit_data(nul)
    assert "\\u0000" not in text and json.loads(text)["log"] == "a\ufffdb"


def test_a_body_with_nul_is_kept_exactly_as_base64() -> None:
    assert _storable_body("plain", "utf8") == ("plain", "utf8")
    body, encoding = _storable_body("a\x00b", "utf8")
    assert encoding == "base64" and body == "YQBi"


def test_progress_bar_lines() -> None:
    out = io.StringIO()
    bar = ProgressBar(1000, out)
    bar.update(250, final=False)
    bar.update(1000, final=True)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("rebuild [#######") and "25%" in lines[0] and "250/1,000 events" in lines[0]
    assert "100%" in lines[-1] and "1,000/1,000 events" in lines[-1]
    ProgressBar(10, None).update(5, final=True)  # no stream: silent


def test_rebuild_schema_names() -> None:
    assert names("shipline_projections") == ("shipline_projections_next", "shipline_projections_old")


def test_build_ids() -> None:
    assert queries.build_id(12, 3) == "12-3"
    assert queries.parse_build_id("12-3") == (12, 3)
    for bad in ("12", "a-3", "12-", "-3", "12-3-4"):
        assert queries.parse_build_id(bad) is None, bad


def test_cli_table_and_relative_times() -> None:
    text = cli.table([[3, "img:abc", "(current)"], [12, "i", None]], ["#", "IMAGE", "WHEN"])
    assert text.splitlines() == ["#   IMAGE    WHEN", "3   img:abc  (current)", "12  i"]
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    ago = lambda **kw: cli.ago((now - timedelta(**kw)).isoformat(), now)  # noqa: E731
    assert ago(seconds=1) == "just now"
    assert ago(seconds=30) == "30 s ago"
    assert ago(minutes=2) == "2 min ago"
    assert ago(hours=1) == "1 hour ago" and ago(hours=3) == "3 hours ago"
    assert ago(days=2) == "2 days ago"
    assert cli.ago(None) == "-"
    assert cli.short("0123456789abcdef") == "0123456" and cli.short(None) == "-"


def test_cli_registers_every_command() -> None:
    parser = argparse.ArgumentParser(prog="shipline")
    cli.COMMANDS(parser.add_subparsers(dest="command", required=True))
    cases = [
        ["app", "list"], ["app", "list", "--json", "--all"], ["app", "history", "shop", "--at", "2025-01-01T00:00:00Z"],
        ["app", "rollback", "shop"], ["app", "rollback", "7", "--revision", "2", "--no-wait"],
        ["app", "deploy", "shop", "--image", "x:1"], ["app", "deploy", "shop", "--commit", "abc"],
        ["app", "webhook", "enable", "shop"], ["app", "webhook", "status", "shop"],
        ["app", "webhook", "disable", "shop"],
        ["deliveries", "--app", "shop", "--limit", "5"], ["audit", "delivery-1", "--json"],
        ["projections", "rebuild", "--no-swap", "--keep-old"],
    ]
    for argv in cases:
        args = parser.parse_args(argv)
        assert callable(args.func), argv
    with pytest.raises(SystemExit):
        parser.parse_args(["app", "deploy", "shop"])  # --image or --commit is required
    with pytest.raises(SystemExit):
        parser.parse_args(["app", "webhook", "rotate", "shop"])


def test_cli_reports_an_unreachable_stack(capsys) -> None:
    from shipline.config import load

    settings = load({"SHIPLINE_PUBLIC_URL": "http://127.0.0.1:9", "SHIPLINE_ADMIN_TOKEN": "t",
                     "SHIPLINE_SECRET_KEY": "k", "SHIPLINE_DATA_DIR": "/tmp/shipline-unit"})
    assert cli.main(["app", "list"], settings=settings) == 1
    assert "cannot reach Shipline at http://127.0.0.1:9" in capsys.readouterr().err


class RecordingCursor:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def execute(self, sql, params=()):  # type: ignore[no-untyped-def]
        self.calls.append((sql, params))


def test_layered_writer_keeps_each_apps_order_and_batches_across_apps() -> None:
    from psycopg.types.json import Jsonb

    from projections.writer import Immediate, Layered, Rows

    first = Rows("INSERT INTO t SELECT * FROM {rows}", app_id="int8", x="text")
    second = Rows("UPDATE t SET x = v.x FROM {rows} WHERE t.app_id = v.app_id", app_id="int8", x="text")
    assert first.text == "INSERT INTO t SELECT * FROM jsonb_to_recordset(%s::jsonb) AS v(app_id int8, x text)"
    w = Layered()
    for app, statement, x in [(1, first, "a"), (2, first, "b"), (1, second, "c"), (3, second, "d"),
                              (2, second, "e"), (1, second, "f")]:
        w.app_id = app
        w.rows(statement, app_id=app, x=x)
    w.app_id = 2
    w.execute("UPDATE t SET y = 1 WHERE app_id = %s", (2,))
    cur = RecordingCursor()
    assert w.flush(cur) == 5  # type: ignore[arg-type]
    assert cur.calls == [
        (first.text, ('[{"app_id":1,"x":"a"},{"app_id":2,"x":"b"}]',)),  # layer 1: first statement of apps 1, 2 ...
        (second.text, ('[{"app_id":3,"x":"d"}]',)),  # ... and of app 3, which has its own statement
        (second.text, ('[{"app_id":1,"x":"c"},{"app_id":2,"x":"e"}]',)),  # layer 2
        (second.text, ('[{"app_id":1,"x":"f"}]',)),  # layer 3: app 1's third, then app 2's plain statement
        ("UPDATE t SET y = 1 WHERE app_id = %s", (2,)),
    ]
    assert w.flush(cur) == 0  # type: ignore[arg-type]

    one = RecordingCursor()
    Immediate(one).rows(first, app_id=9, x=Jsonb({"k": [1, None]}))  # type: ignore[arg-type]
    assert one.calls == [(first.text, ('[{"app_id":9,"x":{"k":[1,null]}}]',))]
    with pytest.raises(TypeError):
        Immediate(one).rows(first, app_id=9)  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # a misspelt column would otherwise be NULL
        Immediate(one).rows(first, app_id=9, y="z")  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # not JSON: an error, not a silent str()
        Immediate(one).rows(first, app_id=9, x=object())  # type: ignore[arg-type]
