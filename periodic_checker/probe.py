"""One check of one task: an HTTP request measured like blackbox_exporter does it.

`Prober.check()` returns a `CheckResult` and never raises (cancellation aside): every failure
is an `ErrorKind` with a short message. A check opens a new connection (`http1.exchange`: DNS
not cached, so the load time includes DNS, TCP connect and TLS like a first visit), unless its
task has `keepalive=True`: those go through one aiohttp session that pools connections. Keeping
them apart means a fresh check never picks up a pooled connection by accident.

How the phases are measured (seconds, summed over redirect hops; null when a phase did not
happen, e.g. no DNS for an IP literal, no TLS over http, no connection phases on a reused
connection). Fresh checks: `http1.exchange` stamps each phase as it happens. Keep-alive checks:
aiohttp's trace events, and for TLS (which aiohttp does not trace) a small `SSLContext`
subclass whose `wrap_bio()` (called once the socket is connected, right before the handshake)
stamps the time on the running check.

- dns: name resolution (none for an IP literal).
- connect: TCP connect, from the end of DNS (or the start, for an IP literal) to the start of
  the TLS handshake, or to the connection being ready over plain http.
- tls: the TLS handshake.
- ttfb: from the request written to the response headers parsed.
- transfer: from the response headers to the last body byte read.

Redirects are followed here, hop by hop, so the target policy is applied to every hop (the
literal host before connecting; `PolicyResolver` drops denied addresses after DNS) and hops
are counted; 303, and 301/302 after a POST, continue as GET without the body and its headers.
User info in a URL is sent as basic auth; credentials, `secret_headers` and a custom Host are
dropped when a redirect leaves the origin (`redirect_headers`). The result's `url` and
`final_url` have their user info masked, and no error message holds a secret of the task
(`TaskSpec.secret_values`). The body is decoded here too
(every Content-Encoding value, in order: gzip, deflate, br, zstd; see decoding.py), in bounded
steps, and read up to `max_body_bytes`: a compression bomb costs at most that + 1 bytes (and
an encoded body at most twice that on the wire, `wire_limit`). A longer body is cut there and
the result says `body_truncated`; it fails (`body_too_large`)
only when the task sets `fail_if_body_larger`. The pattern is searched with RE2 in what was
read, decoded with its charset (UTF-8 when none or unknown), in a thread (search.py): never on
the event loop, and inside the check's time-out (`pattern_timeout` when it runs out there).
There is no pattern result without a body (HEAD, 204, 304, empty). `bytes` counts what was read,
also of a body that broke or ran out of time. The verdict, in order: transport errors, status,
body size (when asked), pattern.
"""

from __future__ import annotations

import asyncio
import codecs
import contextvars
import functools
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, Final, Protocol

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from checker_common.contract import (
    MAX_STATUS,
    MAX_URL,
    MIN_STATUS,
    CheckError,
    CheckResult,
    ErrorKind,
    PatternResult,
    Timings,
)
from checker_common.ids import uuid7
from checker_common.redact import redact_text, redact_url
from checker_common.task_spec import TaskSpec, status_accepted
from checker_common.urls import InvalidURL, redirect_target
from periodic_checker import http1
from periodic_checker.decoding import ACCEPT_ENCODING, BodyDecoder, DecodeError
from periodic_checker.dns import DNS_THREADS, DaemonThreadPool, Lookup, PoolResolver
from periodic_checker.overload import LoopStalls, TargetDeadline
from periodic_checker.policy import TargetPolicy
from periodic_checker.search import PatternSearcher

log = logging.getLogger(__name__)

DEFAULT_USER_AGENT: Final = "periodic-checker/0.2"
REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
NO_BODY_STATUSES: Final = frozenset({204, 304})
# The Fetch standard's "request-body-header names", dropped with the body when a redirect
# turns the request into a GET (HTTP-redirect fetch); Content-Length too, which Fetch need not
# name because a script cannot set it, but a task can.
BODY_HEADERS: Final = frozenset(
    {"content-encoding", "content-language", "content-location", "content-type", "content-length"}
)
MAX_MESSAGE: Final = 500

_running: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "periodic_checker_probe_run", default=None
)


class DeniedAddress(OSError):
    """Every address a name resolved to is denied by the target policy."""


