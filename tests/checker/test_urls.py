"""checker_common.urls: the URL a task or a `Location` sends the probe to, spelled as written
(what each spelling asks the server for is proven against curl in test_curl_agreement.py)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from yarl import URL

from checker_common import urls
from checker_common.urls import InvalidURL, parse_url, redirect_target
from periodic_checker.policy import TargetPolicy


@pytest.mark.parametrize(
    ("text", "host", "request_target"),
    [
        ("http://h/next?to=%2Fhome", "h", "/next?to=%2Fhome"),
        ("http://h/a%2Fb%41?q=%3F%7e", "h", "/a%2Fb%41?q=%3F%7e"),
        ("http://h/broken%zz", "h", "/broken%zz"),
        ("http://h/a/./b/../c", "h", "/a/c"),
        ("http://h?q=1", "h", "/?q=1"),
        ("http://bücher.test/café?x=ü", "xn--bcher-kva.test", "/caf%C3%A9?x=%C3%BC"),
        ("HTTP://User:p%40ss@H:81/x", "h", "/x"),
        # A path that starts with // is a path of the same host, as curl asks for it (it was
        # read as a network-path reference: fetched from 169.254.169.254).
        ("http://127.0.0.1:9//169.254.169.254/latest", "127.0.0.1", "//169.254.169.254/latest"),
        ("http://h//a:b/c?q=1", "h", "//a:b/c?q=1"),
        ("http://h//", "h", "//"),
    ],
)
def test_a_task_url_is_fetched_as_written(text: str, host: str, request_target: str) -> None:
    url = parse_url(text)
    assert (url.raw_host, url.raw_path_qs) == (host, request_target)


def test_user_info_is_read_as_before() -> None:
    url = parse_url("http://user:p%40ss@h:81/x")
    assert (url.user, url.password, url.port) == ("user", "p@ss", 81)


BASE = URL("http://h:1/row/x?old")


@pytest.mark.parametrize(
    ("location", "target"),
    [
        ("/land/a?next=%2Fhome", "http://h:1/land/a?next=%2Fhome"),
        ("/land/café", "http://h:1/land/caf%C3%A9"),
        ("/land/caf\udce9", "http://h:1/land/caf%E9"),  # a byte that was not UTF-8 (http1.py)
        ("/land/a b?c d", "http://h:1/land/a%20b?c+d"),  # as curl writes spaces
        ("../land/up", "http://h:1/land/up"),
        ("?page=2", "http://h:1/row/x?page=2"),
        ("//other:2/p%2F", "http://other:2/p%2F"),
        ("https://bücher.test/x%2F", "https://xn--bcher-kva.test/x%2F"),
        ("http://[::1]:5/v6", "http://[::1]:5/v6"),
        ("http://h:1//other/x", "http://h:1//other/x"),
    ],
)
def test_a_location_is_followed_as_written(location: str, target: str) -> None:
    assert str(redirect_target(BASE, location)) == target


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("https://[1:2]/", "is not an IPv6 address"),
        ("//[1:2]/", "is not an IPv6 address"),
        ("http://%31%36%39.254.169.254/", "percent-encoded"),
        ("http://a..b/", "empty label"),
        ("http://h:99999/", "cannot be read as a URL"),
        ("file:///etc/passwd", "scheme must be http or https"),
    ],
)
def test_a_location_the_probe_cannot_fetch_is_refused(location: str, reason: str) -> None:
    with pytest.raises(InvalidURL, match=reason):
        redirect_target(BASE, location)


# -- the one-step reading of a plainly spelled URL (`urls._plain`) -------------------------------

_LABELS = ["a", "b", "z", "x0", "09", "a-b", "site-1", "127", "0x7f", "0189", "xn--bcher-kva",
           "xn--zz", "a" * 63, "a" * 64, "b" * 62, "-a", "a-", "a_b", "B", "é"]  # fmt: skip
_PCHARS = "!$&'()*+,;=:@aZ09._~%/-"


def _task_urls(count: int, seed: int) -> list[str]:
    """`count` URLs made of the pieces a task URL has, most of them plainly spelled, many not
    (upper case, IDNA, default or bad ports, dot and empty segments, spaces, a fragment)."""
    rng = random.Random(seed)

    def text(alphabet: str, most: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, most)))

    made = []
    for n in range(count):
        everyday = n % 2 == 0  # every other URL from the pieces of everyday ones only
        scheme = rng.choice(["http", "https"] if everyday else ["http", "https", "HTTP", "Https"])
        labels = _LABELS[:10] if everyday else _LABELS
        host = ".".join(rng.choice(labels) for _ in range(rng.randint(1, 4)))
        port = rng.choice(
            [None, None, None, str(rng.randint(0, 70_000)), "80", "443", "080", "65535", "65536"]
        )
        odd = "" if everyday else "é. \n"
        path = rng.choice(["/"] if everyday else ["", "/", "//", "/./", "/../"])
        path += text(_PCHARS + odd, 20)
        query = rng.choice([None, None, text(_PCHARS + "?" + odd, 12)])
        fragment = None if everyday else rng.choice([None, None, None, text("ab#?", 4)])
        made.append(
            f"{scheme}://{host}{'' if port is None else ':' + port}{path}"
            f"{'' if query is None else '?' + query}{'' if fragment is None else '#' + fragment}"
        )
    # The bounds of a host name, each side of them, and a line end after a plain URL.
    for name in (
        "a" * 63,
        "a" * 64,
        ".".join(["a" * 63] * 4)[:253],
        ".".join(["a" * 63] * 4)[:254],
    ):
        made += [f"http://{name}/", f"http://{name}:8080/x?y"]
    made += ["http://a.b/\n", "http://a.b/x\r\n", "http://a.b:8080/?q\n"]
    return made


def _reading(text: str) -> tuple[Any, ...]:
    """What `parse_url` makes of `text` (not kept): the parts every reader uses, or the error."""
    try:
        url = parse_url.__wrapped__(text)
    except InvalidURL as exc:
        return ("refused", str(exc))
    return (
        str(url), url.scheme, url.raw_host, url.host, url.port, url.explicit_port,
        url.raw_path, url.path, url.raw_query_string, url.query_string, url.fragment,
        url.raw_path_qs, url.raw_user, url.raw_password, url.absolute, hash(url),
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(3))
def test_a_plainly_spelled_url_is_read_in_one_step_exactly_as_in_three(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = _task_urls(3_000, seed)
    one_step = [_reading(t) for t in texts]
    monkeypatch.setattr(urls, "_plain", lambda _text: None)
    three_steps = [_reading(t) for t in texts]
    differ = [(t, a, b) for t, a, b in zip(texts, one_step, three_steps, strict=True) if a != b]
    assert differ == []
    # Both ways were taken: the test compares something.
    monkeypatch.undo()
    assert 0.2 < sum(urls._plain(t) is not None for t in texts) / len(texts) < 0.9


@pytest.mark.parametrize("seed", range(3))
def test_the_host_of_a_plainly_spelled_url_is_read_from_its_spelling_as_parse_url_reads_it(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `plain_host` lets validation and the target policy skip making the URL: for each text it
    # answers, `parse_url` reads a URL (no refusal) of that very host; it answers no other.
    texts = _task_urls(3_000, seed)
    read = [(urls.plain_host(t), urls._plain(t)) for t in texts]
    assert [
        (t, h) for t, (h, p) in zip(texts, read, strict=True) if (h is None) != (p is None)
    ] == []
    hosts = [
        (t, h, parse_url.__wrapped__(t).raw_host)
        for t, (h, _) in zip(texts, read, strict=True)
        if h
    ]
    assert [(t, h, r) for t, h, r in hosts if h != r] == []
    assert 0.2 < len(hosts) / len(texts) < 0.9
    # The policy judges those hosts as it judges the URL read the long way, the addresses it
    # refuses in their loose spellings too.
    literals = ["http://127.0.0.1/", "http://10.1.2.3:8080/x", "http://169.254.169.254/latest",
                "http://127.1/", "http://0x7f.1/", "http://2130706433/", "http://0177.0.0.1/",
                "http://0/", "http://192.168.1.1.example/"]  # fmt: skip
    texts += literals
    deny = "127.0.0.0/8,10.0.0.0/8,169.254.0.0/16,0.0.0.0/8"
    quick = [TargetPolicy.from_strings(deny).check_url(t) for t in texts]
    monkeypatch.setattr(urls, "plain_host", lambda _text: None)
    assert [TargetPolicy.from_strings(deny).check_url(t) for t in texts] == quick
    monkeypatch.undo()
    refused = {t for t, q in zip(texts, quick, strict=True) if q is not None}
    assert set(literals[:-1]) <= refused
    assert all(urls.plain_host(t) is not None for t in literals)


@pytest.mark.parametrize(
    "text",
    [
        "http://site-1.bench.example:9/page/1",
        "https://shop.example.com/p/42?ref=home&x=%2F",
        "http://127.0.0.1:8080/",
        "https://a.b/x;y=1/@z:w",
    ],
)
def test_the_everyday_url_takes_the_one_step_reading(text: str) -> None:
    made = urls._plain(text)
    assert made is not None
    assert made == urls._as_written(text)
    assert str(made) == text
