"""The target policy: pure rules over addresses and URLs, then the probe enforcing them on
literal hosts, after DNS and on every redirect hop."""

from __future__ import annotations

import ipaddress
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from checker.targets import SEEN, make_app, serve
from pydantic import ValidationError
from yarl import URL

from checker_common.contract import ErrorKind
from checker_common.task_spec import TaskSpec
from periodic_checker.policy import (
    DEFAULT_DENY,
    TargetPolicy,
    embedded_ipv4,
    parse_host_address,
    parse_ipv4_loose,
    rfc6052_ipv4,
)
from periodic_checker.probe import DeniedAddress, PolicyResolver, Prober
from periodic_checker.settings import CheckerSettings

TASK = uuid.UUID("00000000-0000-4000-8000-000000000002")

# Every spelling the C library (and so a naive client) maps onto the metadata address.
METADATA_SPELLINGS = [
    "http://169.254.169.254/",
    "http://2852039166/",
    "http://0xA9FEA9FE/",
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://0251.0376.0251.0376/",
    "http://0251.254.0xa9.254/",
    "http://169.254.43518/",
    "http://169.16689662/",
    "http://169.254.169.254./",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/",
    "http://[::169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[::ffff:0:a9fe:a9fe]/",  # SIIT (IPv4-translated)
    "http://[::ffff:0:169.254.169.254]/",
    "http://[64:ff9b:1::a9fe:a9fe]/",  # local-use NAT64, /96 layout
    "http://[64:ff9b:1:a9fe:a9:fe00::]/",  # local-use NAT64, /48 layout
    "http://[64:ff9b:1:0:a9:fea9:fe00:0]/",  # local-use NAT64, /64 layout
    "http://[2002:a9fe:a9fe::1]/",
    "http://１６９.２５４.１６９.２５４/",  # full-width digits, normalised by yarl  # noqa: RUF001
    "http://169。254。169。254/",  # ideographic full stops
    "http://user:pw@169.254.169.254:8080/latest/meta-data/",
    "https://169.254.1.1/",
    "http://[fe80::1]/",
]

# URLs no single reading of which the probe can fetch: refused by the task's validation, by the
# policy and, as redirect targets, by the probe; all three read a URL with one parser.
UNFETCHABLE = [
    "http://127.0.0.1:9\\@169.254.169.254/",  # urllib reads 169.254.169.254, yarl refuses
    "http://%31%36%39.254.169.254/",  # percent-encoded host: would go to DNS as it is
    "http://169.254.169%2e254/",
    "http://[fe80::1%25eth0]/",  # a zone id
    "http://[1:2]/",  # brackets around something that is not IPv6
    "http://169.254.169.254:0/",
]

ALLOWED_BY_DEFAULT = [
    "http://127.0.0.1/",
    "http://2130706433/",  # 127.0.0.1 spelled as a number: loopback stays allowed
    "http://[::1]/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://[fd00::1]/",
    "http://localhost/",
    "http://example.com/",
    "http://169.254.example.com/",  # a name; judged after DNS
]


@pytest.mark.parametrize("url", METADATA_SPELLINGS)
def test_every_spelling_of_a_denied_literal_is_denied(url: str) -> None:
    reason = TargetPolicy().check_url(url)

    assert reason is not None
    assert "denied network" in reason


@pytest.mark.parametrize("url", UNFETCHABLE)
def test_a_url_the_probe_cannot_fetch_is_refused_everywhere(url: str) -> None:
    reason = TargetPolicy().check_url(url)
    assert reason is not None
    assert "not a URL the checker can fetch" in reason
    with pytest.raises(ValidationError) as refused:
        TaskSpec(name="t", url=url)
    assert [error["loc"] for error in refused.value.errors()] == [("url",)]


@pytest.mark.parametrize("url", ALLOWED_BY_DEFAULT)
def test_private_loopback_and_names_are_allowed_by_default(url: str) -> None:
    assert TargetPolicy().check_url(url) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("169.254.169.254", "169.254.169.254"),
        ("2852039166", "169.254.169.254"),
        ("0xA9FEA9FE", "169.254.169.254"),
        ("0251.0376.0251.0376", "169.254.169.254"),
        ("169.254.43518", "169.254.169.254"),
        ("169.16689662", "169.254.169.254"),
        ("0", "0.0.0.0"),
        ("127.1", "127.0.0.1"),
        ("1.2.3.256", None),
        ("256.1.1.1", None),
        ("1.2.3.4.5", None),
        ("08", None),  # not octal, not decimal either (inet_aton refuses it)
        ("0x", None),
        ("00", "0.0.0.0"),
        ("0xg", None),
        ("1_0", None),
        ("+1", None),
        ("1..2", None),
        ("", None),
        ("example", None),
        ("４", None),  # noqa: RUF001 - yarl normalises these; the raw parser does not
    ],
)
def test_ipv4_is_read_like_inet_aton(text: str, expected: str | None) -> None:
    parsed = parse_ipv4_loose(text)

    assert (str(parsed) if parsed else None) == expected
    if expected is not None:  # the C library agrees
        assert socket.inet_ntoa(socket.inet_aton(text)) == expected
    elif text.isascii():
        with pytest.raises(OSError, match="illegal IP address"):
            socket.inet_aton(text)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("[::1]", "::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("169.254.169.254.", "169.254.169.254"),
        ("example.com", None),
        ("[nonsense]", None),
    ],
)
def test_host_literals(host: str, expected: str | None) -> None:
    parsed = parse_host_address(host)

    assert (str(parsed) if parsed else None) == expected


