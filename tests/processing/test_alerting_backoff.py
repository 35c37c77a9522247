"""The sender's retry math: exponential backoff with equal jitter, at least Retry-After."""

from __future__ import annotations

import random

import pytest

from checker_processing.alerting.delivery import next_delay, retry_after


@pytest.mark.parametrize(
    ("attempts", "low", "high"),
    [(1, 1.0, 2.0), (2, 2.0, 4.0), (3, 4.0, 8.0), (8, 30.0, 60.0), (50, 30.0, 60.0)],
)
def test_the_delay_doubles_up_to_the_maximum_with_half_of_it_random(
    attempts: int, low: float, high: float
) -> None:
    delays = [next_delay(attempts, 2.0, 60.0, rng=random.Random(seed)) for seed in range(200)]
    assert all(low <= d <= high for d in delays)
    assert len(set(delays)) > 100  # spread: senders failing together do not retry together


def test_retry_after_is_a_floor_even_above_the_maximum() -> None:
    assert next_delay(1, 2.0, 60.0, retry_after=120.0) == 120.0
    assert 1.0 <= next_delay(1, 2.0, 60.0, retry_after=0.5) <= 2.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), (" 7 ", 7.0), ("", None), (None, None), ("soon", None),
     ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)],
)  # fmt: skip
def test_retry_after_reads_seconds_and_dates(header: str | None, seconds: float | None) -> None:
    assert retry_after(header) == seconds
