"""A task's URL read once, the way the probe fetches it.

Two parsers that disagree are a hole: `http://127.0.0.1:9\\@169.254.169.254/` is a URL whose
host is 169.254.169.254 for `urllib.parse` and no URL at all for yarl. So every reader of a
task URL goes through `parse_url()`: the task's validation (the API answers 422 with its
sentence), the target policy (which judges the host it returns) and the probe (which fetches
the `yarl.URL` it returns, and reads every redirect target with `redirect_target()`). What it
accepts, the probe can fetch; what it refuses never reaches a socket.

Refused, beyond what yarl itself refuses: a scheme other than http/https, no host, port 0, a
percent-encoded host (`%31%36%39.254.169.254` would go to DNS as it is, and a zone id such as
`[fe80::1%25eth0]` is not something the probe can connect to), a bracketed host that is not an
IPv6 address, and host names that can never resolve: an empty label (`a..b`), a label over 63
characters, a name over 253 characters, characters a DNS name cannot hold, and labels IDNA
refuses (invalid punycode). `URL_PATTERN` is the first gate, and the OpenAPI document shows it.

The path, query and fragment are fetched as written, like curl does: yarl reads the scheme and
the authority (an IDN host becomes its IDNA form), but its own reading of the rest would change
what the server is asked for (`?next=%2Fhome` becomes `?next=/home`, `%41` becomes `A`, `%zz`
becomes `%25zz`), so the rest is kept as it is, with only what cannot go into a request line
percent-encoded: spaces (`%20` in the path, `+` in the query, as curl and yarl both write
them), controls and non-ASCII characters as their UTF-8 bytes, and a byte of a `Location`
that was not UTF-8 (a surrogate, see http1.py) as itself.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Final

import yarl

# Characters never allowed anywhere in a task URL: ASCII and C1 controls, every kind of space
# (the URL ends at whitespace in logs and in people's heads), bidirectional controls (they
# make a URL read as another one) and the byte-order mark. Spelled without `\s`, which means
# different things to Python, ECMAScript and the fuzzer.
URL_EXCLUDED: Final = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200f\u2028-\u202f\u205f-\u206f\u3000\ufeff"
# No backslash before the path: parsers disagree on it (WHATWG reads it as '/', so
# `http://127.0.0.1:9\@169.254.169.254/` has another host there than in RFC 3986), and an
# unencoded one is not a URL character anyway.
URL_PATTERN: Final = (
    rf"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\\{URL_EXCLUDED}]+(?:[/?#][^{URL_EXCLUDED}]*)?$"
)
URL_DESCRIPTION: Final = (
    "http:// or https:// URL the checker can fetch: a host name (IDNA; labels of 1-63 letters,"
    " digits, '-' or '_'; at most 253 characters), an IPv4 address or a bracketed IPv6"
    " address, not percent-encoded; port 1-65535"
)
MAX_HOST: Final = 253
MAX_LABEL: Final = 63

_SHAPE: Final = re.compile(URL_PATTERN)
_EXCLUDED: Final = re.compile(f"[{URL_EXCLUDED}]")
_HTTP: Final = re.compile(r"^[Hh][Tt][Tt][Pp][Ss]?://")
_LABEL: Final = re.compile(r"^[a-z0-9_-]+$")
# Where the authority of an absolute or protocol-relative reference ends.
_AUTHORITY: Final = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#]*")
_NOT_PRINTABLE_ASCII: Final = re.compile(r"[^\x21-\x7e]+")


class InvalidURL(ValueError):
    """A task URL the probe could not fetch; the message is a sentence for people."""


# A task URL is read when its definition is validated, when the target policy judges it, and
# at each check (the scheduler's host, the probe's URL): kept for the next reading (a
# `yarl.URL` is immutable) while it is among the last 4,096 read, a few seconds of checks at
# 100,000 tasks a minute. Not all of them: a URL kept is about 550 bytes, and a checker of
# 100,000 tasks with their own URLs held 55 MB of them; a URL read again costs 2-9 us, a check
# about 400.
@functools.lru_cache(maxsize=1 << 12)
def parse_url(text: str) -> yarl.URL:
    """The URL the probe will fetch for `text`; InvalidURL says why there is none."""
    plain = _plain(text)
    if plain is not None:
        return plain  # what `checked_url` asks of a URL, its spelling already says (`_PLAIN`)
    if _EXCLUDED.search(text):
        raise InvalidURL("must not contain spaces or control characters")
    if not _SHAPE.match(text):
        if not _HTTP.match(text):
            raise InvalidURL("scheme must be http or https")
        if _backslash_in_authority(text):
            raise InvalidURL("must not contain a backslash before the path")
        raise InvalidURL("must name a host")
    try:
        url = _as_written(text)
    except InvalidURL:
        raise
    except (ValueError, TypeError) as exc:  # UnicodeError is a ValueError (IDNA)
        reason = str(exc)
        if "port" in reason.lower():
            raise InvalidURL("port must be a number from 1 to 65535") from None
        raise InvalidURL(f"cannot be read as a URL: {reason[:200]}") from None
    return checked_url(url)


def _plain(text: str) -> yarl.URL | None:
    """The URL `parse_url` reads from `text`, made in one step when `text` is spelled so that
    reading it leaves every part as written and passes every check as spelled (`_PLAIN`: a
    lower-case scheme and host name of labels of at most 63 characters, at most 253 in all, a
    port other than the scheme's own, a path without dot segments, a query of URL characters,
    no user info, no fragment; none of the characters the gates of `parse_url` refuse); None
    for any other text. Reading the site, the reference and joining them, then checking the
    result, was most of a cluster node's start on 100,000 task records each with its own URL
    (`bench/micro.py plain-urls`). A test holds what this makes equal to the other reading,
    part by part and refusal by refusal, over 9,000 generated URLs."""
    parts = _plain_parts(text)
    if parts is None:
        return None
    scheme, host, number, path, query = parts
    return yarl.URL.build(
        scheme=scheme, host=host, port=number, path=path, query_string=query or "", encoded=True
    )


def plain_host(text: str) -> str | None:
    """The host (`raw_host`) of the URL `parse_url` reads from `text` when `text` is plainly
    spelled (`_plain`), read from the spelling without making the URL; None for any other
    text, which `parse_url` reads as ever. Such a text is a URL the probe can fetch: a
    definition is validated (`TaskSpec`), and the target policy judges its host, without a
    `yarl.URL` made and kept (a cluster node validates 100,000 definitions at start)."""
    parts = _plain_parts(text)
    return parts[1] if parts is not None else None


def url_host(text: str) -> str:
    """The host (`raw_host`) of the URL `parse_url` reads from `text`; InvalidURL says why there
    is none. A plainly spelled text's host is read from its spelling (`plain_host`), without
    making the URL: what validating a definition and judging its target need of it."""
    host = plain_host(text)
    if host is not None:
        return host
    return parse_url(text).raw_host or ""


_PlainParts = tuple[str, str, int | None, str, str | None]
# The last text read and its parts: a definition's URL is asked about when it is validated and
# again when the target policy judges it, a moment later (1.8 -> 1.1 us for both). One pair,
# replaced whole (a thread reading it meanwhile sees the old pair or the new one).
_last_plain: tuple[str, _PlainParts | None] = ("", None)


def _plain_parts(text: str) -> _PlainParts | None:
    """Scheme, host, port, path and query of a plainly spelled URL (`_plain`); else None."""
    global _last_plain
    last_text, last_parts = _last_plain
    if text == last_text:
        return last_parts
    parts = _read_plain(text)
    _last_plain = (text, parts)
    return parts


def _read_plain(text: str) -> _PlainParts | None:
    found = _PLAIN.match(text)
    if found is None:
        return None
    scheme, host, port, path, query = found.groups()
    if "/." in path or "xn--" in host or len(host) > MAX_HOST:
        return None  # dot segments to remove; IDNA labels to check; a name too long
    number = int(port) if port is not None else None
    if number is not None and (number > 65535 or number == _DEFAULT_PORTS[scheme]):
        return None  # refused, or left implicit by yarl's reading
    return scheme, host, number, path, query


# A DNS label (at most 63 characters) of letters, digits and inner hyphens, in lower case.
_LDH_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
# Path and query characters a request line carries as they are (RFC 3986 pchar, and `/` and
# `?` in the query): nothing to percent-encode, and `%` is kept as written either way.
_PCHARS: Final = r"!$&'()*+,;=:@a-zA-Z0-9._~%/-"
_PLAIN: Final = re.compile(
    rf"^(https?)://({_LDH_LABEL}(?:\.{_LDH_LABEL})*)(?::([1-9][0-9]{{0,4}}))?"
    rf"(/[{_PCHARS}]*)(?:\?([{_PCHARS}?]+))?\Z"
)
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def checked_url(url: yarl.URL) -> yarl.URL:
    """`url` itself when the probe can fetch it (a redirect target, say); else InvalidURL."""
    if url.scheme not in ("http", "https"):
        raise InvalidURL("scheme must be http or https")
    host = url.raw_host
    if not url.absolute or not host:
        raise InvalidURL("must name a host")
    if url.explicit_port == 0:
        raise InvalidURL("port must be a number from 1 to 65535")
    problem = host_problem(host)
    if problem is not None:
        raise InvalidURL(problem)
    if "xn--" in host:
        try:
            _ = url.host  # decodes the IDNA labels
        except UnicodeError:
            raise InvalidURL(f"the host name {host[:80]!r} is not valid IDNA") from None
    return url


def redirect_target(base: yarl.URL, location: str) -> yarl.URL:
    """Where a `Location` header sends the probe from `base`; InvalidURL when nowhere it can
    fetch. A protocol-relative location takes the scheme of `base`."""
    if _backslash_in_authority(location):
        raise InvalidURL("must not contain a backslash before the path")
    if location.startswith("//"):
        location = f"{base.scheme}:{location}"
    try:
        target = base.join(_as_written(location))
    except InvalidURL:
        raise
    except (ValueError, TypeError) as exc:
        raise InvalidURL(f"cannot be read as a URL: {str(exc)[:200]}") from None
    return checked_url(target)


def _backslash_in_authority(text: str) -> bool:
    """Whether an absolute or protocol-relative URL has a backslash in its authority, where
    parsers disagree (WHATWG reads it as '/', RFC 3986 as part of the user info)."""
    found = _AUTHORITY.match(text)
    return found is not None and "\\" in found.group()


def _as_written(reference: str) -> yarl.URL:
    """`reference` (absolute, or relative without an authority) with yarl's reading of the
    scheme and authority and the path, query and fragment as written (module docstring)."""
    match = _AUTHORITY.match(reference)
    rest = reference[match.end() :] if match else reference
    path, mark, after = rest.partition("?") if "?" in rest.split("#", 1)[0] else (rest, "", "")
    written = _reference(_encoded(path, "%20") + mark + _encoded(after, "+"))
    if match is None:
        return written
    authority = yarl.URL(match.group())
    # Judged before joining: yarl's join re-spells an invalid bracketed host (`[1:2]`) as a
    # host and a port.
    problem = host_problem(authority.raw_host) if authority.raw_host else None
    if problem is not None:
        raise InvalidURL(problem)
    return authority.join(written)


def _reference(text: str) -> yarl.URL:
    """The path, query and fragment in `text` (already as a request line carries them) as a
    relative reference. A path that starts with `//` read alone would be a network-path
    reference, its first segment a host of its own: `http://h//169.254.169.254/x` was fetched
    from 169.254.169.254, where curl asks h for `//169.254.169.254/x`. Such a path is read
    behind an authority, where it can only be a path."""
    if not text.startswith("//"):
        return yarl.URL(text, encoded=True)
    behind = yarl.URL(f"http://h{text}", encoded=True)
    return yarl.URL.build(
        path=behind.raw_path,
        query_string=behind.raw_query_string,
        fragment=behind.raw_fragment,
        encoded=True,
    )


def _encoded(part: str, space: str) -> str:
    return _NOT_PRINTABLE_ASCII.sub(lambda found: _escape(found.group(), space), part)


def _escape(characters: str, space: str) -> str:
    return "".join(
        space
        if char == " "
        else "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogateescape"))
        for char in characters
    )


@functools.lru_cache(maxsize=1 << 12)
def host_problem(host: str) -> str | None:
    """Why the probe could never reach `host` (yarl's raw, IDNA-encoded host), or None.
    Kept for the next question: a URL read in three steps has its host asked about twice
    (`_as_written`, then `checked_url`)."""
    if "%" in host:
        return "the host must not be percent-encoded or carry a zone id"
    if ":" in host:  # yarl took it from between brackets
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"[{host[:60]}] is not an IPv6 address"
        return None
    name = host[:-1] if host.endswith(".") else host
    if len(name) > MAX_HOST:
        return f"the host name is longer than {MAX_HOST} characters"
    for label in name.split("."):
        if not label:
            return f"the host name {host[:80]!r} has an empty label"
        if len(label) > MAX_LABEL:
            return f"the host name has a label longer than {MAX_LABEL} characters"
        if not _LABEL.match(label):
            return f"the host name {host[:80]!r} holds characters a DNS name cannot"
    return None
