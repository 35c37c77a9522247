"""The probe against real servers: one table of targets, then what the table cannot show
(TLS phases and certificate expiry, connection reuse, redirect details, the command line)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from checker.targets import HOSTILE_PATTERN, SEEN, make_app, serve, silent_server
from yarl import URL

from checker_common.contract import ErrorKind, PatternResult, decode, encode
from checker_common.ids import uuid7_millis
from checker_common.task_spec import TaskSpec
from devstack import free_port
from periodic_checker import probe_cli
from periodic_checker.probe import Prober, cert_not_after

ROOT = Path(__file__).resolve().parents[2]
TASK = uuid.UUID("00000000-0000-4000-8000-000000000001")
MATCH, NO_MATCH = PatternResult.MATCH, PatternResult.NO_MATCH


# --- certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path  # trusted by the probe in these tests (SSL_CERT_FILE)
    good: tuple[Path, Path]  # for localhost and 127.0.0.1, signed by ca
    self_signed: tuple[Path, Path]
    wrong_host: tuple[Path, Path]  # signed by ca, but for wrong.example only


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(dev_certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Certs:
    out = tmp_path_factory.mktemp("probe-certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        "req", "-x509", *ec, "-keyout", str(out / "self.key"), "-out", str(out / "self.pem"),
        "-days", "30", "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
    )  # fmt: skip
    _openssl(
        "req", *ec, "-keyout", str(out / "wrong.key"), "-out", str(out / "wrong.csr"),
        "-subj", "/CN=wrong.example",
    )  # fmt: skip
    (out / "wrong.ext").write_text("subjectAltName=DNS:wrong.example\n")
    _openssl(
        "x509", "-req", "-in", str(out / "wrong.csr"), "-CA", str(dev_certs / "ca.pem"),
        "-CAkey", str(dev_certs / "ca.key"), "-CAcreateserial", "-out", str(out / "wrong.pem"),
        "-days", "30", "-extfile", str(out / "wrong.ext"),
    )  # fmt: skip
    return Certs(
        ca=dev_certs / "ca.pem",
        good=(dev_certs / "broker.pem", dev_certs / "broker.key"),
        self_signed=(out / "self.pem", out / "self.key"),
        wrong_host=(out / "wrong.pem", out / "wrong.key"),
    )


def server_tls(pair: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pair[0]), str(pair[1]))
    return context


# --- servers and the prober --------------------------------------------------------------


@dataclass
class Targets:
    http: URL
    https: URL  # trusted certificate, as localhost
    self_signed: URL
    wrong_host: URL
    silent_port: int
    closed_port: int
    apps: dict[str, Any] = field(default_factory=dict)

    def url(self, where: str, path: str) -> str:
        if where == "silent-http":
            return f"http://127.0.0.1:{self.silent_port}/"
        if where == "silent-https":
            return f"https://127.0.0.1:{self.silent_port}/"
        if where == "closed":
            return f"http://127.0.0.1:{self.closed_port}/"
        if where == "dns":
            return "http://no-such-host.invalid/"
        base: URL = getattr(self, where.replace("-", "_"))
        return f"{base}{path}"


@pytest.fixture
async def targets(certs: Certs) -> AsyncIterator[Targets]:
    async with AsyncExitStack() as stack:
        apps = {name: make_app() for name in ("http", "https", "self_signed", "wrong_host")}
        http = await stack.enter_async_context(serve(apps["http"]))
        https = await stack.enter_async_context(
            serve(apps["https"], ssl_context=server_tls(certs.good))
        )
        self_signed = await stack.enter_async_context(
            serve(apps["self_signed"], ssl_context=server_tls(certs.self_signed))
        )
        wrong_host = await stack.enter_async_context(
            serve(apps["wrong_host"], ssl_context=server_tls(certs.wrong_host))
        )
        silent = await stack.enter_async_context(silent_server())
        yield Targets(
            http=http,
            https=https.with_host("localhost"),
            self_signed=self_signed,
            wrong_host=wrong_host,
            silent_port=silent,
            closed_port=free_port(),
            apps=apps,
        )


@pytest.fixture
async def prober(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Prober]:
    # OpenSSL reads SSL_CERT_FILE when the prober loads the trust store in start().
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    async with Prober() as started:
        yield started


def spec(url: str, **fields: Any) -> TaskSpec:
    return TaskSpec(name="probe test", url=url, interval=None, **fields)


# --- the table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    where: str
    path: str
    status: int | None
    error: ErrorKind | None
    pattern: PatternResult | None
    fields: dict[str, Any] = field(default_factory=dict)


HELLO = {"pattern": "hello periodic"}
FAST = {"timeout": 0.6}
A_4096 = {"pattern": "a", "max_body_bytes": 4096}
CAP = {"pattern": "x", "max_body_bytes": 1_048_576}
SECOND_HALF = {"pattern": "checker</h1>"}  # of the page: in the second of two members only
# Content codings, each on both engines: a fresh connection (http1) and a pooled one (aiohttp).
ENCODED = [
    ("brotli", "/encoded?codings=br", None, MATCH, HELLO),
    ("zstd", "/encoded?codings=zstd", None, MATCH, HELLO),
    ("gzip-then-br", "/encoded?codings=gzip,br", None, MATCH, HELLO),
    ("br-then-zstd-then-deflate", "/encoded?codings=br,zstd,deflate", None, MATCH, HELLO),
    ("codings-on-two-header-lines", "/encoded?codings=gzip,br&lines=1", None, MATCH, HELLO),
    ("identity-among-codings", "/encoded?codings=identity,gzip", None, MATCH, HELLO),
    ("gzip-two-members", "/encoded?codings=gzip&members=2", None, MATCH, SECOND_HALF),
    ("zstd-two-frames", "/encoded?codings=zstd&members=2", None, MATCH, SECOND_HALF),
    ("unknown-coding", "/encoded?codings=compress", ErrorKind.INVALID_RESPONSE, None, HELLO),
    ("unknown-after-gzip", "/encoded?codings=gzip,compress", ErrorKind.INVALID_RESPONSE, None,
     HELLO),
    ("brotli-bomb", "/bomb?codings=br", ErrorKind.PATTERN, NO_MATCH, CAP),
    ("zstd-bomb", "/bomb?codings=zstd", ErrorKind.PATTERN, NO_MATCH, CAP),
    ("gzip-bomb-inside-br", "/bomb?codings=gzip,br", ErrorKind.PATTERN, NO_MATCH, CAP),
    ("brotli-bomb-fails-when-asked", "/bomb?codings=br", ErrorKind.BODY_TOO_LARGE, NO_MATCH,
     {**CAP, "fail_if_body_larger": True}),
]  # fmt: skip
ENCODED_ROWS = [
    Row(f"{name}-{engine}", "http", path, 200, error, pattern,
        {**fields, "keepalive": engine == "keepalive"})
    for name, path, error, pattern, fields in ENCODED
    for engine in ("fresh", "keepalive")
]  # fmt: skip
ROWS = [
    Row("200", "http", "/ok", 200, None, MATCH, HELLO),
    Row("404", "http", "/status/404", 404, ErrorKind.STATUS, None),
    Row("500", "http", "/status/500", 500, ErrorKind.STATUS, None),
    Row("404-accepted", "http", "/status/404", 404, None, None, {"accepted_statuses": "404"}),
    Row("redirect-chain", "http", "/redirect/3", 200, None, MATCH, HELLO),
    Row("redirect-loop", "http", "/loop/a", 302, ErrorKind.TOO_MANY_REDIRECTS, None),
    Row(
        "too-many-redirects",
        "http",
        "/redirect/5",
        302,
        ErrorKind.TOO_MANY_REDIRECTS,
        None,
        {"max_redirects": 2},
    ),
    Row(
        "redirect-not-followed", "http", "/redirect/1", 302, None, None, {"follow_redirects": False}
    ),
    Row("slow-first-byte", "http", "/slow?delay=30", None, ErrorKind.TIMEOUT, None, FAST),
    Row("trickled-body", "http", "/trickle?interval=0.2", 200, ErrorKind.TIMEOUT, None, FAST),
    Row("never-answers", "silent-http", "", None, ErrorKind.TIMEOUT, None, FAST),
    Row("stalled-tls", "silent-https", "", None, ErrorKind.TIMEOUT, None, FAST),
    Row("closed-port", "closed", "", None, ErrorKind.CONNECT, None),
    Row("dns-does-not-resolve", "dns", "", None, ErrorKind.DNS, None),
    Row("self-signed-cert", "self-signed", "/ok", None, ErrorKind.TLS, None, HELLO),
    Row("cert-for-another-host", "wrong-host", "/ok", None, ErrorKind.TLS, None, HELLO),
    Row("tls-unverified", "self-signed", "/ok", 200, None, MATCH, {**HELLO, "verify_tls": False}),
    Row("https", "https", "/ok", 200, None, MATCH, HELLO),
    # A bomb is read up to the cap and searched there; it fails for its size only when asked.
    Row(
        "gzip-bomb",
        "http",
        "/gzip-bomb?mb=64",
        200,
        ErrorKind.PATTERN,
        NO_MATCH,
        {"pattern": "x", "max_body_bytes": 1_048_576},
    ),
    Row(
        "gzip-bomb-fails-when-asked",
        "http",
        "/gzip-bomb?mb=64",
        200,
        ErrorKind.BODY_TOO_LARGE,
        NO_MATCH,
        {"pattern": "x", "fail_if_body_larger": True},
    ),
    Row("gzip", "http", "/gzip", 200, None, MATCH, HELLO),
    Row("deflate", "http", "/deflate", 200, None, MATCH, HELLO),
    Row("raw-deflate", "http", "/deflate-raw", 200, None, MATCH, HELLO),
    *ENCODED_ROWS,
    Row("windows-1251", "http", "/charset/windows-1251", 200, None, MATCH, {"pattern": "Привет"}),
    Row("latin-1", "http", "/charset/latin-1", 200, None, MATCH, {"pattern": "^café $"}),
    Row("pattern-absent", "http", "/ok", 200, ErrorKind.PATTERN, NO_MATCH, {"pattern": "bye"}),
    Row(
        "pattern-present-fails",
        "http",
        "/ok",
        200,
        ErrorKind.PATTERN,
        MATCH,
        {**HELLO, "pattern_fails_when": "present"},
    ),
    Row(
        "pattern-absent-wanted",
        "http",
        "/ok",
        200,
        None,
        NO_MATCH,
        {"pattern": "error", "pattern_fails_when": "present"},
    ),
    Row("head", "http", "/ok", 200, None, None, {"method": "HEAD"}),
    Row("no-content", "http", "/no-content", 204, None, None, HELLO),
    # A blank page is searched like any other (it was passed unsearched: a false "up").
    Row("empty-body", "http", "/empty", 200, ErrorKind.PATTERN, NO_MATCH, HELLO),
    # A longer body is searched up to the cap; it fails for its size only when asked.
    Row("body-over-cap", "http", "/bytes?size=5000", 200, None, MATCH, {**A_4096}),
    Row(
        "body-over-cap-fails-when-asked",
        "http",
        "/bytes?size=5000",
        200,
        ErrorKind.BODY_TOO_LARGE,
        MATCH,
        {**A_4096, "fail_if_body_larger": True},
    ),
    Row(
        "pattern-past-the-cap",
        "http",
        "/bytes?size=5000&tail=needle",
        200,
        ErrorKind.PATTERN,
        NO_MATCH,
        {"pattern": "needle", "max_body_bytes": 4096},
    ),
    Row(
        "pattern-at-the-cap",
        "http",
        "/bytes?size=4090&tail=needle",
        200,
        None,
        MATCH,
        {"pattern": "needle", "max_body_bytes": 4096},
    ),
    Row(
        "body-at-cap",
        "http",
        "/bytes?size=4096",
        200,
        None,
        MATCH,
        {"pattern": "a", "max_body_bytes": 4096},
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
async def test_target(row: Row, targets: Targets, prober: Prober) -> None:
    url = targets.url(row.where, row.path)
    result = await prober.check(TASK, spec(url, **row.fields))

    assert (result.status, result.error and result.error.kind, result.pattern_search) == (
        row.status,
        row.error,
        row.pattern,
    ), result.error
    assert result.ok is (row.error is None)
    assert result.error is None or result.error.message
    assert result.url == url
    assert result.name == "probe test"
    assert result.load_time >= 0
    assert result.timestamp.tzinfo is not None
    assert result.health.value == "unknown"  # the scheduler decides health


async def test_result_ids_are_time_ordered_from_the_checks_start(
    targets: Targets, prober: Prober
) -> None:
    first = await prober.check(TASK, spec(f"{targets.http}/ok"))
    second = await prober.check(TASK, spec(f"{targets.http}/ok"))

    for result in (first, second):
        assert result.result_id.version == 7
        assert uuid7_millis(result.result_id) == int(result.timestamp.timestamp() * 1000)
    assert first.result_id != second.result_id
    assert first.timestamp <= second.timestamp


async def test_redirects_are_counted_and_final_url_reported(
    targets: Targets, prober: Prober
) -> None:
    result = await prober.check(TASK, spec(f"{targets.http}/redirect/3"))

    assert result.ok
    assert result.redirects == 3
    assert result.final_url == f"{targets.http}/ok"
    paths = [seen.path for seen in targets.apps["http"][SEEN]]
    assert paths == ["/redirect/3", "/redirect/2", "/redirect/1", "/ok"]


async def test_a_loop_stops_before_repeating_a_hop(targets: Targets, prober: Prober) -> None:
    result = await prober.check(TASK, spec(f"{targets.http}/loop/a"))

    assert result.error is not None
    assert "loop" in result.error.message
    assert [seen.path for seen in targets.apps["http"][SEEN]] == ["/loop/a", "/loop/b"]


BOMBS = ["/gzip-bomb?mb=64", "/bomb?codings=br", "/bomb?codings=zstd", "/bomb?codings=gzip,br"]


@pytest.mark.parametrize("keepalive", [False, True], ids=["fresh", "keepalive"])
async def test_body_read_stops_at_the_cap_and_says_so(
    targets: Targets, prober: Prober, keepalive: bool
) -> None:
    cap = 1_048_576
    bombs = [
        await prober.check(TASK, spec(f"{targets.http}{path}", keepalive=keepalive))
        for path in BOMBS
    ]
    small = {"max_body_bytes": 4096, "keepalive": keepalive}
    big = await prober.check(TASK, spec(f"{targets.http}/bytes?size=5000", **small))
    fits = await prober.check(TASK, spec(f"{targets.http}/bytes?size=4096", **small))

    assert [(bomb.ok, bomb.bytes, bomb.body_truncated) for bomb in bombs] == [(True, cap, True)] * 4
    assert (big.ok, big.bytes, big.body_truncated) == (True, 4096, True)
    assert (fits.ok, fits.bytes, fits.body_truncated) == (True, 4096, False)


@pytest.mark.parametrize("keepalive", [False, True], ids=["fresh", "keepalive"])
async def test_an_encoded_body_that_decodes_to_nothing_is_not_read_forever(
    targets: Targets, prober: Prober, keepalive: bool
) -> None:
    url = f"{targets.http}/empty-gzip-members"
    result = await prober.check(TASK, spec(url, timeout=30, keepalive=keepalive))

    # Read no further than twice the cap on the wire, then stopped: not to the time-out.
    assert (result.ok, result.bytes, result.body_truncated) == (True, 0, True), result.error


@pytest.mark.parametrize("keepalive", [False, True], ids=["fresh", "keepalive"])
async def test_an_unknown_coding_is_named(
    targets: Targets, prober: Prober, keepalive: bool
) -> None:
    url = f"{targets.http}/encoded?codings=gzip,compress"
    result = await prober.check(TASK, spec(url, keepalive=keepalive))

    assert result.error is not None
    assert result.error.kind is ErrorKind.INVALID_RESPONSE
    assert "unsupported content-encoding 'compress'" in result.error.message


@pytest.mark.parametrize("keepalive", [False, True], ids=["fresh", "keepalive"])
async def test_accept_encoding_offers_what_the_probe_decodes(
    targets: Targets, prober: Prober, keepalive: bool
) -> None:
    result = await prober.check(TASK, spec(f"{targets.http}/echo", keepalive=keepalive))

    assert result.ok
    (seen,) = targets.apps["http"][SEEN]
    assert seen.headers["Accept-Encoding"] == "gzip, deflate, br, zstd"


async def test_a_search_that_outlives_the_time_out_fails_as_pattern_timeout(
    targets: Targets, prober: Prober
) -> None:
    # About 2.2 s of RE2's NFA (4.2 ns x 1,000 instructions x 512 KiB), on the loop or not.
    url = f"{targets.http}/ab?size=524288"
    result = await prober.check(TASK, spec(url, pattern=HOSTILE_PATTERN, timeout=1.0))

    assert result.error is not None
    assert result.error.kind is ErrorKind.PATTERN_TIMEOUT, result.error
    assert "pattern search of 524288 bytes not finished within 1 s" in result.error.message
    assert (result.status, result.bytes, result.pattern_search) == (200, 524288, None)


async def test_https_measures_every_phase_and_the_certificate_expiry(
    targets: Targets, prober: Prober, certs: Certs
) -> None:
    result = await prober.check(TASK, spec(f"{targets.https}/ok"))

    assert result.ok, result.error
    timings = result.timings
    phases = [timings.dns, timings.connect, timings.tls, timings.ttfb, timings.transfer]
    assert all(phase is not None and phase >= 0 for phase in phases), timings
    assert sum(p or 0 for p in phases) <= result.load_time
    assert result.cert_expires_at == openssl_not_after(certs.good[0])


async def test_each_server_reports_its_own_certificate_expiry_and_verification_still_runs(
    targets: Targets, prober: Prober, certs: Certs
) -> None:
    # The expiry is remembered by the certificate's bytes: two servers with certificates that
    # end on different dates, checked in turn, each get their own date back, and a
    # certificate whose date is remembered is still refused when it is not trusted.
    good = f"{targets.https}/ok"
    self_signed = targets.url("self-signed", "/ok")
    assert openssl_not_after(certs.good[0]) != openssl_not_after(certs.self_signed[0])

    seen = []
    for _ in range(2):
        for url, pem in ((good, certs.good[0]), (self_signed, certs.self_signed[0])):
            result = await prober.check(TASK, spec(url, verify_tls=False))
            seen.append(result.cert_expires_at == openssl_not_after(pem))
    refused = await prober.check(TASK, spec(self_signed))

    assert seen == [True] * 4
    assert refused.error is not None
    assert refused.error.kind is ErrorKind.TLS, refused.error
    assert refused.cert_expires_at is None


async def test_http_has_no_tls_phase_and_no_certificate(targets: Targets, prober: Prober) -> None:
    result = await prober.check(TASK, spec(f"{targets.http}/ok"))

    assert result.timings.tls is None
    assert result.cert_expires_at is None
    assert result.timings.dns is None  # an IP literal is not resolved
    assert result.timings.connect is not None
    assert result.timings.ttfb is not None


async def test_a_stalled_handshake_says_so(targets: Targets, prober: Prober) -> None:
    result = await prober.check(TASK, spec(targets.url("silent-https", ""), timeout=0.5))

    assert result.error is not None
    assert "TLS handshake" in result.error.message
    assert result.timings.connect is not None
    assert result.timings.tls is None


async def test_each_check_opens_a_new_connection_unless_keepalive(
    targets: Targets, prober: Prober
) -> None:
    fresh = [await prober.check(TASK, spec(f"{targets.https}/ok")) for _ in range(3)]
    fresh_peers = {seen.peer for seen in targets.apps["https"][SEEN]}
    targets.apps["https"][SEEN].clear()
    kept = [await prober.check(TASK, spec(f"{targets.https}/ok", keepalive=True)) for _ in range(3)]
    kept_peers = {seen.peer for seen in targets.apps["https"][SEEN]}

    assert len(fresh_peers) == 3
    assert len(kept_peers) == 1
    assert all(r.timings.tls is not None for r in fresh)
    assert kept[0].timings.tls is not None
    assert [r.timings.connect for r in kept[1:]] == [None, None]  # nothing to connect
    assert all(r.cert_expires_at is not None for r in fresh + kept)


async def test_credentials_do_not_follow_a_redirect_to_another_host(
    targets: Targets, prober: Prober
) -> None:
    other = targets.http.with_host("localhost") / "echo"
    url = f"{targets.http}/to?url={other}"
    headers = {"Authorization": "Bearer secret", "X-Trace": "kept"}
    result = await prober.check(TASK, spec(url, headers=headers))

    first, second = targets.apps["http"][SEEN]
    assert result.ok
    assert result.redirects == 1
    assert first.headers["Authorization"] == "Bearer secret"
    assert "Authorization" not in second.headers
    assert second.headers["X-Trace"] == "kept"
    assert first.headers["User-Agent"] == "periodic-checker/0.2"


async def test_see_other_turns_a_post_into_a_get(targets: Targets, prober: Prober) -> None:
    url = f"{targets.http}/to?code=303&url=/echo"
    result = await prober.check(TASK, spec(url, method="POST", body="payload"))

    assert result.ok
    assert result.status == 200
    assert [s.method for s in targets.apps["http"][SEEN]] == ["POST", "GET"]


async def test_cancelling_a_check_raises_cancelled(targets: Targets, prober: Prober) -> None:
    check = asyncio.create_task(prober.check(TASK, spec(targets.url("silent-http", ""))))
    await asyncio.sleep(0.2)
    check.cancel()
    with pytest.raises(asyncio.CancelledError):
        await check


async def test_results_match_the_published_schema(targets: Targets, prober: Prober) -> None:
    schema = json.loads((ROOT / "schema" / "result-message.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    urls = [f"{targets.https}/redirect/2", f"{targets.http}/status/500", targets.url("dns", "")]
    for url in urls:
        result = await prober.check(TASK, spec(url, pattern="hello"), attempt=2)
        key, value = encode(TASK, result)
        validator.validate(json.loads(value))
        assert key == str(TASK).encode()
        assert decode(value).result == result


# What a hostile server sends, raw: the texts it chose reach the result's error message.
HOSTILE_RESPONSES = {
    "status line with a control character": b"HTTP/1.1 2\x0100 OK\r\nContent-Length: 0\r\n\r\n",
    "version with a control character": b"HTTP/9\x01.1 200 OK\r\n\r\n",
    "Location with NUL and ESC": (
        b"HTTP/1.1 302 Found\r\nLocation: http://ex\x01ample/\x00\x1b[31m\r\n"
        b"Content-Length: 0\r\n\r\n"
    ),
    "Location with C1 bytes": (
        b"HTTP/1.1 302 Found\r\nLocation: http://[\x85\x9b31m::1]/\r\nContent-Length: 0\r\n\r\n"
    ),
    "Location with a line separator and an override": (
        "HTTP/1.1 302 Found\r\nLocation: http://[\u2028\u202e::1]/\r\nContent-Length: 0\r\n\r\n"
    ).encode(),
}
UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


async def check_raw(prober: Prober, raw: bytes, **fields: Any) -> Any:
    """The result of a check of a server that answers every request with `raw`, then closes."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(raw)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await prober.check(TASK, spec(f"http://127.0.0.1:{port}/", **fields))
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("keepalive", [False, True], ids=["http1", "aiohttp"])
@pytest.mark.parametrize("raw", HOSTILE_RESPONSES.values(), ids=HOSTILE_RESPONSES.keys())
async def test_an_error_message_holds_no_control_character_a_server_sent(
    raw: bytes, keepalive: bool, prober: Prober
) -> None:
    result = await check_raw(prober, raw, keepalive=keepalive)
    assert result.error is not None
    assert result.error.kind in (ErrorKind.INVALID_RESPONSE, ErrorKind.TOO_MANY_REDIRECTS)
    assert not UNSAFE.search(result.error.message), result.error.message
    _, value = encode(TASK, result)
    assert decode(value).result.error == result.error


