"""Which addresses a check may reach: a guard against server-side request forgery.

A task's URL is chosen by whoever can edit tasks, and the checker fetches it from inside the
network, so by default it must not reach link-local addresses (169.254.0.0/16 holds the cloud
metadata services, fe80::/10 is its IPv6 twin). Private and loopback networks stay allowed:
checking internal sites is a normal use.

The policy is applied twice: `check_url()` on the literal host of a URL (the API answers 422
before anything is resolved; the probe repeats it on every redirect hop), and
`check_address()` on every address DNS returns, right before connecting (the probe's resolver
drops denied addresses). An IP literal may be spelled in many ways that the C resolver still
maps onto an address (`2852039166`, `0xA9FEA9FE`, `0251.0376.0251.0376`, `169.254.43518`,
`[::ffff:169.254.169.254]`); `parse_host_address()` reads them all the way `inet_aton` does, and
IPv6 forms that carry an IPv4 address (mapped, compatible, SIIT-translated, NAT64 with the
well-known and the local-use prefix, 6to4, Teredo) are judged by that IPv4 address too.

A URL's host is read by `checker_common.urls.parse_url()`, the parser the probe fetches with:
a URL it cannot read is refused here too, so no URL passes the policy that the probe would
read differently.
"""

from __future__ import annotations

import ipaddress
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yarl

from checker_common.urls import InvalidURL, url_host
from periodic_checker.settings import CheckerSettings, parse_networks

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENY: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
)
# RFC 6052 well-known prefix: on an IPv6-only network a NAT64 gateway turns these into IPv4.
NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 8215 local-use prefix: an operator's NAT64 may use any RFC 6052 layout of /48 or longer
# inside it, so each of those layouts is read.
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
NAT64_LOCAL_LAYOUTS = (48, 56, 64, 96)
# RFC 2765 / 6145 SIIT "IPv4-translated" addresses, ::ffff:0:a.b.c.d.
SIIT = ipaddress.ip_network("::ffff:0:0:0/96")
MAX_REMEMBERED = 10_000


@dataclass(frozen=True)
class TargetPolicy:
    """Networks checks may not reach (`deny`), and exceptions inside them (`allow`).

    Verdicts are remembered per host string (bounded), because every check asks again for the
    same few hosts and the probe's CPU per check is budgeted.
    """

    deny: Sequence[IPNetwork] = field(default=DEFAULT_DENY)
    allow: Sequence[IPNetwork] = ()
    _verdicts: dict[str, str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "deny", tuple(self.deny))
        object.__setattr__(self, "allow", tuple(self.allow))

    @classmethod
    def from_settings(cls, settings: CheckerSettings) -> TargetPolicy:
        return cls.from_strings(settings.target_deny_networks, settings.target_allow_networks)

    @classmethod
    def from_strings(cls, deny: str, allow: str = "") -> TargetPolicy:
        """Comma-separated networks, as in TARGET_DENY_NETWORKS / TARGET_ALLOW_NETWORKS."""
        return cls(deny=tuple(parse_networks(deny)), allow=tuple(parse_networks(allow)))

    def check_address(self, address: IPAddress) -> str | None:
        """Why `address` may not be reached, or None when it may."""
        return denied_reason(address, self.deny, self.allow)

    def check_host(self, host: str) -> str | None:
        """Why a literal host may not be reached; None for names (judged after DNS)."""
        if host[:1].isalpha() and ":" not in host:
            # A name, as `parse_host_address` reads it (an address starts with a digit or
            # `[`, or holds a `:`): judged without looking it up or keeping it. A cluster node
            # judges 100,000 hosts at start, nearly all of them names.
            return None
        return self._verdict(host, resolved=False)

    def check_resolved(self, address: str) -> str | None:
        """Why an address DNS returned may not be reached; one that does not parse is denied."""
        return self._verdict(address, resolved=True)

    def check_url(self, url: str | yarl.URL) -> str | None:
        """Why the URL's literal host is denied, or None (also for names, judged after DNS).

        A string is read by `url_host()`, as `parse_url()` reads it for the probe (yarl
        normalises full-width digits and ideographic full stops into ASCII, which then spell an
        IPv4 literal); one it cannot read is refused.
        A `yarl.URL` is taken as already read that way.
        """
        if isinstance(url, yarl.URL):
            host = url.raw_host
        else:
            try:
                host = url_host(url)
            except InvalidURL as exc:
                return f"not a URL the checker can fetch: {exc}"
        if not host:
            return "the URL names no host"
        return self.check_host(host)

    def _verdict(self, host: str, *, resolved: bool) -> str | None:
        key = f"={host}" if resolved else host
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        address = parse_host_address(host)
        if address is not None:
            verdict = self.check_address(address)
        elif resolved:
            verdict = f"resolved to an address that cannot be read: {host[:60]!r}"
        else:
            verdict = None
        if len(self._verdicts) >= MAX_REMEMBERED:
            self._verdicts.clear()
        self._verdicts[key] = verdict
        return verdict


