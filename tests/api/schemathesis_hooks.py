"""Schemathesis hooks (SCHEMATHESIS_HOOKS) of tests/api/test_api_schemathesis.py.

A JSON Schema cannot state every rule of a task definition. The OpenAPI document states the
rest in words, in the fields' descriptions; the generated requests that break one of those
rules are dropped here, so that every other valid request must be accepted. Each rule below
is one the document states, checked here independently of the code that enforces it (RE2
itself, the target policy's networks, the arithmetic of the timeout).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import re2
import schemathesis
import yarl

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BODY = 1_048_576
MAX_PROGRAM = 1000  # "compiles to at most 1000 RE2 instructions"
MAX_SEARCH_WORK = 2**32  # "instructions x max_body_bytes at most 2^32"
MASK = "***"
FRAMING = {"content-length", "transfer-encoding"}
SPEC_OPERATIONS = {("POST", "/tasks"), ("PUT", "/tasks/{id}")}
DENIED = [ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10")]


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """Keep every negative case; keep a positive one unless it breaks a rule stated in words."""
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return True
    body = case.body
    if not isinstance(body, dict):
        return True
    key = (case.operation.method.upper(), case.operation.path)
    if key in SPEC_OPERATIONS:
        return _spec_keeps_its_rules(body)
    if key == ("PATCH", "/tasks/{id}"):
        # The merged definition is checked against the stored one, which the case cannot see:
        # a patch that moves only one of interval and timeout may break "timeout < interval".
        if ("interval" in body) != ("timeout" in body):
            return False
        # The same for "not with method HEAD": the stored method or pattern is not in the case.
        if ("method" in body) != ("pattern" in body) and (
            body.get("method") == "HEAD" or isinstance(body.get("pattern"), str)
        ):
            return False
        return _spec_keeps_its_rules(body, partial=True)
    return True


def _spec_keeps_its_rules(body: dict[str, Any], *, partial: bool = False) -> bool:
    interval = body.get("interval", None if partial else 60.0)
    timeout = body.get("timeout", None if partial else DEFAULT_TIMEOUT)
    numbers = isinstance(interval, int | float) and isinstance(timeout, int | float)
    if numbers and timeout >= interval:  # "timeout: seconds; below the interval"
        return False
    pattern = body.get("pattern")
    if isinstance(pattern, str) and body.get("method") == "HEAD":
        return False  # "not with method HEAD"
    if isinstance(pattern, str):
        size = _re2_program_size(pattern)  # "RE2 regular expression"
        if size is None or size > MAX_PROGRAM:
            return False
        cap = body.get("max_body_bytes", None if partial else DEFAULT_MAX_BODY)
        if isinstance(cap, int) and size * cap > MAX_SEARCH_WORK:
            return False
    headers = body.get("headers")
    if isinstance(headers, dict):
        # "each name once, whatever its case; no Content-Length or Transfer-Encoding"
        names = [str(name).lower() for name in headers]
        if len(set(names)) < len(names) or FRAMING & set(names):
            return False
    secret = body.get("secret_headers")
    if isinstance(secret, list):
        # "names of headers (in `headers`)": a patch cannot see the stored headers.
        if partial and "headers" not in body:
            return False
        names = {str(name).lower() for name in headers} if isinstance(headers, dict) else set()
        if any(str(name).lower() not in names for name in secret):
            return False
    if isinstance(headers, dict) and MASK in headers.values():
        return False  # "***" keeps a stored secret: there is none in a new definition
    if isinstance(body.get("url"), str) and MASK in body["url"].split("@")[0]:
        return False
    url = body.get("url")
    return not isinstance(url, str) or _url_is_fetchable(url)


def _re2_program_size(pattern: str) -> int | None:
    """How many instructions RE2 compiles the pattern to; None when it does not compile."""
    options = re2.Options()
    options.log_errors = False
    try:
        return int(re2.compile(pattern.strip(), options).programsize)
    except re2.error:
        return None


def _url_is_fetchable(url: str) -> bool:
    """The URL field's description: a host name (IDNA, labels of 1-63 characters, at most 253),
    an IPv4 or bracketed IPv6 address, not percent-encoded, port 1-65535; and not a target in a
    denied network (TARGET_DENY_NETWORKS, whose defaults are above)."""
    try:
        parsed = yarl.URL(url.strip())
        host = parsed.raw_host
        _ = parsed.host  # IDNA decodes
        port = parsed.explicit_port
    except (ValueError, TypeError):
        return False
    if not host or "%" in host or port == 0:
        return False
    if ":" in host:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return not any(address in network for network in DENIED) and not _embeds_denied(address)
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or any(not 0 < len(label) <= 63 for label in labels):
        return False
    if not all(c.isascii() and (c.isalnum() or c in "-_") for c in name.replace(".", "")):
        return False
    try:  # the C library's reading of an IPv4 literal, in any spelling
        address4 = ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return True  # a name: judged after DNS
    return not any(address4 in network for network in DENIED)


def _embeds_denied(address: ipaddress.IPv6Address) -> bool:
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return any(low in network for network in DENIED)
