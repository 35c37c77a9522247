"""The probe answers like curl: one table of target behaviours, each fetched by both engines
(a fresh connection through http1, a pooled one through aiohttp) and by Debian's curl.

Each row is a behaviour served by nginx or by a raw server that misbehaves on purpose (the
exact bytes are in the row). All three clients' answers are read into the same `Outcome`
(final status, final URL, redirects followed, body bytes, pattern outcome, class of failure)
and must be equal, except where the row names a difference listed in docs/api.md ("Where the
probe differs from curl"): then curl's outcome (or the keep-alive engine's) must be the fresh
engine's with exactly the fields the row gives, so a difference that goes away (or changes)
fails here, and so does a documented one that no row shows.

curl runs as people run it against a site: `-L --max-redirs N` (the task's limit),
`--compressed` (the probe decodes bodies too), `--cacert` with the test CA (the probe trusts it
through SSL_CERT_FILE), `--resolve` for the test names (the probe gets the same mapping as its
`dns_lookup`), `-k` where the task does not verify TLS, `--head` for HEAD and
`--data-binary` for a POST body. Its pattern outcome is the task's RE2 pattern searched in what
it downloaded, by the probe's own rules (no body, no search); its failure class comes from its
exit code, or, when it exits 0, from the probe's own `judge()` of status and pattern.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from checker.misbehaving import CLOSE, HOLD, MisbehavingServer, Reply, redirect, response
from checker.nginx_target import NGINX, Nginx
from checker.pki import IDN_ACE, IDN_HOST, PKI, SNI_A, SNI_B, make_pki
from yarl import URL

from checker_common.contract import CheckResult, ErrorKind, PatternResult
from devstack import free_port
from periodic_checker.http1 import content_charset
from periodic_checker.probe import Prober, body_charset, judge
from periodic_checker.search import search_body
from periodic_checker.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[2]
CURL = shutil.which("curl")
TASK = uuid.UUID("00000000-0000-4000-8000-0000000000c1")
# Names both clients resolve to 127.0.0.1: the probe through its lookup, curl with --resolve.
TEST_NAMES = (IDN_ACE, SNI_A, SNI_B, "localhost")


# --- what each client saw ----------------------------------------------------------------


class Outcome(NamedTuple):
    status: int | None
    final_url: str | None
    redirects: int
    bytes: int
    pattern: str | None  # "match", "no_match" or None (no search)
    failure: str  # an ErrorKind, or "ok"


def same_url(text: str | None) -> str | None:
    """A URL spelled the way yarl spells it, so two clients' spellings compare."""
    if not text:
        return None
    try:
        return str(URL(text))
    except ValueError:
        return text


def probe_outcome(result: CheckResult) -> Outcome:
    return Outcome(
        status=result.status,
        final_url=same_url(result.final_url),
        redirects=result.redirects,
        bytes=result.bytes,
        pattern=result.pattern_search.value if result.pattern_search is not None else None,
        failure=result.error.kind.value if result.error is not None else "ok",
    )


# curl's exit codes (man curl, "EXIT CODES") as the probe's error kinds.
CURL_EXIT: dict[int, ErrorKind] = {
    1: ErrorKind.INVALID_RESPONSE,  # unsupported protocol (a redirect to one, HTTP/0.9)
    3: ErrorKind.INVALID_RESPONSE,  # malformed URL (a redirect to one)
    6: ErrorKind.DNS,
    7: ErrorKind.CONNECT,
    8: ErrorKind.INVALID_RESPONSE,  # weird server reply
    18: ErrorKind.INVALID_RESPONSE,  # partial file: the body ended early
    27: ErrorKind.INVALID_RESPONSE,  # "out of memory": curl 7.88's word for a 100 KiB header
    28: ErrorKind.TIMEOUT,
    35: ErrorKind.TLS,  # handshake failed
    47: ErrorKind.TOO_MANY_REDIRECTS,
    52: ErrorKind.INVALID_RESPONSE,  # empty reply
    56: ErrorKind.INVALID_RESPONSE,  # failure receiving (a broken chunk, a reset)
    60: ErrorKind.TLS,  # certificate not accepted
    61: ErrorKind.INVALID_RESPONSE,  # bad content encoding
    100: ErrorKind.INVALID_RESPONSE,  # response headers too large (newer curl: 8 or 56)
}
CURL_FORMAT = "%{http_code}\\n%{num_redirects}\\n%{content_type}\\n%{url_effective}"