class _Run:
    """The clock marks and measurements of one check (one per `check()`, never shared)."""

    __slots__ = (
        "bytes",
        "cert_expires_at",
        "conn_end",
        "conn_start",
        "connect",
        "dns",
        "dns_end",
        "dns_start",
        "final_url",
        "headers",
        "hop_open",
        "hop_start",
        "pattern",
        "redirects",
        "search_started",
        "searching",
        "sent",
        "status",
        "tls",
        "tls_object",
        "tls_start",
        "transfer",
        "truncated",
        "ttfb",
    )

    def __init__(self) -> None:
        self.status: int | None = None
        self.bytes = 0
        self.redirects = 0
        self.final_url: str | None = None
        self.pattern: PatternResult | None = None
        self.truncated = False
        self.searching = False
        self.search_started: float | None = None  # set by the search thread
        self.cert_expires_at: datetime | None = None
        self.dns: float | None = None
        self.connect: float | None = None
        self.tls: float | None = None
        self.ttfb: float | None = None
        self.transfer: float | None = None
        self.begin_hop()

    def begin_hop(self) -> None:
        self.hop_open = True
        self.hop_start = time.monotonic()
        self.dns_start: float | None = None
        self.dns_end: float | None = None
        self.conn_start: float | None = None
        self.tls_start: float | None = None
        self.tls_object: ssl.SSLObject | None = None
        self.conn_end: float | None = None
        self.sent: float | None = None
        self.headers: float | None = None

    def end_hop(self, body_end: float | None) -> None:
        """Add the phases this hop completed to the totals (once per hop)."""
        if not self.hop_open:
            return
        self.hop_open = False
        self.dns = _add(self.dns, self.dns_start, self.dns_end)
        tcp_from = self.dns_end if self.dns_end is not None else self.conn_start
        tcp_to = self.tls_start if self.tls_start is not None else self.conn_end
        self.connect = _add(self.connect, tcp_from, tcp_to)
        self.tls = _add(self.tls, self.tls_start, self.conn_end)
        self.ttfb = _add(self.ttfb, self.sent, self.headers)
        self.transfer = _add(self.transfer, self.headers, body_end)

    def phase(self) -> str:
        """Where the current hop is, for a time-out message."""
        if self.headers is not None:
            return "reading the body"
        if self.sent is not None or self.conn_end is not None:
            return "waiting for the response"
        if self.tls_start is not None:
            return "in the TLS handshake"
        if self.dns_start is not None and self.dns_end is None:
            return "resolving the host name"
        if self.conn_start is not None:
            return "connecting"
        return "waiting for a connection"

    def timings(self) -> Timings:
        # Every phase is None or a sum of max(0, end - start): valid without validation.
        return Timings.model_construct(
            dns=self.dns, connect=self.connect, tls=self.tls, ttfb=self.ttfb, transfer=self.transfer
        )


def _result(**fields: Any) -> CheckResult:
    """The check's result, built without validation where the probe made every value itself
    (`bench/micro.py validate` measures both ways of building it):
    name, url and method come from a validated TaskSpec, times are aware UTC, durations and
    counts are >= 0, final_url is cut to MAX_URL and errors are validated CheckErrors. The two
    values from outside - the HTTP status and the caller's scheduled_at - are checked here, and
    anything unusual goes through full validation (which also normalises a non-UTC time)."""
    status = fields["status"]
    scheduled_at = fields["scheduled_at"]
    if (
        (status is None or MIN_STATUS <= status <= MAX_STATUS)
        and (scheduled_at is None or scheduled_at.tzinfo is UTC)
        and fields["attempt"] >= 1
    ):
        return CheckResult.model_construct(**fields)
    return CheckResult(**fields)


