"""The CloudEvents 1.0 structured-JSON envelope every record on every topic wears."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from shipline.messages import Message

SPECVERSION = "1.0"
ID_NAMESPACE = uuid.UUID("6f1c1a52-3b55-4d8e-9a53-6c8f0d6b7a10")
SCHEMA_BASE = "https://shipline.dev/schemas"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def derive_id(*parts: object) -> str:
    """A deterministic event id: the same cause always yields the same id, so a replay is identical."""
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(str(p) for p in parts)))


def dataschema(type_name: str, version: int = 1) -> str:
    return f"{SCHEMA_BASE}/{type_name}/v{version}.json"


@dataclass(frozen=True)
class Envelope:
    id: str
    source: str
    type: str
    time: str
    subject: str
    data: Message
    correlationid: str
    causationid: str
    sequence: int | None = None
    specversion: str = SPECVERSION
    datacontenttype: str = "application/json"

    @property
    def app_id(self) -> int:
        return self.data.app_id

    @property
    def key(self) -> bytes:
        """Every record is keyed by its app id: one app, one partition, one order."""
        return str(self.data.app_id).encode()

    def with_sequence(self, sequence: int) -> Envelope:
        return dataclasses.replace(self, sequence=sequence)


def wrap(
    message: Message,
    *,
    source: str,
    id: str | None = None,
    correlationid: str | None = None,
    causationid: str | None = None,
    time: str | None = None,
    sequence: int | None = None,
) -> Envelope:
    event_id = id or str(uuid.uuid4())
    return Envelope(
        id=event_id,
        source=source,
        type=message.TYPE,
        time=time or now_iso(),
        subject=str(message.app_id),
        data=message,
        correlationid=correlationid or event_id,
        causationid=causationid or event_id,
        sequence=sequence,
    )