def test_a_host_judged_as_a_name_is_one_no_address_is_read_from() -> None:
    # check_host judges a host that starts with a letter (and holds no ':') as a name at once;
    # the same verdict as reading it for an address, for every spelling here.
    hosts = [
        "example.com", "EXAMPLE.com.", "a", "x0", "localhost", "xn--bcher-kva.example",
        "e.1", "f.0x7f", "0x7f.1", "0x7f000001", "127.1", "017700000001", "1", "1e3",
        "[::1]", "[::ffff:10.0.0.1]", "fe80::1%eth0", "a:b", "::1", "ab::1", "abc::",
        "169.254.169.254.", " 10.0.0.1", "10.0.0.1 ", "\u0661\u0660.0.0.1", "é.example",
        "[nonsense]", "", ".", "-", "_.example", "0", "00", "0x", "0xg",
    ]  # fmt: skip
    policy = TargetPolicy.from_strings("0.0.0.0/0,::/0")  # every address denied

    for host in hosts:
        address = parse_host_address(host)
        expected = None if address is None else policy.check_address(address)
        assert policy.check_host(host) == expected, host
    assert policy.check_host("example.com") is None
    assert policy.check_host("10.0.0.1") is not None  # an address: judged as one


@pytest.mark.parametrize(
    ("address", "embedded"),
    [
        ("::ffff:169.254.169.254", ["169.254.169.254"]),
        ("::169.254.169.254", ["169.254.169.254"]),
        ("64:ff9b::a9fe:a9fe", ["169.254.169.254"]),
        ("::ffff:0:a9fe:a9fe", ["169.254.169.254"]),
        ("::ffff:0:10.0.0.1", ["10.0.0.1"]),
        ("2002:a9fe:a9fe::1", ["169.254.169.254"]),
        ("::1", []),
        ("::", []),
        ("2001:db8::1", []),
        ("10.0.0.1", []),
    ],
)
def test_ipv4_inside_ipv6(address: str, embedded: list[str]) -> None:
    assert [str(a) for a in embedded_ipv4(ipaddress.ip_address(address))] == embedded


@pytest.mark.parametrize(
    ("address", "layout"),
    [
        ("64:ff9b:1::a9fe:a9fe", 96),
        ("64:ff9b:1:0:a9:fea9:fe00:0", 64),
        ("64:ff9b:1:a9:fe:a9fe::", 56),
        ("64:ff9b:1:a9fe:a9:fe00::", 48),
    ],
)
def test_a_local_use_nat64_address_is_read_in_each_layout(address: str, layout: int) -> None:
    metadata = ipaddress.IPv4Address("169.254.169.254")

    assert rfc6052_ipv4(ipaddress.IPv6Address(address), layout) == metadata
    assert metadata in embedded_ipv4(ipaddress.IPv6Address(address))


# RFC 6052 section 2.4: 192.0.2.33 under 2001:db8::/32 ... /96.
@pytest.mark.parametrize(
    ("address", "prefix_length"),
    [
        ("2001:db8:c000:221::", 32),
        ("2001:db8:1c0:2:21::", 40),
        ("2001:db8:122:c000:2:2100::", 48),
        ("2001:db8:122:3c0:0:221::", 56),
        ("2001:db8:122:344:c0:2:2100:0", 64),
        ("2001:db8:122:344::192.0.2.33", 96),
    ],
)
def test_rfc6052_layouts(address: str, prefix_length: int) -> None:
    assert str(rfc6052_ipv4(ipaddress.IPv6Address(address), prefix_length)) == "192.0.2.33"


def test_the_allow_list_overrides_the_deny_list() -> None:
    policy = TargetPolicy.from_strings("169.254.0.0/16,fe80::/10", "169.254.169.254/32")

    assert policy.check_url("http://169.254.169.254/") is None
    assert policy.check_url("http://[::ffff:169.254.169.254]/") is None
    assert policy.check_url("http://0xA9FEA9FE/") is None
    assert policy.check_url("http://169.254.169.253/") is not None
    assert policy.check_url("http://[fe80::1]/") is not None


def test_more_networks_can_be_denied() -> None:
    policy = TargetPolicy.from_strings("127.0.0.0/8,::1/128")

    assert policy.check_url("http://127.0.0.2/") is not None
    assert policy.check_url("http://2130706433/") is not None
    assert policy.check_url("http://[::ffff:127.0.0.1]/") is not None
    assert policy.check_url("http://169.254.169.254/") is None  # not in this list


def test_defaults_come_from_the_settings() -> None:
    fields = CheckerSettings.model_fields
    policy = TargetPolicy.from_strings(
        fields["target_deny_networks"].default, fields["target_allow_networks"].default
    )

    assert tuple(policy.deny) == DEFAULT_DENY
    assert tuple(policy.allow) == ()
    assert TargetPolicy() == policy