@pytest.mark.parametrize("keepalive", [False, True], ids=["http1", "aiohttp"])
@pytest.mark.parametrize("code", ["000", "099"])
async def test_a_status_code_below_100_is_an_invalid_response_not_a_silence(
    code: str, keepalive: bool, prober: Prober
) -> None:
    # It parses, but no result can hold it: the check raised instead of giving one, every
    # time, and the task stayed `unknown` with nothing counted.
    raw = f"HTTP/1.1 {code} Zero\r\nContent-Length: 2\r\n\r\nOK".encode()
    result = await check_raw(prober, raw, pattern="OK", keepalive=keepalive)

    assert result.error is not None
    assert result.error.kind is ErrorKind.INVALID_RESPONSE
    assert f"status code {code} is outside 100-999" in result.error.message
    assert result.status is None
    _, value = encode(TASK, result)
    assert decode(value).result == result


@pytest.mark.parametrize("keepalive", [False, True], ids=["http1", "aiohttp"])
async def test_a_blank_page_fails_a_pattern_that_must_be_present(
    keepalive: bool, prober: Prober
) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    result = await check_raw(prober, raw, pattern="Welcome", keepalive=keepalive)

    assert result.error is not None
    assert result.error.kind is ErrorKind.PATTERN
    assert result.status == 200
    assert result.pattern_search is NO_MATCH
    absent = await check_raw(
        prober, raw, pattern="Welcome", pattern_fails_when="present", keepalive=keepalive
    )
    assert absent.ok
    assert absent.pattern_search is NO_MATCH


