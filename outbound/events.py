"""Which events a subscription may ask for, and what they are called on the wire."""

from __future__ import annotations

from collections.abc import Iterable

from shipline.messages import kinds

BUILD_FINISH = "build_finish"  # Shipway's name for build.finished, sent in Shipway's shape
ALIASES = {"build.finished": BUILD_FINISH}
# Internal bookkeeping that never leaves Shipline: subscriptions (they carry secrets), inbound
# deliveries (raw bodies and headers, tokens included), hook and token management.
INTERNAL_PREFIXES = ("subscription.", "delivery.", "deploy_hook.", "webhook_token.")


def deliverable_types() -> set[str]:
    return {t for t in kinds("event") if not t.startswith(INTERNAL_PREFIXES)}


def wire_name(event_type: str) -> str:
    """The ``X-Shipline-Event`` value: the CloudEvent type, or ``build_finish`` for build.finished."""
    return ALIASES.get(event_type, event_type)


def valid_names() -> set[str]:
    return deliverable_types() | {BUILD_FINISH, "*"}


def normalise(names: Iterable[str]) -> list[str]:
    """Validate a subscription's event filter; raises ValueError naming what is wrong."""
    out: list[str] = []
    allowed = valid_names()
    for name in names:
        if not isinstance(name, str) or name not in allowed:
            raise ValueError(f"unknown or internal event {name!r}; allowed: {', '.join(sorted(allowed))}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("events must name at least one event, or be [\"*\"]")
    return out


def matches(filter_: Iterable[str], event_type: str) -> bool:
    if event_type.startswith(INTERNAL_PREFIXES):
        return False
    names = set(filter_)
    return "*" in names or event_type in names or wire_name(event_type) in names
