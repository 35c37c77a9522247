"""The generic webhook channel: the notification as JSON (schema/notification.schema.json),
POSTed with its id, a timestamp and, with a secret, an HMAC-SHA256 signature.

The signature is over the timestamp, a '.', and the body's bytes, so a receiver that checks it
and refuses old timestamps (say, five minutes) is safe from a replayed request::

    expected = "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, sha256).hexdigest()
"""

from __future__ import annotations

import hashlib
import hmac
import time

import aiohttp

from checker_common.errors import first_line
from checker_processing.alerting.config import WebhookChannel
from checker_processing.alerting.delivery import Outcome, TryAgain, outcome_of
from checker_processing.alerting.message import Body

ID_HEADER = "X-Checker-Notification-Id"
TIMESTAMP_HEADER = "X-Checker-Timestamp"
SIGNATURE_HEADER = "X-Checker-Signature"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Checker-Signature value (pure)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def request(channel: WebhookChannel, body: Body, now: float) -> tuple[bytes, dict[str, str]]:
    """The bytes and headers of the POST (pure)."""
    data = body.model_dump_json().encode()
    timestamp = str(int(now))
    headers = {
        "Content-Type": "application/json",
        ID_HEADER: str(body.notification_id),
        TIMESTAMP_HEADER: timestamp,
    }
    if channel.secret is not None:
        headers[SIGNATURE_HEADER] = signature(channel.secret.get_secret_value(), timestamp, data)
    return data, headers


async def send(session: aiohttp.ClientSession, channel: WebhookChannel, body: Body) -> Outcome:
    data, headers = request(channel, body, time.time())
    try:
        async with session.post(
            channel.url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=channel.timeout_seconds),
            allow_redirects=False,
        ) as response:
            return await outcome_of(response)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return TryAgain(f"{type(exc).__name__}: {first_line(exc)}".rstrip(": "))