@pytest.mark.parametrize("keepalive", [False, True], ids=["http1", "aiohttp"])
@pytest.mark.parametrize("charset", ["rot13", "base64", "zlib", "idna", "undefined"])
async def test_a_charset_that_names_no_text_encoding_is_read_as_utf_8(
    charset: str, keepalive: bool, prober: Prober
) -> None:
    # Codecs Python knows, but that cannot decode a page: a healthy page was reported down.
    body = "OK, caf\u00e9".encode()
    raw = (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset={charset}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    result = await check_raw(prober, raw, pattern="caf\u00e9", keepalive=keepalive)

    assert result.ok, result.error
    assert result.pattern_search is MATCH


# --- certificate parsing -----------------------------------------------------------------


def openssl_not_after(pem: Path) -> datetime:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-enddate", "-in", str(pem)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]), UTC)


def test_not_after_is_read_from_der(certs: Certs) -> None:
    for pem in (certs.good[0], certs.self_signed[0], certs.wrong_host[0], certs.ca):
        der = ssl.PEM_cert_to_DER_cert(pem.read_text())
        assert cert_not_after(der) == openssl_not_after(pem)


@pytest.mark.parametrize(
    "der", [b"", b"\x30", b"\x30\x03\x02\x01\x01", b"\x30\x84\xff\xff\xff\xff"]
)
def test_not_after_of_garbage_is_none(der: bytes) -> None:
    assert cert_not_after(der) is None


# --- the command line --------------------------------------------------------------------


def _env() -> dict[str, str]:
    settings = ("KAFKA_", "API_", "LOG_", "TASK_", "TARGET_", "MAX_", "PER_HOST_", "SHUTDOWN_")
    return {k: v for k, v in os.environ.items() if not k.startswith(settings)}


async def run_probe(*args: str) -> tuple[int, str, str]:
    """`python -m periodic_checker.probe_cli ARGS` without blocking the test's servers."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "periodic_checker.probe_cli",
        *args,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_prints_the_result_message(targets: Targets) -> None:
    code, out, _ = await run_probe(
        f"{targets.http}/ok",
        "--pattern",
        "hello",
        "--header",
        "X-Probe: yes",
        "--task-id",
        str(TASK),
    )

    decoded = decode(out.encode())
    assert code == 0
    assert decoded.task_id == TASK
    assert decoded.result.ok
    assert decoded.result.pattern_search is MATCH
    assert targets.apps["http"][SEEN][0].headers["X-Probe"] == "yes"


async def test_cli_exits_1_when_the_check_fails(targets: Targets) -> None:
    code, out, _ = await run_probe(f"{targets.http}/status/503", "--timeout", "5")

    result = decode(out.encode()).result
    assert code == 1
    assert result.status == 503
    assert result.error is not None
    assert result.error.kind is ErrorKind.STATUS


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["http://x/", "--timeout", "0"], "--timeout"),
        (["http://x/", "--timeout", "soon"], "--timeout"),
        (["ftp://x/"], "URL"),
        (["http://x/", "--pattern", "("], "--pattern"),
        (["http://x/", "--header", "no colon"], "--header"),
        (["http://x/", "--header", "Bad Name: v"], "--header"),
        (["http://x/", "--method", "BREW"], "--method"),
        (["http://x/", "--accepted-statuses", "2xx"], "--accepted-statuses"),
        (["http://x/", "--max-body-bytes", "-1"], "--max-body-bytes"),
        (["http://x/", "--deny-networks", "10.0.0.0/33"], "--deny-networks"),
        (["http://x/", "--task-id", "nope"], "--task-id"),
    ],
)
def test_cli_names_the_bad_option_and_exits_2(
    args: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        probe_cli.main(args)

    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exited.value.code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(f"periodic-checker probe: error: {option}:"), err
    assert out == ""


def test_cli_denies_a_metadata_address_without_settings() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "periodic_checker.probe_cli", "http://0xA9FEA9FE/latest/"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    result = decode(done.stdout.encode()).result
    assert done.returncode == 1
    assert result.error is not None
    assert result.error.kind is ErrorKind.DENIED_TARGET
