"""Every topic Shipline uses, declared once, and created by code at start-up.

Broker auto-creation is off, so a typo in a topic name fails loudly instead of creating a stray.
Every record on every topic is keyed by app id (see ``Envelope.key``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic, ResourceType

from shipline.codec import MAX_RECORD

log = logging.getLogger(__name__)

WEEK_MS = str(7 * 24 * 3600 * 1000)
# Records carrying request bodies (inbound, their delivery.accepted events, dead letters of either)
# may be as large as the ingress accepts, not Kafka's default of about 1 MB.
LARGE = {"max.message.bytes": str(MAX_RECORD)}


@dataclass(frozen=True)
class Topics:
    prefix: str

    @property
    def inbound(self) -> str:
        """Everything streams decides on, one ordered log per app: accepted deliveries and
        management requests (ingress) and outcome reports (deployer, dispatcher). One topic, so a
        replay meets an app's inputs in the first run's order (``streams/agent.py``)."""
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
    def deadletter(self) -> str:
        """Records a consumer could not decode or apply, with the reason in headers."""
        return f"{self.prefix}.deadletter"

    def all(self) -> dict[str, dict[str, str]]:
        """name -> topic config."""
        return {
            self.inbound: {"retention.ms": WEEK_MS, **LARGE},
            self.events: {"retention.ms": "-1", "retention.bytes": "-1", **LARGE},
            self.commands: {"retention.ms": WEEK_MS},
            self.deadletter: {"retention.ms": "-1", **LARGE},
        }


def ensure_topics(bootstrap: str, topics: Topics, partitions: int, timeout: float = 60.0) -> None:
    """Create missing topics and bring existing ones to the declared config (idempotent; concurrent
    callers are fine)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + timeout
    wanted = topics.all()
    first = True
    while True:
        existing = set(admin.list_topics(timeout=10).topics)
        missing = [n for n in wanted if n not in existing]
        if first:
            _align_configs(admin, {n: c for n, c in wanted.items() if n in existing})
            first = False
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


def _align_configs(admin: AdminClient, wanted: dict[str, dict[str, str]]) -> None:
    """Set what differs from the declared config on topics that already exist (made by an older
    version, say, before the record limit was raised). A refusal (no ALTER_CONFIGS permission on
    a managed cluster) is logged, not fatal: the topics work, with their old limits."""
    if not wanted:
        return
    resources = [ConfigResource(ResourceType.TOPIC, name) for name in wanted]
    try:
        described = {res.name: fut.result(timeout=30) for res, fut in admin.describe_configs(resources).items()}
    except KafkaException as exc:
        log.warning("cannot read topic configs: %s", exc)
        return
    changes: dict[str, dict[str, str]] = {}
    for name, config in wanted.items():
        current = described.get(name, {})
        differ = {k: v for k, v in config.items() if k not in current or current[k].value != v}
        if differ:
            changes[name] = differ
    if not changes:
        return
    resources = [
        ConfigResource(ResourceType.TOPIC, name, incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in differ.items()])
        for name, differ in changes.items()
    ]
    for res, fut in admin.incremental_alter_configs(resources).items():
        try:
            fut.result(timeout=30)
            log.info("topic %s: config brought to %s", res.name, changes[res.name])
        except KafkaException as exc:
            log.warning("topic %s: cannot set its config (%s); it keeps its old one", res.name, exc)


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