def _add(total: float | None, start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return total
    return (total or 0.0) + max(0.0, end - start)


class _TimedTLSContext(ssl.SSLContext):
    """Stamps the start of the TLS handshake: asyncio wraps the connected socket right before
    it begins the handshake, in the task (context) of the request."""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        run = _running.get()
        if run is None:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        run.tls_start = time.monotonic()
        run.tls_object = super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        return run.tls_object


def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(verifying, not verifying) client contexts; the first trusts the system store
    (and SSL_CERT_FILE / SSL_CERT_DIR, read by OpenSSL when the store is loaded)."""
    verified = _TimedTLSContext(ssl.PROTOCOL_TLS_CLIENT)
    verified.load_default_certs(ssl.Purpose.SERVER_AUTH)
    verified.options |= ssl.OP_NO_COMPRESSION
    unverified = _TimedTLSContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    unverified.options |= ssl.OP_NO_COMPRESSION
    return verified, unverified


class PolicyResolver(AbstractResolver):
    """Resolves with aiohttp's default resolver, then keeps only addresses the policy allows.

    aiohttp connects only to what this returns, so a name pointing into a denied network
    (including DNS rebinding between checks) cannot be reached.
    """

    def __init__(self, policy: TargetPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            found = await self._inner.resolve(host, port, family)
        except UnicodeError as exc:
            # getaddrinfo() refuses names IDNA cannot encode (an empty or 64+ character label)
            # with UnicodeError; as an OSError aiohttp reports it as the DNS error it is.
            raise socket.gaierror(socket.EAI_NONAME, f"not a valid host name ({exc})") from exc
        allowed: list[ResolveResult] = []
        reason = None
        for entry in found:
            denied = self._policy.check_resolved(entry["host"])
            if denied is None:
                allowed.append(entry)
            else:
                reason = denied
        if not allowed:
            raise DeniedAddress(f"{host} resolves into a denied network: {reason}")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


async def _on_connection_create_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    ctx.trace_request_ctx.conn_start = time.monotonic()


async def _on_connection_create_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    ctx.trace_request_ctx.conn_end = time.monotonic()


async def _on_dns_start(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    ctx.trace_request_ctx.dns_start = time.monotonic()


async def _on_dns_end(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    ctx.trace_request_ctx.dns_end = time.monotonic()


async def _on_headers_sent(_s: Any, ctx: SimpleNamespace, _p: Any) -> None:
    ctx.trace_request_ctx.sent = time.monotonic()


def _trace_config() -> aiohttp.TraceConfig:
    """Only the events the phases need; each callback is one clock read."""
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(_on_connection_create_start)
    trace.on_connection_create_end.append(_on_connection_create_end)
    trace.on_dns_resolvehost_start.append(_on_dns_start)
    trace.on_dns_resolvehost_end.append(_on_dns_end)
    trace.on_request_headers_sent.append(_on_headers_sent)
    return trace


class HopResponse(Protocol):
    """What the probe needs of a response, from either engine (`http1.Response` for fresh
    connections, `PooledResponse` over aiohttp for keep-alive ones)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Looked up with lower-case names."""
        ...

    @property
    def charset(self) -> str | None: ...

    @property
    def content_encoding(self) -> str:
        """Every Content-Encoding value in order, header lines joined with ", "."""
        ...

    async def readany(self) -> bytes: ...

    def ssl_object(self) -> ssl.SSLObject | None: ...

    async def aclose(self) -> None: ...


class PooledResponse:
    """An aiohttp response seen as a `HopResponse`."""

    __slots__ = ("_response", "_run")

    def __init__(self, response: aiohttp.ClientResponse, run: _Run) -> None:
        self._response = response
        self._run = run

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def charset(self) -> str | None:
        return self._response.charset

    @property
    def content_encoding(self) -> str:
        return ", ".join(self._response.headers.getall("Content-Encoding", ()))

    async def readany(self) -> bytes:
        return await self._response.content.readany()

    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS object of the connection this hop created, else (a reused connection) of
        the pooled connection the response came on."""
        if self._run.tls_object is not None:
            return self._run.tls_object
        response = self._response
        # A response read to the end has already handed its connection back (connection is
        # None); its protocol still holds the pooled transport.
        protocol = response.connection.protocol if response.connection is not None else None
        protocol = protocol or getattr(response, "_protocol", None)
        transport = getattr(protocol, "transport", None)
        found = transport.get_extra_info("ssl_object") if transport is not None else None
        return found if isinstance(found, ssl.SSLObject) else None

    async def aclose(self) -> None:
        # What `async with session.request()` does on exit: the connection goes back to the
        # pool when the body was read to the end, else it is closed.
        self._response.release()
        await self._response.wait_for_close()


class Prober:
    """Runs checks: fresh-connection checks through `http1.exchange` (one new connection each,
    DNS not cached, so the load time includes DNS, TCP connect and TLS like a first visit),
    keep-alive checks through an aiohttp session that pools connections. Keeping them apart
    means a fresh check never picks up a pooled connection by accident."""

    def __init__(
        self,
        *,
        policy: TargetPolicy | None = None,
        max_connections: int = 0,
        user_agent: str = DEFAULT_USER_AGENT,
        dns_threads: int = DNS_THREADS,
        dns_lookup: Lookup = socket.getaddrinfo,
        node: str | None = None,
    ) -> None:
        """`node` is this checker's CHECKER_NODE_ID, put into every result (validated by the
        settings: the results are built without validation)."""
        self._policy = policy if policy is not None else TargetPolicy()
        self._node = node
        self._max_connections = max_connections
        self._dns_threads = dns_threads
        self._dns_lookup = dns_lookup
        # Stalls of the event loop are the checker's time, not the target's (overload.py).
        self.stalls = LoopStalls()
        self._defaults = {
            "User-Agent": user_agent,
            "Accept": "*/*",
            "Accept-Encoding": ACCEPT_ENCODING,
        }
        self._resolver: PolicyResolver | None = None
        self._dns: DaemonThreadPool | None = None
        self._keepalive: aiohttp.ClientSession | None = None
        self._verified: ssl.SSLContext | None = None
        self._unverified: ssl.SSLContext | None = None
        self._searcher: PatternSearcher | None = None
        self._contexts: asyncio.Future[tuple[ssl.SSLContext, ssl.SSLContext]] | None = None

    def load_trust_store(self) -> None:
        """Begin making the TLS contexts on a thread of their own (inside the running loop):
        loading the trust store takes tens of milliseconds, mostly without the interpreter
        lock, which a cluster node spends reading its task topic meanwhile. `start` waits for
        them (and makes them itself when this was not called)."""
        if self._contexts is None:
            self._contexts = asyncio.get_running_loop().run_in_executor(None, tls_contexts)

    async def start(self) -> None:
        """Open the keep-alive session (inside the running loop); call once before `check()`."""
        if self._keepalive is not None:
            return
        # Loading the trust store takes tens of milliseconds: once, here (or begun earlier).
        self.load_trust_store()
        assert self._contexts is not None
        self._verified, self._unverified = await self._contexts
        self.stalls.start()
        # Lookups in threads of their own (see dns.py); both paths share one resolver.
        self._dns = DaemonThreadPool(self._dns_threads, name="dns")
        self._resolver = PolicyResolver(
            self._policy, PoolResolver(self._dns, lookup=self._dns_lookup)
        )
        self._searcher = PatternSearcher()
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=0,
            resolver=self._resolver,
        )
        self._keepalive = aiohttp.ClientSession(
            connector=connector,
            # One deadline per check (asyncio.timeout in check()) covers every phase.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None),
            # Decompressed here, in bounded steps (see read_body).
            auto_decompress=False,
            # The session is shared by all tasks: a cookie from one site must not reach another.
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=[_trace_config()],
            headers=self._defaults,
            trust_env=False,
            # A header line as long as curl and the fresh engine take (aiohttp's own limit,
            # 8190 bytes, refuses real sites with a large cookie or Content-Security-Policy);
            # at most aiohttp's 128 of them, so a head costs at most 12.8 MiB.
            max_line_size=http1.MAX_HEADER_LINE,
            max_field_size=http1.MAX_HEADER_LINE,
        )

    async def close(self) -> None:
        if self._keepalive is not None:
            await self._keepalive.close()
        if self._resolver is not None:
            await self._resolver.close()
        self._keepalive = None
        self._resolver = None
        if self._dns is not None:
            # Lookups still queued are dropped; one in a thread ends on its own (daemon threads).
            self._dns.shutdown(wait=False, cancel_futures=True)
            self._dns = None
        if self._searcher is not None:
            self._searcher.close()
            self._searcher = None
        await self.stalls.stop()

    async def __aenter__(self) -> Prober:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def check(
        self,
        task_id: uuid.UUID,
        spec: TaskSpec,
        *,
        scheduled_at: datetime | None = None,
        attempt: int = 1,
    ) -> CheckResult:
        """Run one check of `spec`. Never raises except `asyncio.CancelledError`."""
        timestamp = datetime.now(UTC)
        started = time.monotonic()
        run = _Run()
        token = _running.set(run)
        error: CheckError | None
        # The time-out is the target's time: what the checker held the check up is not counted.
        deadline = TargetDeadline(spec.timeout, self.stalls)
        try:
            async with deadline:
                error = await self._fetch(spec, run)
        except TimeoutError:
            if run.searching:
                error = _pattern_timeout(spec, run)
            else:
                error = _timed_out(spec, run, deadline)
            run.end_hop(None)
        except Exception as exc:
            error = classify_error(exc, redirected=run.redirects > 0)
            if error is None:
                error = CheckError(
                    kind=ErrorKind.INVALID_RESPONSE, message=_short(f"{type(exc).__name__}: {exc}")
                )
                # One line, masked: the exception's text may quote the URL or a header.
                log.error(
                    "unexpected error in check of task %s (%s): %s",
                    task_id,
                    redact_url(spec.url),
                    redact_text(error.message, spec.secret_values),
                )
            run.end_hop(None)
        finally:
            _running.reset(token)
        load_time = time.monotonic() - started
        # Results leave the checker: user info masked in both URLs, and no secret of the task
        # in the texts a server or an exception chose (a Location may quote one).
        final_url = redact_url(run.final_url)[:MAX_URL] if run.final_url else None
        if spec.secret_values:
            if final_url is not None:
                final_url = redact_text(final_url, spec.secret_values)
            if error is not None:
                masked = redact_text(error.message, spec.secret_values)
                if masked != error.message:
                    error = CheckError(kind=error.kind, message=masked)
        return _result(
            # Time-ordered, from the check's start: appended to the processor's indexes.
            result_id=uuid7(timestamp),
            name=spec.name,
            url=redact_url(spec.url),
            method=spec.method,
            timestamp=timestamp,
            scheduled_at=scheduled_at,
            attempt=attempt,
            status=run.status,
            load_time=load_time,
            pattern_search=run.pattern,
            ok=error is None,
            error=error,
            timings=run.timings(),
            bytes=run.bytes,
            body_truncated=run.truncated,
            final_url=final_url,
            redirects=run.redirects,
            cert_expires_at=run.cert_expires_at,
            node=self._node,
        )

    async def _fetch(self, spec: TaskSpec, run: _Run) -> CheckError | None:
        """All hops of one check; returns the check's error or None. Exchange and aiohttp
        errors escape to `check()`, which turns them into data."""
        tls = self._verified if spec.verify_tls else self._unverified
        if tls is None:
            raise RuntimeError("Prober.start() was not called")
        try:
            url = spec.fetch_url  # parse_url(): the parser the API and the policy read it with
        except InvalidURL as exc:  # a stored definition from before a rule was tightened
            return CheckError(kind=ErrorKind.CONNECT, message=_short(f"invalid URL: {exc}"))
        method: str = spec.method
        data = spec.body.encode() if spec.body is not None else None
        headers = dict(spec.headers)
        seen: set[URL] | None = None  # made at the first redirect: most checks have none
        while True:
            run.final_url = spec.url if seen is None else str(url)
            if url.raw_user is not None:
                url, headers = credentials_as_header(url, headers)
            denied = self._policy.check_url(url)
            if denied is not None:
                return CheckError(kind=ErrorKind.DENIED_TARGET, message=_short(denied))
            run.begin_hop()
            https = url.scheme == "https"
            if spec.keepalive:
                response: HopResponse = await self._pooled(method, url, headers, data, tls, run)
            else:
                head = http1.request_head(method, url, headers, data, self._defaults)
                response = await http1.exchange(
                    method,
                    url,
                    head,
                    data,
                    tls=tls if https else None,
                    resolver=self._policy_resolver(),
                    marks=run,
                )
            try:
                run.headers = time.monotonic()
                if not MIN_STATUS <= response.status <= MAX_STATUS:
                    # "HTTP/1.1 000 Zero" parses, but is no status a result can hold.
                    return CheckError(
                        kind=ErrorKind.INVALID_RESPONSE,
                        message=f"malformed response: status code {response.status:03d} is"
                        f" outside {MIN_STATUS}-{MAX_STATUS}",
                    )
                run.status = response.status
                if https:
                    run.cert_expires_at = certificate_expiry(response.ssl_object())
                location = None
                if spec.follow_redirects and response.status in REDIRECT_STATUSES:
                    location = response.headers.get("location")
                if location is None:
                    return await self._finish(spec, method, response, run)
            finally:
                await response.aclose()
            run.end_hop(None)
            try:
                # Read by the rules a task's own URL is read by.
                target = redirect_target(url, location)
            except InvalidURL as exc:
                return CheckError(
                    kind=ErrorKind.INVALID_RESPONSE,
                    message=_short(
                        f"redirect to an unsupported URL: {redact_url(location)!r}: {exc}"
                    ),
                )
            if run.redirects >= spec.max_redirects:
                next_url = redact_url(str(target))
                return CheckError(
                    kind=ErrorKind.TOO_MANY_REDIRECTS,
                    message=_short(f"more than {spec.max_redirects} redirects (next: {next_url})"),
                )
            if seen is None:
                seen = {url.with_fragment(None)}
            key = target.with_fragment(None)
            if key in seen:
                return CheckError(
                    kind=ErrorKind.TOO_MANY_REDIRECTS,
                    message=_short(f"redirect loop back to {redact_url(str(key))}"),
                )
            seen.add(key)
            run.redirects += 1
            new_method, new_data = redirected_method(response.status, method, data)
            headers = redirect_headers(
                headers,
                same_origin=target.origin() == url.origin(),
                body_dropped=new_method != method or (data is not None and new_data is None),
                secret=spec.secret_header_names,
            )
            method, data, url = new_method, new_data, target

    def _policy_resolver(self) -> PolicyResolver:
        if self._resolver is None:
            raise RuntimeError("Prober.start() was not called")
        return self._resolver

    async def _pooled(
        self,
        method: str,
        url: URL,
        headers: dict[str, str],
        data: bytes | None,
        tls: ssl.SSLContext,
        run: _Run,
    ) -> PooledResponse:
        """One hop over the keep-alive session (aiohttp pools the connections)."""
        if self._keepalive is None:
            raise RuntimeError("Prober.start() was not called")
        response = await self._keepalive.request(
            method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            ssl=tls,
            trace_request_ctx=run,
        )
        return PooledResponse(response, run)

    async def _finish(
        self, spec: TaskSpec, method: str, response: HopResponse, run: _Run
    ) -> CheckError | None:
        """Read the final response's body, search it, then judge status, size and pattern."""
        pattern = spec.compiled_pattern
        if method == "HEAD" or response.status in NO_BODY_STATUSES or response.status < 200:
            run.end_hop(time.monotonic())
            return judge(spec, response.status, truncated=False, pattern=None)
        body = await read_body(response, spec.max_body_bytes, keep=pattern is not None, tally=run)
        run.end_hop(time.monotonic())
        run.bytes = body.size
        run.truncated = body.truncated
        if body.error is not None:
            return CheckError(kind=ErrorKind.INVALID_RESPONSE, message=_short(body.error))
        if pattern is not None:
            if not body.data:
                # A blank page is searched too (it is a common outage): nothing to hand a thread.
                found = pattern.search(b"") is not None
            else:
                if self._searcher is None:
                    raise RuntimeError("Prober.start() was not called")
                run.searching = True
                charset = body_charset(response.charset)
                found = await self._searcher.search(pattern, body.data, charset, run)
                run.searching = False
            run.pattern = PatternResult.MATCH if found else PatternResult.NO_MATCH
        return judge(spec, response.status, truncated=body.truncated, pattern=run.pattern)


