"""Every topic Shipline uses, declared once, and created by code at start-up.

Broker auto-creation is off, so a typo in a topic name fails loudly instead of creating a stray.
Every record on every topic is keyed by app id (see ``Envelope.key``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

WEEK_MS = str(7 * 24 * 3600 * 1000)


@dataclass(frozen=True)
class Topics:
    prefix: str

    @property
    def inbound(self) -> str:
        """Accepted webhook deliveries and management requests (ingress -> streams)."""
        return f"{self.prefix}.inbound"

    @property
    def events(self) -> str:
        """The domain event log, kept forever: the source of truth (streams -> everyone)."""
        return f"{self.prefix}.events"

    @property
    def commands(self) -> str:
        """Build, deploy and job commands (streams -> deployer)."""
        return f"{self.prefix}.commands"

    @property
    def reports(self) -> str:
        """Outcomes observed by the deployer and dispatcher, sequenced by streams (-> streams)."""
        return f"{self.prefix}.reports"

    @property
    def deadletter(self) -> str:
        """Records a consumer could not decode or apply, with the reason in headers."""
        return f"{self.prefix}.deadletter"

    def all(self) -> dict[str, dict[str, str]]:
        """name -> topic config."""
        return {
            self.inbound: {"retention.ms": WEEK_MS},
            self.events: {"retention.ms": "-1", "retention.bytes": "-1"},
            self.commands: {"retention.ms": WEEK_MS},
            self.reports: {"retention.ms": WEEK_MS},
            self.deadletter: {"retention.ms": "-1"},
        }


def ensure_topics(bootstrap: str, topics: Topics, partitions: int, timeout: float = 60.0) -> None:
    """Create missing topics (idempotent; concurrent callers are fine)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    wanted = topics.all()
    while True:
        existing = set(admin.list_topics(timeout=10).topics)
        missing = [n for n in wanted if n not in existing]
        if not missing:
            return
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1, config=wanted[n]) for n in missing]
        )
        for name, fut in futures.items():
            try:
                fut.result(timeout=30)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc) and time.monotonic() > deadline:
                    raise RuntimeError(f"could not create topic {name}: {exc}") from exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not created in {timeout}s: {missing}")


def delete_prefixed(bootstrap: str, prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix`` (tests clean up after themselves)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    if names:
        for fut in admin.delete_topics(names, operation_timeout=30).values():
            try:
                fut.result(timeout=30)
            except KafkaException:
                pass