def curl_outcome(spec: TaskSpec, exit_code: int, written: str, body: bytes, stderr: str) -> Outcome:
    code, redirects, content_type, url = written.split("\n", 3)
    status = int(code) or None
    pattern = None
    if (
        exit_code == 0
        and spec.compiled_pattern is not None
        and spec.method != "HEAD"
        and status is not None
        and status >= 200
        and status not in (204, 304)
    ):  # an empty body is searched too (a blank page fails a pattern that must be present)
        charset = body_charset(content_charset(content_type))
        pattern = "match" if search_body(spec.compiled_pattern, body, charset) else "no_match"
    if exit_code == 0:
        assert status is not None
        verdict = judge(
            spec,
            status,
            truncated=False,
            pattern=PatternResult(pattern) if pattern is not None else None,
        )
        failure = verdict.kind.value if verdict is not None else "ok"
    else:
        kind = CURL_EXIT.get(exit_code)
        failure = kind.value if kind is not None else f"curl exit {exit_code}: {stderr.strip()}"
    return Outcome(
        status=status,
        final_url=same_url(url),
        redirects=int(redirects),
        bytes=0 if spec.method == "HEAD" else len(body),
        pattern=pattern,
        failure=failure,
    )


# --- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Differs:
    """A documented difference: curl's outcome (or the keep-alive engine's) is the fresh
    engine's with these fields. "{raw}" in a URL is the raw server's http base."""

    name: str  # its entry in docs/api.md, "Where the probe differs from curl"
    curl: dict[str, Any] = field(default_factory=dict)
    keepalive: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    id: str
    where: str  # which server (Sites.url)
    path: str
    reply: Reply | None  # what the raw server sends at `path` (None: nginx or a built-in)
    status: int | None  # what the probe's answer must hold, beyond agreeing with curl
    failure: str
    task: dict[str, Any] = field(default_factory=dict)
    differs: tuple[Differs, ...] = ()

    def spec(self, url: str, **extra: Any) -> TaskSpec:
        fields: dict[str, Any] = {"timeout": 5.0, **self.task, **extra}
        return TaskSpec(name=f"curl agreement {self.id}", url=url, interval=None, **fields)


OK, STATUS, PATTERN = "ok", "status", "pattern"
INVALID, TLS, TIMEOUT = "invalid_response", "tls", "timeout"
TOO_MANY = "too_many_redirects"


Differences = Differs | tuple[Differs, ...]


def raw(
    id: str,
    data: bytes,
    status: int | None,
    failure: str,
    *,
    then: Any = None,
    where: str = "raw",
    differs: Differences = (),
    **task: Any,
) -> Row:
    """A row served by the raw server: `data` as it is, at /row/ID."""
    reply = Reply(data) if then is None else Reply(data, then)
    return Row(id, where, f"/row/{id}", reply, status, failure, task, _tuple(differs))


def at(
    id: str,
    where: str,
    path: str,
    status: int | None,
    failure: str,
    *,
    differs: Differences = (),
    **task: Any,
) -> Row:
    """A row served by nginx, by a built-in route of the raw server, or by nobody."""
    return Row(id, where, path, None, status, failure, task, _tuple(differs))


def _tuple(differs: Differences) -> tuple[Differs, ...]:
    return (differs,) if isinstance(differs, Differs) else differs


def chunked(*pieces: bytes, trailers: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(pieces)
        + b"0\r\n"
        + trailers
        + b"\r\n"
    )