def denied_reason(
    address: IPAddress, deny: Iterable[IPNetwork], allow: Iterable[IPNetwork]
) -> str | None:
    """Pure rule: denied if the address (or the IPv4 address it embeds) is in a denied
    network and not in an allowed one."""
    deny, allow = tuple(deny), tuple(allow)
    for candidate in (address, *embedded_ipv4(address)):
        for network in deny:
            if candidate in network:
                if any(candidate in allowed for allowed in allow):
                    break
                shown = str(candidate) if candidate == address else f"{address} ({candidate})"
                return f"address {shown} is in denied network {network}"
    return None


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address stands for: mapped, compatible, SIIT, NAT64 (well-known
    and local-use prefixes), 6to4, Teredo."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    value = int(address)
    # IPv4-compatible (::a.b.c.d, deprecated); :: and ::1 are not IPv4 addresses.
    if value >> 32 == 0 and value > 1:
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if address in NAT64 or address in SIIT:
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if address in NAT64_LOCAL:
        for prefix_length in NAT64_LOCAL_LAYOUTS:
            candidate = rfc6052_ipv4(address, prefix_length)
            if candidate not in found:
                found.append(candidate)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.append(address.teredo[1])
    return found


def rfc6052_ipv4(address: ipaddress.IPv6Address, prefix_length: int) -> ipaddress.IPv4Address:
    """The IPv4 address inside an RFC 6052 address with a prefix of `prefix_length` bits
    (32, 40, 48, 56, 64 or 96); bits 64-71 are the reserved `u` octet and never hold it."""
    packed = address.packed
    if prefix_length == 96:
        return ipaddress.IPv4Address(packed[12:16])
    # The octets fill the bytes after the prefix up to byte 7, skip byte 8, then go on.
    return ipaddress.IPv4Address((packed[prefix_length // 8 : 8] + packed[9:])[:4])


def parse_host_address(host: str) -> IPAddress | None:
    """The address a literal host names, in any spelling `inet_aton` accepts; None for names.

    Handles `[v6]`, zone ids (`fe80::1%eth0`), one trailing dot, and IPv4 written with 1 to 4
    parts in decimal, octal (leading 0) or hex (0x), as the C library does.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    if text.endswith("."):
        text = text[:-1]
    return parse_ipv4_loose(text)


def parse_ipv4_loose(text: str) -> ipaddress.IPv4Address | None:
    """`inet_aton` rules: a, a.b, a.b.c or a.b.c.d; the last part fills the remaining bytes."""
    if not text[:1].isdigit():
        return None  # every part starts with a digit (`0x` too): a name, as a rule
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        value = _number(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 0xFF for v in head) or last >= 1 << (8 * (5 - len(values))):
        return None
    result = 0
    for value in head:
        result = result << 8 | value
    result = result << (8 * (5 - len(values))) | last
    return ipaddress.IPv4Address(result)


def _number(part: str) -> int | None:
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    allowed = _DIGITS[base]
    if not digits or not all(c in allowed for c in digits):
        return None
    return int(digits, base)


_DIGITS = {10: frozenset("0123456789"), 8: frozenset("01234567"), 16: frozenset(string.hexdigits)}