def _pattern_timeout(spec: TaskSpec, run: _Run) -> CheckError:
    """The check ran out of time while its pattern search waited for a thread or ran."""
    where = (
        "while it waited for a search thread (all busy)"
        if run.search_started is None
        else f"after searching for {time.monotonic() - run.search_started:.1f} s"
    )
    return CheckError(
        kind=ErrorKind.PATTERN_TIMEOUT,
        message=_short(
            f"pattern search of {run.bytes} bytes not finished within {spec.timeout:g} s {where}"
        ),
    )


def _timed_out(spec: TaskSpec, run: _Run, deadline: TargetDeadline) -> CheckError:
    """A real time-out when the target had its time, else not judged (checker_overloaded)."""
    if not (deadline.expired() and deadline.overloaded()):
        held = deadline.checker_time()
        # The checker's own delay, when there was some, said for whoever reads the time-out.
        extra = f"; the checker held it up {held:.2f} s more" if held >= 0.01 else ""
        return CheckError(
            kind=ErrorKind.TIMEOUT,
            message=f"no complete answer within {spec.timeout:g} s ({run.phase()}{extra})",
        )
    return CheckError(
        kind=ErrorKind.CHECKER_OVERLOADED,
        message=(
            f"not judged: the checker held the check up for {deadline.checker_time():.2f} s"
            f" (event loop stalled or DNS pool full); the target had"
            f" {deadline.target_time():.2f} s of its {spec.timeout:g} s time-out ({run.phase()})"
        ),
    )


