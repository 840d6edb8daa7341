"""How fold functions write: statements over a set of rows, run one row at a time or many at once.

A fold writes through ``Rows`` statements: SQL written once over ``{rows}``, the typed records of
one JSON array parameter (``jsonb_to_recordset``) aliased ``v``. The same text serves one event
(an array of one row) and a whole batch (an array of many), so there is one statement to get
right, not two. The rows go as one orjson-encoded parameter because encoding typed PostgreSQL
arrays column by column in Python was a sixth of a rebuild's time.

``Immediate`` runs each statement as the fold calls it (the careful, record-by-record path).
``Layered`` records each app's statements in order and runs them in *layers*: the first
statement of every app, then the second, ... Within a layer every row belongs to a different
app, and every fold touches only its own app's rows (keys such as hook ids are unique across
apps), so statements of different apps commute:
the layer's rows of one statement go to PostgreSQL as one multi-row statement, and each app's
own order is kept because its statements sit in successive layers.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb


class Rows:
    """A statement over ``{rows}``: ``jsonb_to_recordset(%s::jsonb) AS v(column type, ...)``."""

    def __init__(self, sql: str, **columns: str) -> None:
        self.columns = tuple(columns)
        self._names = frozenset(columns)
        spec = ", ".join(f"{name} {kind}" for name, kind in columns.items())
        self.text = sql.replace("{rows}", f"jsonb_to_recordset(%s::jsonb) AS v({spec})")

    def params(self, rows: list[dict[str, Any]]) -> tuple[str]:
        return (orjson.dumps(rows, default=_unwrap).decode(),)

    def check(self, values: dict[str, Any]) -> None:
        """Every column named, no other: a missing key would silently be NULL."""
        if values.keys() != self._names:
            raise TypeError(f"expected columns {self.columns}, got {tuple(values)}")


def _unwrap(value: Any) -> Any:
    """orjson's fallback: psycopg's ``Jsonb`` wrapper (the handlers' way to say "a JSON value")."""
    if isinstance(value, Jsonb):
        return value.obj
    raise TypeError(f"cannot encode {type(value).__name__} as a row value")


class Writer:
    """What a fold function writes through (its first argument)."""

    app_id: int = 0

    def rows(self, statement: Rows, **values: Any) -> None:
        raise NotImplementedError

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        """A statement that cannot be batched (its text depends on the event): run in its turn."""
        raise NotImplementedError


class Immediate(Writer):
    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self.cur = cur

    def rows(self, statement: Rows, **values: Any) -> None:
        statement.check(values)
        self.cur.execute(statement.text, statement.params([values]))  # type: ignore[arg-type]

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self.cur.execute(sql, params)  # type: ignore[arg-type]


class Layered(Writer):
    def __init__(self) -> None:
        self.ops: dict[int, list[tuple[Rows | str, Any]]] = defaultdict(list)

    def rows(self, statement: Rows, **values: Any) -> None:
        statement.check(values)
        self.ops[self.app_id].append((statement, values))

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self.ops[self.app_id].append((sql, params))

    def flush(self, cur: psycopg.Cursor[Any]) -> int:
        """Run everything recorded, layer by layer; returns the number of statements sent."""
        sent = 0
        queues = list(self.ops.values())  # apps in order of first appearance
        depth = max((len(q) for q in queues), default=0)
        for layer in range(depth):
            grouped: dict[Rows | str, list[Any]] = {}
            for queue in queues:
                if layer < len(queue):
                    statement, values = queue[layer]
                    grouped.setdefault(statement, []).append(values)
            for statement, batch in grouped.items():
                if isinstance(statement, Rows):
                    cur.execute(statement.text, statement.params(batch))  # type: ignore[arg-type]
                    sent += 1
                else:
                    for params in batch:
                        cur.execute(statement, params)  # type: ignore[arg-type]
                        sent += 1
        self.ops.clear()
        return sent
