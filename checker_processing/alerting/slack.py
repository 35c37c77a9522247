"""The Slack-compatible channel: an incoming webhook (Slack, Mattermost) gets the summary as
`text`. The URL is the credential: it is never logged; errors name the channel only."""

from __future__ import annotations

import aiohttp
import orjson

from checker_processing.alerting.config import SlackChannel
from checker_processing.alerting.delivery import Outcome, TryAgain, outcome_of
from checker_processing.alerting.message import Body


def payload(body: Body) -> bytes:
    """The JSON Slack and Mattermost take (pure)."""
    return orjson.dumps({"text": body.summary})


async def send(session: aiohttp.ClientSession, channel: SlackChannel, body: Body) -> Outcome:
    try:
        async with session.post(
            channel.url.get_secret_value(),
            data=payload(body),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=channel.timeout_seconds),
            allow_redirects=False,
        ) as response:
            return await outcome_of(response)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        # The exception's text may hold the URL (its token): only the kind of failure.
        return TryAgain(f"{type(exc).__name__} posting to the Slack webhook")