def judge(
    spec: TaskSpec, status: int, *, truncated: bool, pattern: PatternResult | None
) -> CheckError | None:
    """The check's verdict once a response was read: status, then size (when the task asks),
    then pattern."""
    if not status_accepted(status, spec.status_ranges):
        return CheckError(
            kind=ErrorKind.STATUS,
            message=f"HTTP status {status} is not in the accepted {spec.accepted_statuses}",
        )
    if truncated and spec.fail_if_body_larger:
        return CheckError(
            kind=ErrorKind.BODY_TOO_LARGE,
            message=f"body larger than {spec.max_body_bytes} bytes (read stopped there)",
        )
    if pattern is PatternResult.NO_MATCH and spec.pattern_fails_when == "absent":
        where = f"the first {spec.max_body_bytes} bytes of the body" if truncated else "the body"
        return CheckError(kind=ErrorKind.PATTERN, message=f"pattern not found in {where}")
    if pattern is PatternResult.MATCH and spec.pattern_fails_when == "present":
        return CheckError(kind=ErrorKind.PATTERN, message="pattern found in the body")
    return None


def credentials_as_header(url: URL, headers: dict[str, str]) -> tuple[URL, dict[str, str]]:
    """The URL without its user info, which becomes basic auth unless the task gives its own
    Authorization. Both engines then send the same header, and it follows the redirect rules
    of every other credential (`redirect_headers`) instead of the URL's."""
    authorization = http1.basic_authorization(url)
    headers = dict(headers)
    if authorization is not None and not any(k.lower() == "authorization" for k in headers):
        headers["Authorization"] = authorization
    return url.with_user(None), headers


