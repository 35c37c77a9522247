"""Keep secrets out of anything we print."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_DSN_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_dsn(dsn: str) -> str:
    """A libpq URL or key=value DSN with its password masked."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is None:
            return redact_query_password(dsn)
        userinfo = f"{parts.username or ''}:{MASK}@"
        host = parts.netloc.rpartition("@")[2]
        return redact_query_password(urlunsplit(parts._replace(netloc=userinfo + host)))
    return _DSN_PASSWORD.sub(lambda m: m.group(1) + MASK, dsn)


def redact_query_password(url: str) -> str:
    return re.sub(r"([?&]password=)[^&]*", lambda m: m.group(1) + MASK, url, flags=re.I)


def dsn_password(dsn: str) -> str | None:
    """The password inside a DSN, so the log filter can mask it wherever it appears."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password:
            return parts.password
        match = re.search(r"[?&]password=([^&]*)", dsn, flags=re.I)
        return match.group(1) if match else None
    match = _DSN_PASSWORD.search(dsn)
    if not match:
        return None
    value = match.group(2)
    if value.startswith("'") and value.endswith("'"):
        value = value[1:-1].replace("\\'", "'").replace("\\\\", "\\")
    return value
