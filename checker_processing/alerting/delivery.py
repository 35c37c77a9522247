"""What one try of a delivery came to, and when to try again (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import aiohttp


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class TryAgain:
    """A failure that may pass: connection trouble, a time-out, 408, 429, 5xx."""

    error: str
    retry_after: float | None = None  # what the receiver asked for (Retry-After), seconds


@dataclass(frozen=True, slots=True)
class Refused:
    """The receiver refused the notification itself (another 4xx): trying again won't help."""

    error: str


Outcome = Delivered | TryAgain | Refused
# Statuses that say "later", not "never".
_LATER = frozenset({408, 425, 429})


async def outcome_of(response: aiohttp.ClientResponse) -> Outcome:
    """Sort an HTTP answer into an outcome, with a short error text."""
    if 200 <= response.status < 300:
        return Delivered()
    text = (await response.content.read(200)).decode("utf-8", "replace")
    error = f"HTTP {response.status}" + (f": {' '.join(text.split())}" if text.strip() else "")
    if response.status in _LATER or response.status >= 500:
        return TryAgain(error, retry_after(response.headers.get("Retry-After")))
    return Refused(error)


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (delay-seconds form; an HTTP date is read too), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def next_delay(
    attempts: int,
    initial: float,
    maximum: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds before try number `attempts + 1`: exponential from `initial`, capped at
    `maximum`, with equal jitter (half fixed, half random) so that senders retrying together
    spread out; never sooner than the receiver's Retry-After (pure but for `rng`)."""
    base = min(maximum, initial * 2 ** max(0, attempts - 1))
    jittered = base / 2 + (rng or random).uniform(0, base / 2)
    return float(max(jittered, retry_after or 0.0))