def redirect_headers(
    headers: Mapping[str, str], *, same_origin: bool, body_dropped: bool, secret: frozenset[str]
) -> dict[str, str]:
    """The headers sent to the next hop of a redirect.

    Leaving the origin (scheme, host or port) drops the credentials - Authorization, Cookie,
    Proxy-Authorization (and so the URL's user info, sent as Authorization) and the task's
    `secret_headers` (all in `secret`, lower case) - and a custom Host, which named the old
    origin. Browsers, Go's client and curl (since 7.83.1) drop the same credentials; curl keeps
    a custom Host across a port change, where we follow Go (docs/api.md says why), and like us
    sends other custom headers everywhere. A header once dropped stays dropped, even if a later
    hop comes back. When the redirect drops the body (303, or
    301/302 after POST), the body's headers go with it (`BODY_HEADERS`); 307 and 308 keep both.
    """
    drop: set[str] = set()
    if not same_origin:
        drop |= secret
        drop.add("host")
    if body_dropped:
        drop |= BODY_HEADERS
    if not drop:
        return dict(headers)
    return {name: value for name, value in headers.items() if name.lower() not in drop}


def redirected_method(status: int, method: str, data: bytes | None) -> tuple[str, bytes | None]:
    """What browsers do: 303 (and 301/302 after POST) continue as GET without a body."""
    if status == 303 and method != "HEAD":
        return "GET", None
    if status in (301, 302) and method == "POST":
        return "GET", None
    return method, data