def test_a_resolved_address_that_cannot_be_read_is_denied() -> None:
    policy = TargetPolicy()

    assert policy.check_resolved("127.0.0.1") is None
    assert policy.check_resolved("169.254.169.254") is not None
    assert policy.check_resolved("not-an-address") is not None


# --- the resolver: only allowed addresses are handed to the connector --------------------


class FixedResolver(AbstractResolver):
    """Answers every name with the same addresses (the real resolver cannot be told to)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_the_resolver_drops_denied_addresses() -> None:
    resolver = PolicyResolver(TargetPolicy(), FixedResolver("169.254.169.254", "127.0.0.1"))

    found = await resolver.resolve("mixed.example", 80)

    assert [entry["host"] for entry in found] == ["127.0.0.1"]


async def test_the_resolver_refuses_a_name_with_only_denied_addresses() -> None:
    resolver = PolicyResolver(TargetPolicy(), FixedResolver("169.254.169.254", "fe80::1"))

    with pytest.raises(DeniedAddress, match=r"metadata\.example"):
        await resolver.resolve("metadata.example", 80)


# --- the probe enforces it -----------------------------------------------------------------


@pytest.fixture
async def local() -> AsyncIterator[tuple[URL, Any]]:
    app = make_app()
    async with serve(app) as base:
        yield base, app


def spec(url: str, **fields: Any) -> TaskSpec:
    return TaskSpec(name="policy test", url=url, interval=None, timeout=5, **fields)


@pytest.mark.parametrize("url", METADATA_SPELLINGS)
async def test_the_probe_refuses_every_spelling(url: str) -> None:
    async with Prober() as prober:
        result = await prober.check(TASK, spec(url))

    assert result.error is not None
    assert result.error.kind is ErrorKind.DENIED_TARGET
    assert result.status is None
    assert result.timings.connect is None  # refused before any connection


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://0xA9FEA9FE/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fe80::1]/",
    ],
)
async def test_a_redirect_into_a_denied_network_is_refused(
    local: tuple[URL, Any], target: str
) -> None:
    base, app = local
    async with Prober() as prober:
        result = await prober.check(TASK, spec(str(base.with_path("/to").with_query(url=target))))

    assert result.error is not None
    assert result.error.kind is ErrorKind.DENIED_TARGET
    assert result.redirects == 1
    assert result.status == 302
    assert len(app[SEEN]) == 1


@pytest.mark.parametrize("target", UNFETCHABLE)
async def test_a_redirect_to_a_url_the_probe_cannot_fetch_ends_the_check(
    local: tuple[URL, Any], target: str
) -> None:
    base, app = local
    async with Prober() as prober:
        result = await prober.check(TASK, spec(str(base.with_path("/to").with_query(url=target))))

    assert result.error is not None
    assert result.error.kind is ErrorKind.INVALID_RESPONSE
    assert "redirect to an unsupported URL" in result.error.message
    assert result.status == 302
    assert len(app[SEEN]) == 1


async def test_loopback_is_allowed_by_default(local: tuple[URL, Any]) -> None:
    base, _ = local
    async with Prober() as prober:
        by_address = await prober.check(TASK, spec(f"{base}/ok"))
        by_name = await prober.check(TASK, spec(f"{base.with_host('localhost')}/ok"))

    assert by_address.ok, by_address.error
    assert by_name.ok, by_name.error


async def test_a_name_resolving_into_a_denied_network_is_refused_after_dns(
    local: tuple[URL, Any],
) -> None:
    base, app = local
    policy = TargetPolicy.from_strings("127.0.0.0/8,::1/128")
    async with Prober(policy=policy) as prober:
        result = await prober.check(TASK, spec(f"{base.with_host('localhost')}/ok"))

    assert result.error is not None
    assert result.error.kind is ErrorKind.DENIED_TARGET
    assert "localhost" in result.error.message
    assert app[SEEN] == []


async def test_every_redirect_hop_is_checked_after_dns() -> None:
    app = make_app()
    # The first hop is allowed (127.0.0.2); the redirect names localhost (127.0.0.1): denied.
    async with serve(app, host="127.0.0.2") as base:
        target = base.with_host("localhost").with_path("/ok")
        policy = TargetPolicy.from_strings("127.0.0.1/32,::1/128")
        async with Prober(policy=policy) as prober:
            result = await prober.check(TASK, spec(str((base / "to").with_query(url=str(target)))))

    assert result.error is not None
    assert result.error.kind is ErrorKind.DENIED_TARGET
    assert result.redirects == 1
    assert [seen.path for seen in app[SEEN]] == [f"/to?url={target}"]


async def test_the_allow_list_lets_the_probe_through(local: tuple[URL, Any]) -> None:
    base, _ = local
    policy = TargetPolicy.from_strings("127.0.0.0/8,::1/128", "127.0.0.1/32")
    async with Prober(policy=policy) as prober:
        result = await prober.check(TASK, spec(f"{base.with_host('localhost')}/ok"))

    assert result.ok, result.error