HELLO = b"hello world"
LANDED = "^landed GET"
FORMS = {  # the four spellings of a redirect target
    "relative": "/land/{code}-relative?x=1",
    "absolute": "{origin}/land/{code}-absolute",
    "protocol-relative": "//{authority}/land/{code}-protocol-relative",
    "percent-encoded": "/land/caf%C3%A9%20{code}?q=a%2Fb%3D%26",
}
REDIRECTS = [
    raw(
        f"{code}-{form}",
        redirect(code, location.replace("{code}", str(code))),
        200,
        OK,
        pattern=LANDED,
    )
    for code in (301, 302, 303, 307, 308)
    for form, location in FORMS.items()
]
# After a POST: 301, 302 and 303 go on as GET without the body; 307 and 308 keep both.
POST_REDIRECTS = [
    raw(
        f"{code}-after-post",
        redirect(code, f"/land/after-post-{code}"),
        200,
        OK,
        method="POST",
        body="ping",
        pattern=(r"^landed GET .* \(0 bytes" if code < 307 else r"^landed POST .* \(4 bytes"),
    )
    for code in (301, 302, 303, 307, 308)
]
# Documented differences (docs/api.md, "Where the probe differs from curl").
LOOP = "loop-stops-at-the-first-repeat"
EVERY_3XX = "curl-follows-every-3xx"
UNFOLLOWABLE = "unfollowable-redirect-target"
REFUSED_HEAD = "status-of-a-refused-head"
DUPLICATE_LENGTH = "duplicate-content-length"
CHUNKED_AND_LENGTH = "chunked-with-content-length"
UNASKED_101 = "unasked-101"
FOLDING = "curl-does-not-unfold-framing-headers"
SURPLUS = "keepalive-bytes-after-the-body"
SAME_READ = "keepalive-broken-body-in-the-first-read"
HEAD_LIMIT = "keepalive-head-limit"
LANDED_300 = {"status": 200, "redirects": 1, "bytes": 55}  # "landed GET /land/30x on ..."