class Body:
    """What was read of a body: the bytes (only when kept), how many, whether it was cut at
    the cap, and why it could not be read."""

    __slots__ = ("data", "error", "size", "truncated")

    def __init__(self, data: bytes, size: int, truncated: bool, error: str | None) -> None:
        self.data = data
        self.size = size
        self.truncated = truncated
        self.error = error


class BodyTally(Protocol):
    """Where `read_body` counts the bytes read so far (the check's record)."""

    bytes: int


async def read_body(
    response: HopResponse, cap: int, *, keep: bool, tally: BodyTally | None = None
) -> Body:
    """Read at most `cap` bytes of the decoded body (+1 to know it is longer), then stop.

    An encoded body is also read no further than `wire_limit(cap)` bytes from the network,
    even when they decode to less: a stream of empty gzip members (or empty deflate blocks)
    decodes to nothing, and would otherwise cost decoding until the time-out. Stopping there
    counts as truncated too: the body was not read to its end. `tally.bytes` follows the
    decoded bytes as they come, so a body that breaks or runs out of time still says how much
    of it arrived (as curl's size_download does)."""
    encoding = response.content_encoding
    try:
        decoder = BodyDecoder.for_header(encoding)
    except DecodeError as exc:
        return Body(b"", 0, False, str(exc))
    chunks: list[bytes] = []
    size = 0
    if decoder is None:
        while size <= cap:
            raw = await response.readany()
            if not raw:
                break
            size += len(raw)
            if tally is not None:
                tally.bytes = min(size, cap)
            if keep:
                chunks.append(raw)
        return _cut(chunks, size, cap, truncated=size > cap)
    wire = 0
    limit = wire_limit(cap)
    try:
        while size <= cap:
            if wire > limit:
                return _cut(chunks, size, cap, truncated=True)
            raw = await response.readany()
            wire += len(raw)
            # At the end, what the decoder still holds; at most the room left either way.
            pieces = decoder.feed(raw, cap + 1 - size) if raw else decoder.finish(cap + 1 - size)
            for piece in pieces:
                size += len(piece)
                if keep:
                    chunks.append(piece)
            if tally is not None:
                tally.bytes = min(size, cap)
            if not raw:
                break
    except DecodeError as exc:
        return Body(b"", size, False, f"cannot decode the {encoding[:40]} body: {exc}")
    return _cut(chunks, size, cap, truncated=size > cap)


def wire_limit(cap: int) -> int:
    """The most bytes of an encoded body read from the network: more than any real encoding
    of `cap` bytes needs (incompressible data grows by a fraction of a per cent)."""
    return 2 * cap + 65_536


def _cut(chunks: list[bytes], size: int, cap: int, *, truncated: bool) -> Body:
    """The body from its pieces, without what went past the cap."""
    if size > cap:
        if chunks:  # the last piece read went past the cap
            last = chunks[-1]
            chunks[-1] = last[: len(last) - (size - cap)]
        size = cap
    return Body(b"".join(chunks), size, truncated, None)


def body_charset(charset: str | None) -> str:
    """The Content-Type charset if Python knows it, else UTF-8."""
    return (_codec_name(charset) if charset else None) or "utf-8"


@functools.lru_cache(maxsize=256)
def _codec_name(charset: str) -> str | None:
    """codecs.lookup()'s name for a charset, None if unknown or no text encoding (a server may
    label its page `rot13`, `base64`, `zlib`, `idna` or `undefined`, codecs Python knows that
    cannot decode a page with `errors="replace"`); cached, as every check asks."""
    try:
        name = codecs.lookup(charset).name
        b"a\xff".decode(name, errors="replace")  # LookupError or UnicodeError when it cannot
    except (LookupError, UnicodeError):
        return None
    return name


def certificate_expiry(ssl_object: ssl.SSLObject | None) -> datetime | None:
    """notAfter of the server's certificate on this TLS connection, None without one."""
    if ssl_object is None:
        return None
    try:
        # The binary form is there even when verification is off (the dict form is then empty).
        der = ssl_object.getpeercert(binary_form=True)
    except ValueError:  # handshake not done
        return None
    return _cert_not_after_seen(der) if der else None


@functools.lru_cache(maxsize=512)
def _cert_not_after_seen(der: bytes) -> datetime | None:
    """`cert_not_after`, remembered by the certificate's bytes. A target shows the same
    certificate check after check, for months: reading its notAfter again costs about 8 us of
    CPU, looking it up 0.1 us (`bench/micro.py cert-expiry`), about 1 % of an https check.
    512 certificates of 1-2 KB each: at most about 1 MB."""
    return cert_not_after(der)


