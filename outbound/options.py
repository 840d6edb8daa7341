"""The dispatcher's knobs, read from ``Settings`` once (services never read the environment)."""

from __future__ import annotations

from dataclasses import dataclass

from shipline.config import VARIABLES, Settings


def _setting(settings: Settings, name: str) -> str:
    value = settings.env.get(name, "")
    return value if value != "" else VARIABLES[name][0]


@dataclass(frozen=True)
class Options:
    timeout: float
    schedule: tuple[float, ...]  # retry delays in seconds, already multiplied by the scale
    rotation: float  # seconds a rotated secret keeps signing
    disable_after: float  # seconds of unbroken failure before a subscription is disabled
    workers: int = 32  # sender threads, shared by every subscription
    per_endpoint: int = 8  # concurrent requests to one subscription at most
    jitter: float = 0.2  # +-20 %
    max_retry_after: float = 86400.0  # a Retry-After longer than this is capped
    keep_days: float = 30.0  # days the pushes and builds joined into build_finish payloads are kept
    prune_every: float = 3600.0  # seconds between prunes of those rows
    prune_first: float = 60.0  # seconds after start before the first prune


def from_settings(settings: Settings, **overrides: object) -> Options:
    opts = Options(
        timeout=settings.outbound_timeout,
        schedule=tuple(d * settings.retry_scale for d in settings.retry_schedule),
        rotation=float(_setting(settings, "SHIPLINE_SECRET_ROTATION")),
        disable_after=float(_setting(settings, "SHIPLINE_OUTBOUND_DISABLE_AFTER")),
        keep_days=settings.outbound_keep_days,
    )
    if overrides:
        import dataclasses

        opts = dataclasses.replace(opts, **overrides)  # type: ignore[arg-type]
    return opts