MORE_REDIRECTS = [
    at("loop", "raw", "/loop/a", 302, TOO_MANY,
       differs=Differs(LOOP, curl={"redirects": 10, "final_url": "{raw}/loop/a"})),
    raw("to-itself", redirect(302, "/row/to-itself"), 302, TOO_MANY,
        differs=Differs(LOOP, curl={"redirects": 10})),
    raw("query-only", redirect(302, "?page=2"), 302, TOO_MANY,
        differs=Differs(LOOP, curl={"redirects": 10})),
    at("chain-at-the-limit", "raw", "/chain/2", 200, OK, max_redirects=3),
    at("chain-over-the-limit", "raw", "/chain/3", 302, TOO_MANY, max_redirects=3),
    at("limit-zero", "raw", "/chain/0", 302, TOO_MANY, max_redirects=0),
    at("not-followed", "raw", "/chain/0", 302, OK, follow_redirects=False),
    raw("300-with-location", redirect(300, "/land/300"), 300, OK,
        differs=Differs(EVERY_3XX, curl={**LANDED_300, "final_url": "{raw}/land/300"})),
    raw("304-with-location", redirect(304, "/land/304"), 304, OK,
        differs=Differs(EVERY_3XX, curl={**LANDED_300, "final_url": "{raw}/land/304"})),
    raw("305-with-location", redirect(305, "/land/305"), 305, OK,
        differs=Differs(EVERY_3XX, curl={**LANDED_300, "final_url": "{raw}/land/305"})),
    raw("no-location", response("302 Found"), 302, OK),
    raw("fragment", redirect(302, "/land/fragment#part"), 200, OK),
    raw("dot-segments", redirect(302, "/a/b/../../land/dots"), 200, OK),
    raw("path-relative", redirect(302, "../land/path-relative"), 200, OK),
    # curl writes percent-escapes in lower case (RFC 3986 reads either the same).
    raw("raw-utf8", redirect(302, "/land/café"), 200, OK, pattern="(?i)caf%C3%A9 "),
    raw("raw-latin1", redirect(302, "/land/café").replace(b"caf\xc3\xa9", b"caf\xe9"), 200, OK,
        pattern="(?i)caf%E9 "),
    raw("space", redirect(302, "/land/a b?c d"), 200, OK, pattern=r"a%20b\?c\+d "),
    raw("characters-a-url-should-not-hold", redirect(302, '/land/a\\b"c<d>e^f`g{h|i}j[k]?x="<>'),
        200, OK, pattern=r'/land/a\\b"c<d>e\^f`g\{h\|i\}j\[k\]\?x="<> '),
    raw("to-https", redirect(302, "https://localhost:{raw-tls}/land/to-https"), 200, OK),
    raw("to-file-scheme", redirect(302, "file:///etc/passwd"), 302, INVALID,
        differs=Differs(UNFOLLOWABLE, curl={"redirects": 1, "final_url": "file:///etc/passwd"})),
    raw("to-bad-port", redirect(302, "http://127.0.0.1:99999/"), 302, INVALID,
        differs=Differs(UNFOLLOWABLE, curl={"redirects": 1})),
    raw("to-ipv6", redirect(302, "http://[::1]:{raw6}/land/to-ipv6"), 200, OK),
    raw("to-idn-utf8", redirect(302, f"http://{IDN_HOST}:{{raw}}/land/to-idn"), 200, OK),
    raw("to-idn-ace", redirect(302, f"http://{IDN_ACE}:{{raw}}/land/to-idn"), 200, OK),
    raw("two-locations", redirect(302, "/land/first").replace(
        b"\r\nContent", b"\r\nLocation: /land/second\r\nContent"), 200, OK, pattern="first"),
    at("task-url-percent-encoded", "raw", "/land/a%2Fb%41?q=%2F%3F%7e", 200, OK,
       pattern=r"a%2Fb%41\?q=%2F%3F%7e"),
    at("task-url-double-slash", "raw", "//land/a//b?q=1", 200, OK,
       pattern=r"landed GET //land/a//b\?q=1 on 127\.0\.0\.1"),
    at("nginx-301", "nginx", "/r/301", 200, OK),
    at("nginx-302", "nginx", "/r/302", 200, OK),
    at("nginx-303", "nginx", "/r/303", 200, OK),
    at("nginx-307", "nginx", "/r/307", 200, OK),
    at("nginx-308", "nginx", "/r/308", 200, OK),
    at("nginx-directory-slash", "nginx", "/dir", 200, OK, pattern="index of dir"),
    at("nginx-to-https", "nginx", "/r/to-https", 200, OK, pattern="hello nginx"),
]  # fmt: skip
BODIES = [
    raw("chunked-extensions", chunked(b"5;name=value\r\nhello\r\n", b'6;q="a;b";x\r\n world\r\n'),
        200, OK, pattern="hello world"),
    raw("chunked-trailers", chunked(b"b\r\nhello world\r\n",
                                    trailers=b"X-Checksum: abc\r\nX-More: 1\r\n"),
        200, OK, pattern="hello world"),
    raw("chunked-extensions-and-trailers",
        chunked(b"5;a=1\r\nhello\r\n", b"6;b\r\n world\r\n", trailers=b"Expires: never\r\n"),
        200, OK, pattern="hello world"),
    raw("chunked-hex-case-and-zeros", chunked(b"000B\r\nhello world\r\n", b"0a\r\n0123456789\r\n"),
        200, OK, pattern="world0123"),
    raw("chunked-one-byte-chunks", chunked(*(b"1\r\n%c\r\n" % c for c in b"x" * 300)), 200, OK),
    raw("chunked-cut", chunked(b"5\r\nhello\r\n")[:-5], 200, INVALID, then=CLOSE),
    raw("chunked-bad-size", chunked(b"zz\r\nhello\r\n"), 200, INVALID, then=CLOSE,
        differs=Differs(SAME_READ, keepalive={"status": None})),
    raw("chunked-and-content-length",
        chunked(b"5\r\nhello\r\n").replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n", 1),
        None, INVALID, then=CLOSE,
        differs=Differs(CHUNKED_AND_LENGTH, curl={"status": 200, "bytes": 5, "failure": OK})),
    raw("length-too-short", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello world", 200, OK,
        then=CLOSE, differs=Differs(SURPLUS, keepalive={"status": None, "bytes": 0,
                                                        "failure": INVALID})),
    raw("length-too-long-then-close", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
        200, INVALID, then=CLOSE),
    raw("length-too-long-then-silence", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
        200, TIMEOUT, then=HOLD, timeout=1.0),
    raw("length-zero-then-more", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nsurplus", 200,
        OK, then=CLOSE, differs=Differs(SURPLUS, keepalive={"status": None, "failure": INVALID})),
    raw("length-twice-same",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", None, INVALID,
        differs=Differs(DUPLICATE_LENGTH, curl={"status": 200, "bytes": 5, "failure": OK})),
    raw("length-twice-different",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello", None, INVALID,
        then=CLOSE, differs=Differs(DUPLICATE_LENGTH, curl={"status": 200, "bytes": 5})),
    raw("length-not-a-number", b"HTTP/1.1 200 OK\r\nContent-Length: five\r\n\r\nhello", None,
        INVALID, then=CLOSE, differs=Differs(REFUSED_HEAD, curl={"status": 200})),
    raw("ended-by-close", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n" + HELLO, 200,
        OK, then=CLOSE, pattern="world"),
    raw("ended-by-close-never", b"HTTP/1.1 200 OK\r\n\r\n" + HELLO, 200, TIMEOUT, then=HOLD,
        timeout=1.0),
    raw("http10-length", response("200 OK", HELLO, version="1.0"), 200, OK, then=CLOSE),
    raw("http10-ended-by-close", b"HTTP/1.0 200 OK\r\n\r\n" + HELLO, 200, OK, then=CLOSE),
    raw("http10-keep-alive", response("200 OK", HELLO, version="1.0",
                                      headers=("Connection: keep-alive",)), 200, OK, then=HOLD),
    raw("http10-chunked-ignored",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 200,
        OK, then=CLOSE),
    raw("http09", b"hello world\n", None, INVALID, then=CLOSE),
    raw("empty-reply", b"", None, INVALID, then=CLOSE),
    raw("no-reason-phrase", b"HTTP/1.1 200\r\nContent-Length: 5\r\n\r\nhello", 200, OK),
    raw("bare-lf-lines", b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello", 200, OK),
    raw("status-999", response("999 Odd", HELLO), 999, STATUS),
    at("nginx-gzip-chunked", "nginx", "/big.txt", 200, OK, pattern="line 002999"),
    at("nginx-page", "nginx", "/page.html", 200, OK, pattern="hello nginx"),
    at("nginx-404", "nginx", "/missing", 404, STATUS),
    raw("gzip-corrupt", response("200 OK", b"\x1f\x8b\x08\x00 not gzip at all",
                                 headers=("Content-Encoding: gzip",)), 200, INVALID),
    raw("coding-unknown", response("200 OK", HELLO, headers=("Content-Encoding: compress",)),
        200, INVALID),
]  # fmt: skip
INTERIM = [
    raw("100-continue", b"HTTP/1.1 100 Continue\r\n\r\n" + response("200 OK", HELLO), 200, OK),
    raw("102-then-103-then-200",
        b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload"
        b"\r\n\r\n" + response("200 OK", HELLO), 200, OK),
    raw("1xx-then-close", b"HTTP/1.1 100 Continue\r\n\r\n", None, INVALID, then=CLOSE,
        differs=Differs(REFUSED_HEAD, curl={"status": 100})),
    raw("101-unasked", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\n", 101, STATUS, then=CLOSE,
        differs=Differs(UNASKED_101, curl={"failure": INVALID})),
]  # fmt: skip
HEAD = [
    at("head-nginx", "nginx", "/page.html", 200, OK, method="HEAD"),
    raw("head-length-without-body", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 200,
        OK, then=HOLD, method="HEAD"),
    raw("head-chunked-without-body", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        200, OK, then=HOLD, method="HEAD"),
    at("head-redirects", "raw", "/chain/2", 200, OK, method="HEAD"),
    raw("204-then-silence", b"HTTP/1.1 204 No Content\r\n\r\n", 204, OK, then=HOLD),
    raw("304-then-silence", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n", 304, OK,
        then=HOLD, pattern="x"),
]  # fmt: skip
LONG = "x" * 16_000
HEADERS = [
    raw("folded-header", b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n two\r\nContent-Length: 5\r\n"
        b"\r\nhello", 200, OK),
    raw("folded-location", b"HTTP/1.1 302 Found\r\nLocation:\r\n /land/folded\r\n"
        b"Content-Length: 0\r\n\r\n", 200, OK,
        differs=Differs(FOLDING, curl={"status": 302, "final_url": "{raw}/row/folded-location",
                                       "redirects": 0, "bytes": 0})),
    raw("folded-content-length", b"HTTP/1.1 200 OK\r\nContent-Length:\r\n 5\r\n\r\nhello", 200,
        OK, differs=Differs(FOLDING, curl={"bytes": 0, "failure": INVALID})),
    raw("nul-in-header", b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
        None, INVALID, then=CLOSE, differs=Differs(REFUSED_HEAD, curl={"status": 200})),
    raw("header-16k", response("200 OK", HELLO, headers=(f"X-Long: {LONG}",)), 200, OK),
    raw("header-120k", response("200 OK", HELLO, headers=("X-Long: " + "x" * 120_000,)), None,
        INVALID, then=CLOSE, differs=Differs(REFUSED_HEAD, curl={"status": 200})),
    raw("headers-400k", response("200 OK", HELLO, headers=tuple(
        f"X-Long-{n}: {LONG}" for n in range(25))), None, INVALID, then=CLOSE,
        differs=(Differs(REFUSED_HEAD, curl={"status": 200}),
                 Differs(HEAD_LIMIT, keepalive={"status": 200, "bytes": 11, "failure": OK}))),
    raw("head-of-a-million-bytes", response("200 OK", HELLO, headers=tuple(
        f"X-Many-{n:05d}: {'y' * 40}" for n in range(20_000))), None, INVALID, then=CLOSE,
        differs=Differs(REFUSED_HEAD, curl={"status": 200})),
    raw("headers-200", response("200 OK", HELLO, headers=tuple(
        f"X-Many-{n}: {n}" for n in range(200))), 200, OK,
        differs=Differs(HEAD_LIMIT, keepalive={"status": None, "bytes": 0, "failure": INVALID})),
    raw("header-without-colon", b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 5\r\n"
        b"\r\nhello", None, INVALID, differs=Differs(REFUSED_HEAD, curl={"status": 200})),
    raw("header-space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
        200, OK, then=CLOSE),
]  # fmt: skip
HOSTS = [
    at("ipv6-nginx", "nginx6", "/page.html", 200, OK, pattern="hello nginx"),
    at("ipv6-raw", "raw6", "/land/ipv6", 200, OK, pattern=r"on \[::1\]:"),
    at("nginx-to-ipv6", "nginx", "/r/to-ipv6", 200, OK, pattern="hello nginx"),
    at("idn-nginx", "nginx-idn", "/", 200, OK, pattern=f"the IDN host {IDN_ACE}"),
    at("idn-raw", "raw-idn", "/land/idn", 200, OK, pattern=f"on {IDN_ACE}:"),
    at("idn-https", "raw-idn-tls", "/land/idn", 200, OK, pattern=f"on {IDN_ACE}:"),
    at("nginx-to-idn", "nginx", "/r/to-idn", 200, OK, pattern="the IDN host"),
]
TLS_ROWS = [
    at("sni-a", "sni-a", "/", 200, OK, pattern=f"the site of {SNI_A}"),
    at("sni-b", "sni-b", "/", 200, OK, pattern=f"the site of {SNI_B}"),
    at("sni-ip-literal", "sni", "/page.html", 200, OK, pattern="hello nginx"),
    at("sni-localhost-default", "sni-localhost", "/page.html", 200, OK),
    at("raw-https", "raw-tls", "/land/https", 200, OK),
    at("expired", "expired", "/", None, TLS),
    at("expired-not-verified", "expired", "/", 200, OK, verify_tls=False),
    at("self-signed", "self-signed", "/", None, TLS),
    at("self-signed-not-verified", "self-signed", "/", 200, OK, verify_tls=False),
    at("wrong-name", "wrong-name", "/", None, TLS),
    at("wrong-name-not-verified", "wrong-name", "/", 200, OK, verify_tls=False),
    at("tls-1.0-only", "tls1.0", "/", None, TLS),
    at("tls-1.0-only-not-verified", "tls1.0", "/", None, TLS, verify_tls=False),
    at("tls-1.2-only", "tls1.2", "/", 200, OK),
    at("tls-1.3-only", "tls1.3", "/", 200, OK),
    at("plain-http-to-tls-port", "sni-as-http", "/", 400, STATUS),
    at("tls-to-plain-port", "nginx-as-https", "/", None, TLS),
]
FAILURES = [
    at("refused", "closed", "/", None, "connect"),
    at("no-such-name", "dns", "/", None, "dns"),
    at("silent", "silent", "/", None, TIMEOUT, timeout=1.0),
    at("silent-tls", "silent-tls", "/", None, TIMEOUT, timeout=1.0),
]
ROWS = [*REDIRECTS, *POST_REDIRECTS, *MORE_REDIRECTS, *BODIES, *INTERIM, *HEAD, *HEADERS,
        *HOSTS, *TLS_ROWS, *FAILURES]  # fmt: skip


# --- servers -----------------------------------------------------------------------------


def _silent_listener() -> socket.socket:
    """A socket that accepts connections (the kernel's backlog) and never says a word."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


@dataclass
class Sites:
    pki: PKI
    nginx: Nginx
    raw: MisbehavingServer
    silent: int
    closed: int

    def url(self, where: str, path: str) -> str:
        nginx, raw = self.nginx.port, self.raw
        bases = {
            "raw": f"http://127.0.0.1:{raw.http}",
            "raw-tls": f"https://localhost:{raw.https}",
            "raw6": f"http://[::1]:{raw.http6}",
            "raw-idn": f"http://{IDN_HOST}:{raw.http}",
            "raw-idn-tls": f"https://{IDN_HOST}:{raw.https}",
            "raw-as-https": f"https://127.0.0.1:{raw.http}",
            "nginx": f"http://127.0.0.1:{nginx['http']}",
            "nginx6": f"http://[::1]:{nginx['http']}",
            "nginx-idn": f"http://{IDN_HOST}:{nginx['http']}",
            "sni": f"https://127.0.0.1:{nginx['sni']}",
            "sni-a": f"https://{SNI_A}:{nginx['sni']}",
            "sni-b": f"https://{SNI_B}:{nginx['sni']}",
            "sni-localhost": f"https://localhost:{nginx['sni']}",
            "sni-as-http": f"http://127.0.0.1:{nginx['sni']}",
            "nginx-as-https": f"https://127.0.0.1:{nginx['http']}",
            "closed": f"http://127.0.0.1:{self.closed}",
            "dns": "http://no-such-host.invalid",
            "silent": f"http://127.0.0.1:{self.silent}",
            "silent-tls": f"https://127.0.0.1:{self.silent}",
        }
        for name in ("expired", "self-signed", "wrong-name", "tls1.0", "tls1.2", "tls1.3"):
            bases[name] = f"https://localhost:{nginx[name]}"
        return bases[where] + path

    def ports(self) -> list[int]:
        return [*self.nginx.port.values(), self.raw.http, self.raw.https]

    def curl_resolve(self) -> list[str]:
        """--resolve for every test name on every port, as the probe's lookup maps them."""
        pairs = [(name, port) for name in TEST_NAMES for port in self.ports()]
        return [arg for name, port in pairs for arg in ("--resolve", f"{name}:{port}:127.0.0.1")]


def test_names_lookup(
    host: str, port: int, family: int, type: int, proto: int, flags: int
) -> list[Any]:
    """getaddrinfo() with the test names (and localhost) on 127.0.0.1."""
    if host in TEST_NAMES:
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
    return socket.getaddrinfo(host, port, family, type, proto, flags)


test_names_lookup.__test__ = False  # type: ignore[attr-defined]


def fill(template: str, sites: Sites) -> str:
    return (
        template.replace("{raw-tls}", str(sites.raw.https))
        .replace("{raw6}", str(sites.raw.http6))
        .replace("{raw}", str(sites.raw.http))
    )


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    if CURL is None or NGINX is None:
        pytest.skip("needs Debian's curl and nginx-light (scripts/bootstrap.sh installs both)")
    pki = make_pki(tmp_path_factory.mktemp("curl-pki"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, pki.leaf("good")))
    silent = _silent_listener()
    # Placeholders for ports are filled in once the servers have theirs (below).
    routes: dict[str, Reply] = {}
    with (
        Nginx(tmp_path_factory.mktemp("nginx"), pki) as nginx,
        MisbehavingServer(routes, tls=context) as server,
    ):
        found = Sites(pki, nginx, server, silent.getsockname()[1], free_port())
        for row in ROWS:
            if row.reply is not None:
                data = fill(row.reply.data.decode("latin-1"), found).encode("latin-1")
                routes[row.path] = Reply(data, row.reply.then)
        try:
            yield found
        finally:
            silent.close()


@pytest.fixture
async def prober(sites: Sites, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Prober]:
    # OpenSSL reads SSL_CERT_FILE when the prober loads the trust store in start().
    monkeypatch.setenv("SSL_CERT_FILE", str(sites.pki.ca))
    async with Prober(dns_lookup=test_names_lookup) as started:
        yield started


# --- running curl --------------------------------------------------------------------------


async def run_curl(spec: TaskSpec, sites: Sites, tmp: Path) -> Outcome:
    body_file = tmp / "curl-body"
    args = [
        "-q", "--silent", "--show-error", "--globoff", "--noproxy", "*",
        "--output", str(body_file), "--write-out", CURL_FORMAT,
        "--max-time", f"{spec.timeout:g}", "--compressed", "--cacert", str(sites.pki.ca),
        *sites.curl_resolve(),
    ]  # fmt: skip
    if spec.follow_redirects:
        args += ["--location", "--max-redirs", str(spec.max_redirects)]
    if not spec.verify_tls:
        args.append("--insecure")
    if spec.method == "HEAD":
        args.append("--head")
    elif spec.body is not None:
        args += ["--data-binary", spec.body]
    if spec.method not in ("GET", "HEAD", "POST"):
        args += ["--request", spec.method]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    assert CURL is not None
    process = await asyncio.create_subprocess_exec(
        CURL, *args, spec.url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), spec.timeout + 30)
    assert process.returncode is not None
    body = body_file.read_bytes() if body_file.exists() else b""
    return curl_outcome(spec, process.returncode, out.decode(), body, err.decode())


