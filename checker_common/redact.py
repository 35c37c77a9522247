"""Keep secrets out of anything we print or publish."""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
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


# scheme://userinfo@ - the userinfo runs to the last "@" before the path, as yarl and urllib
# read it (a raw "@" in a password included), so what is masked is what would be sent.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")


def redact_url(url: str) -> str:
    """The URL as it may be shown: `user:pass@` becomes `user:***@`, a lone `user@` (often a
    token, as in `https://TOKEN@host/`) becomes `***@`; a URL without user info is returned as
    it is. Used for every URL that leaves the checker: result messages, API reads, logs."""
    if "@" not in url:
        return url
    match = _USERINFO.match(url)
    if match is None:
        return url
    user, colon, _ = match.group(2).partition(":")
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{match.group(1)}{shown}@{url[match.end() :]}"


def redact_headers(headers: Mapping[str, str], secret: Container[str]) -> dict[str, str]:
    """The headers with the value of each one named in `secret` (lower-case names) masked."""
    return {name: MASK if name.lower() in secret else value for name, value in headers.items()}
