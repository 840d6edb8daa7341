"""What one attempt's outcome means: pure functions, no clock or randomness of their own."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from outbound.options import Options


@dataclass(frozen=True)
class Succeeded:
    pass


@dataclass(frozen=True)
class Retry:
    at: float  # epoch seconds
    delay: float


@dataclass(frozen=True)
class GaveUp:
    reason: str


@dataclass(frozen=True)
class Disable:
    reason: str


Decision = Succeeded | Retry | GaveUp | Disable


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def delay_for(tries: int, opts: Options, rng: random.Random, retry_after: float | None = None) -> float | None:
    """The wait after the ``tries``-th failed attempt of a round, or None when the schedule is spent.

    The schedule entry gets +-jitter; a Retry-After asks for at least that long (capped), and is
    honoured exactly, not jittered below.
    """
    index = tries - 1
    if index >= len(opts.schedule):
        return None
    delay = opts.schedule[index] * rng.uniform(1 - opts.jitter, 1 + opts.jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, opts.max_retry_after))
    return delay


def decide(
    *,
    status: int | None,
    retry_after: str | None,
    tries: int,
    failing_since: float | None,
    now: float,
    opts: Options,
    rng: random.Random,
) -> Decision:
    """``tries`` counts this attempt; ``failing_since`` is when the subscription started failing."""
    if status is not None and 200 <= status < 300:
        return Succeeded()
    if status == 410:
        return Disable("endpoint answered 410 Gone")
    since = failing_since if failing_since is not None else now
    if now - since >= opts.disable_after:
        days = (now - since) / 86400
        return Disable(f"failing without a success since {datetime.fromtimestamp(since, UTC).isoformat()}"
                       f" ({days:.2f} days)")
    delay = delay_for(tries, opts, rng, parse_retry_after(retry_after, now))
    if delay is None:
        return GaveUp(f"gave up after {tries} attempts")
    return Retry(at=now + delay, delay=delay)