# --- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
async def test_the_probe_answers_like_curl(
    row: Row, sites: Sites, prober: Prober, tmp_path: Path
) -> None:
    url = sites.url(row.where, row.path)
    spec = row.spec(url)
    fresh, pooled, curl = await asyncio.gather(
        prober.check(TASK, spec),
        prober.check(TASK, row.spec(url, keepalive=True)),
        run_curl(spec, sites, tmp_path),
    )
    seen = {
        "fresh": probe_outcome(fresh),
        "keepalive": probe_outcome(pooled),
        "curl": curl,
    }
    described = "\n".join(f"  {who:9} {outcome}" for who, outcome in seen.items())
    errors = f"  fresh: {fresh.error}\n  keepalive: {pooled.error}"
    fresh_seen = seen["fresh"]
    want_keepalive, want_curl = fresh_seen, fresh_seen
    base = sites.url("raw", "")
    for differs in row.differs:
        keepalive, curl = filled(differs.keepalive, base), filled(differs.curl, base)
        changed = [k for k, v in {**keepalive, **curl}.items() if getattr(fresh_seen, k) != v]
        assert changed, f"{differs.name} is listed for this row but changes nothing"
        want_keepalive = want_keepalive._replace(**keepalive)
        want_curl = want_curl._replace(**curl)
    assert seen["keepalive"] == want_keepalive, f"the engines disagree:\n{described}\n{errors}"
    assert seen["curl"] == want_curl, f"curl disagrees:\n{described}\n{errors}"
    assert (fresh_seen.status, fresh_seen.failure) == (row.status, row.failure), (
        f"all agree, but not on what the row expects:\n{described}\n{errors}"
    )