def cert_not_after(der: bytes) -> datetime | None:
    """Read Certificate.tbsCertificate.validity.notAfter from DER; None if malformed."""
    try:
        _, start, _ = _tlv(der, 0)  # Certificate
        _, pos, _ = _tlv(der, start)  # tbsCertificate
        tag, _, end = _tlv(der, pos)
        if tag == 0xA0:  # [0] version
            pos = end
        for _ in range(3):  # serialNumber, signature, issuer
            _, _, pos = _tlv(der, pos)
        tag, pos, _ = _tlv(der, pos)  # validity
        if tag != 0x30:
            return None
        _, _, pos = _tlv(der, pos)  # notBefore
        tag, start, end = _tlv(der, pos)
        text = der[start:end].decode("ascii")
        if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ
            year = int(text[:2])
            text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
        elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
            return None
        return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at `pos`."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("DER element overruns the data")
    return tag, pos, pos + length


def classify_error(exc: BaseException, *, redirected: bool = False) -> CheckError | None:
    """Turn a client exception into an error kind and a short message; None if unknown."""
    kind: ErrorKind
    if isinstance(exc, http1.ExchangeError):
        return _exchange_error(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        where = f"{exc.host}:{exc.port}"
        if isinstance(os_error, DeniedAddress):
            kind, message = ErrorKind.DENIED_TARGET, str(os_error)
        elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
            cert_error = exc.certificate_error
            reason = getattr(cert_error, "verify_message", None) or str(cert_error)
            kind, message = ErrorKind.TLS, f"certificate of {where} not accepted: {reason}"
        elif isinstance(exc, aiohttp.ClientSSLError) or isinstance(os_error, ssl.SSLError):
            kind, message = ErrorKind.TLS, f"TLS with {where} failed: {_reason(os_error)}"
        elif isinstance(os_error, socket.gaierror) or _is_dns_error(exc):
            kind, message = ErrorKind.DNS, f"cannot resolve {exc.host}: {_reason(os_error)}"
        else:
            kind, message = ErrorKind.CONNECT, f"cannot connect to {where}: {_reason(os_error)}"
    elif isinstance(exc, aiohttp.InvalidURL):
        kind = ErrorKind.INVALID_RESPONSE if redirected else ErrorKind.CONNECT
        message = f"invalid URL: {exc}"
    elif isinstance(exc, ssl.SSLError):
        kind, message = ErrorKind.TLS, f"TLS error: {_reason(exc)}"
    elif isinstance(exc, aiohttp.ServerDisconnectedError):
        kind, message = ErrorKind.INVALID_RESPONSE, "server closed the connection early"
    elif isinstance(exc, aiohttp.ClientPayloadError):
        kind, message = ErrorKind.INVALID_RESPONSE, f"broken body: {_reason(exc)}"
    elif isinstance(exc, aiohttp.ClientResponseError):
        kind, message = ErrorKind.INVALID_RESPONSE, f"malformed response: {exc.message}"
    elif isinstance(exc, aiohttp.ClientOSError | ConnectionError):
        kind, message = ErrorKind.CONNECT, f"connection failed: {_reason(exc)}"
    elif isinstance(exc, aiohttp.ClientError):
        kind, message = ErrorKind.INVALID_RESPONSE, f"{type(exc).__name__}: {exc}"
    else:
        return None
    return CheckError(kind=kind, message=_short(message))


def _exchange_error(exc: http1.ExchangeError) -> CheckError:
    """The error of a fresh-connection exchange, in the same words as the keep-alive path's."""
    kind: ErrorKind
    if isinstance(exc, http1.ResolveFailed):
        if isinstance(exc.cause, DeniedAddress):
            kind, message = ErrorKind.DENIED_TARGET, str(exc.cause)
        else:
            kind, message = ErrorKind.DNS, f"cannot resolve {exc.host}: {_reason(exc.cause)}"
    elif isinstance(exc, http1.ConnectFailed):
        where = f"{exc.host}:{exc.port}"
        kind, message = ErrorKind.CONNECT, f"cannot connect to {where}: {_reason(exc.cause)}"
    elif isinstance(exc, http1.TLSFailed):
        where = f"{exc.host}:{exc.port}"
        kind = ErrorKind.TLS
        if isinstance(exc.cause, ssl.SSLCertVerificationError):
            reason = exc.cause.verify_message or _reason(exc.cause)
            message = f"certificate of {where} not accepted: {reason}"
        else:
            message = f"TLS with {where} failed: {_reason(exc.cause)}"
    elif isinstance(exc, http1.ServerDisconnected):
        kind, message = ErrorKind.INVALID_RESPONSE, "server closed the connection early"
    elif isinstance(exc, http1.BrokenBody):
        kind, message = ErrorKind.INVALID_RESPONSE, f"broken body: {exc}"
    else:
        kind, message = ErrorKind.INVALID_RESPONSE, f"malformed response: {exc}"
    return CheckError(kind=kind, message=_short(message))


def _is_dns_error(exc: aiohttp.ClientConnectorError) -> bool:
    dns_error = getattr(aiohttp, "ClientConnectorDNSError", None)
    return dns_error is not None and isinstance(exc, dns_error)


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text or type(exc).__name__


def _short(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
