"""Generate ``schemas/*.json`` from the message dataclasses: ``python -m shipline.schemagen``.

The schemas are the published contract for downstream consumers; generating them keeps the
contract and the code one thing. ``tests/unit/test_schemas.py`` fails when a checked-in file
differs from what this produces.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from shipline.envelope import dataschema
from shipline.messages import REGISTRY
from shipline.typed import INT64

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _schema(tp: Any) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return {}
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        return {"anyOf": [_schema(a) if a is not type(None) else {"type": "null"} for a in args]}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": _schema(item)}
    if origin is dict:
        _, value = typing.get_args(tp)
        return {"type": "object", "additionalProperties": _schema(value)}
    raise TypeError(f"unsupported annotation {tp!r}")


def data_schema(type_name: str) -> dict[str, Any]:
    cls = REGISTRY[type_name]
    hints = typing.get_type_hints(cls)
    props = {}
    required = []
    for f in dataclasses.fields(cls):
        props[f.name] = _schema(hints[f.name])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    return {
        "$schema": DIALECT,
        "$id": dataschema(type_name, cls.VERSION),
        "title": f"{cls.__name__} ({cls.KIND}) data, version {cls.VERSION}",
        "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else cls.__name__,
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def envelope_schema() -> dict[str, Any]:
    string = {"type": "string", "minLength": 1}
    return {
        "$schema": DIALECT,
        "$id": "https://shipline.dev/schemas/envelope/v1.json",
        "title": "Shipline CloudEvents 1.0 envelope (structured JSON), version 1",
        "type": "object",
        "properties": {
            "specversion": {"const": "1.0"},
            "id": string,
            "source": string,
            "type": {"enum": sorted(REGISTRY)},
            "time": {"type": "string", "format": "date-time"},
            "subject": string,
            "datacontenttype": {"const": "application/json"},
            "dataschema": {"type": "string"},
            "correlationid": string,
            "causationid": string,
            "sequence": {"type": "integer", "minimum": 1, "maximum": INT64[1]},
            "data": {"type": "object"},
        },
        "required": ["specversion", "id", "source", "type", "time", "subject", "data",
                     "correlationid", "causationid"],
        "additionalProperties": False,
    }


def render() -> dict[str, str]:
    files = {"envelope.v1.json": envelope_schema()}
    for type_name, cls in REGISTRY.items():
        files[f"{type_name}.v{cls.VERSION}.json"] = data_schema(type_name)
    return {name: json.dumps(doc, indent=2, sort_keys=True) + "\n" for name, doc in files.items()}


def main() -> None:
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in render().items():
        (SCHEMA_DIR / name).write_text(text)
    print(f"wrote {len(render())} schemas to {SCHEMA_DIR}")


if __name__ == "__main__":
    main()