def filled(fields: dict[str, Any], raw_base: str) -> dict[str, Any]:
    return {
        name: same_url(value.replace("{raw}", raw_base)) if name == "final_url" else value
        for name, value in fields.items()
    }


def the_section() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    return text.split("## Where the probe differs from curl", 1)[1].split("\n## ", 1)[0]


def test_the_documented_differences_are_the_rows_differences() -> None:
    """Each entry of the docs' list names the rows it happens on: exactly those of the table."""
    documented = {
        name: set(re.findall(r"`([^`]+)`", rows))
        for name, rows in re.findall(r"^- \*\*([a-z0-9-]+)\*\* \(([^)]*)\)", the_section(), re.M)
    }
    shown: dict[str, set[str]] = {}
    for row in ROWS:
        for differs in row.differs:
            shown.setdefault(differs.name, set()).add(row.id)
    assert shown == documented


def test_the_table_covers_at_least_sixty_behaviours() -> None:
    assert len(ROWS) >= 60
    assert len({row.id for row in ROWS}) == len(ROWS)
    assert f"serves {len(ROWS)} target behaviours" in " ".join(the_section().split())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated:DeprecationWarning")
def test_the_tls_1_0_server_speaks_tls_1_0(sites: Sites) -> None:
    """So the row proves that both clients refuse it, not that the server is broken."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    port = sites.nginx.port["tls1.0"]
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1"
