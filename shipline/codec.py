"""Encode, decode and validate records: the only place bytes become messages.

``decode`` checks the envelope by hand and builds the typed payload with ``shipline.typed``
(fast, used by every consumer). ``decode(strict=True)`` additionally validates against the
published JSON Schemas with jsonschema; tests prove both paths agree.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from shipline.envelope import SPECVERSION, Envelope, dataschema
from shipline.messages import REGISTRY, Message
from shipline.typed import TypeCheckError, build, make

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
# The largest record a Shipline topic takes (its max.message.bytes, the producers' limit): a
# delivery of SHIPLINE_MAX_BODY (25 MB) stored as base64 inside its envelope fits with room.
MAX_RECORD = 64 * 1024 * 1024
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
ENVELOPE_FIELDS = {
    "specversion", "id", "source", "type", "time", "subject", "datacontenttype", "dataschema",
    "data", "correlationid", "causationid", "sequence",
}


class InvalidRecord(ValueError):
    """A record that is not a valid Shipline CloudEvent; ``reason`` says why, for the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def to_dict(env: Envelope) -> dict[str, Any]:
    out: dict[str, Any] = {
        "specversion": env.specversion,
        "id": env.id,
        "source": env.source,
        "type": env.type,
        "time": env.time,
        "subject": env.subject,
        "datacontenttype": env.datacontenttype,
        "dataschema": dataschema(env.type, env.data.VERSION),
        "correlationid": env.correlationid,
        "causationid": env.causationid,
        # Shallow: message fields are JSON values (no nested dataclasses), so this encodes the
        # same bytes as dataclasses.asdict without its deep copy (the hot path of every producer).
        "data": {f.name: getattr(env.data, f.name) for f in dataclasses.fields(env.data)},
    }
    if env.sequence is not None:
        out["sequence"] = env.sequence
    return out


def encode(env: Envelope) -> bytes:
    """Compact UTF-8 JSON. orjson, not ``json``: encoding is a large share of every producer's CPU
    (streams encodes three records per delivery); the bytes are the same compact JSON."""
    return orjson.dumps(to_dict(env))


def _str(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if type(value) is not str or not value:
        raise InvalidRecord(f"envelope: {name!r} must be a non-empty string")
    return value


def decode(raw: bytes | str | None, *, strict: bool = False) -> Envelope:
    if raw is None:
        raise InvalidRecord("empty record (tombstone)")
    if len(raw) > MAX_RECORD:
        raise InvalidRecord(f"record of {len(raw)} bytes exceeds {MAX_RECORD}")
    try:
        # orjson is stricter than ``json``: NaN/Infinity, integers beyond 64 bits, lone
        # surrogates and nesting past 1024 levels are "not JSON" rather than surprises later
        doc = orjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRecord(f"not JSON: {exc}") from None
    if type(doc) is not dict:
        raise InvalidRecord("envelope: expected a JSON object")
    extra = set(doc) - ENVELOPE_FIELDS
    if extra:
        raise InvalidRecord(f"envelope: unknown attribute(s) {', '.join(sorted(extra))}")
    if doc.get("specversion") != SPECVERSION:
        raise InvalidRecord(f"envelope: specversion must be {SPECVERSION!r}")
    type_name = _str(doc, "type")
    cls = REGISTRY.get(type_name)
    if cls is None:
        raise InvalidRecord(f"unknown type {type_name!r}")
    time = _str(doc, "time")
    if not _TIME.match(time):
        raise InvalidRecord("envelope: 'time' must be an RFC 3339 timestamp")
    if doc.get("datacontenttype", "application/json") != "application/json":
        raise InvalidRecord("envelope: datacontenttype must be application/json")
    if "dataschema" in doc and doc["dataschema"] != dataschema(type_name, cls.VERSION):
        raise InvalidRecord(f"envelope: dataschema {doc['dataschema']!r} does not match {type_name}")
    sequence = doc.get("sequence")
    if sequence is not None and (type(sequence) is not int or not 0 < sequence < 2**63):
        raise InvalidRecord("envelope: 'sequence' must be a positive integer")
    try:
        data: Message = build(cls, doc.get("data"))
    except TypeCheckError as exc:
        raise InvalidRecord(f"{type_name}: {exc}") from None
    subject = _str(doc, "subject")
    if subject != str(data.app_id):
        raise InvalidRecord("envelope: 'subject' must be the app id of data.app_id")
    if strict:
        _strict(type_name, doc)
    return make(
        Envelope,
        {
            "id": _str(doc, "id"),
            "source": _str(doc, "source"),
            "type": type_name,
            "time": time,
            "subject": subject,
            "data": data,
            "correlationid": _str(doc, "correlationid"),
            "causationid": _str(doc, "causationid"),
            "sequence": sequence,
        },
    )


@cache
def _validator(type_name: str):  # type: ignore[no-untyped-def]
    import jsonschema

    cls = REGISTRY[type_name]
    schema = json.loads((SCHEMA_DIR / f"{type_name}.v{cls.VERSION}.json").read_text())
    envelope = json.loads((SCHEMA_DIR / "envelope.v1.json").read_text())
    registry_schema = {"allOf": [envelope, {"properties": {"data": schema}}]}
    return jsonschema.Draft202012Validator(registry_schema)


def _strict(type_name: str, doc: dict[str, Any]) -> None:
    errors = sorted(_validator(type_name).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(root)"
        raise InvalidRecord(f"{type_name}: {where}: {first.message}")
