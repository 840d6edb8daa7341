"""What the ingress views depend on, built once per process by ``ingress.web.mount``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ingress.credentials import Credentials
from ingress.crypto import SecretBox
from ingress.local_index import LocalIndex
from ingress.notes import DeliveryNotes
from ingress.publisher import Publisher
from ingress.retention import Pruner
from ingress.store import Store
from shipline.config import Settings
from shipline.envelope import Envelope

# Under GitHub's 10 s delivery timeout, so a slow broker becomes our 503, not their timeout.
SEND_TIMEOUT = 8.0


@dataclass
class Ingress:
    settings: Settings
    producer: Any  # confluent_kafka.Producer
    store: Store
    box: SecretBox
    publisher: Publisher
    pruner: Pruner
    index: LocalIndex
    credentials: Credentials
    notes: DeliveryNotes

    def send(self, envelopes: list[Envelope]) -> list[tuple[int, int]]:
        """Produce to the inbound topic and wait for every ack (raises ``NotDurable``)."""
        return self.publisher.send(self.settings.topics.inbound, envelopes, SEND_TIMEOUT)

    def position(self, partition_offset: tuple[int, int]) -> str:
        partition, offset = partition_offset
        return f"{self.settings.topics.inbound}:{partition}:{offset}"

    def url(self, path: str) -> str:
        return self.settings.public_url + path


def deps() -> Ingress:
    from shipline.web import current

    return current().extras["ingress"]  # type: ignore[no-any-return]
