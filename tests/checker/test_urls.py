"""checker_common.urls: the URL a task or a `Location` sends the probe to, spelled as written
(what each spelling asks the server for is proven against curl in test_curl_agreement.py)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from checker_common import urls
from checker_common.urls import InvalidURL, parse_url, redirect_target


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

_LABELS = st.text("abcxyz0189-_", min_size=1, max_size=8) | st.sampled_from(
    ["xn--bcher-kva", "xn--zz", "a" * 64, "-a", "a-", "127", "0x7f", "B"]
)
_PCHARS = "!$&'()*+,;=:@aZ09._~%/-"


@st.composite
def _task_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "https", "http", "https", "HTTP", "Https"]))
    host = ".".join(draw(st.lists(_LABELS, min_size=1, max_size=4)))
    port = draw(
        st.none()
        | st.integers(0, 70_000).map(str)
        | st.sampled_from(["80", "443", "080", "65535", "65536"])
    )
    path = draw(st.text(_PCHARS + "é. ", max_size=20))
    query = draw(st.none() | st.text(_PCHARS + "?é ", max_size=12))
    fragment = draw(st.none() | st.text("ab#?", max_size=4))
    return (
        f"{scheme}://{host}{'' if port is None else ':' + port}"
        f"{'' if not path else '/' + path}{'' if query is None else '?' + query}"
        f"{'' if fragment is None else '#' + fragment}"
    )


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


def _slow_reading(text: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    with monkeypatch.context() as patched:
        patched.setattr(urls, "_plain", lambda _text: None)
        return _reading(text)


@given(_task_urls())
@settings(max_examples=3000, deadline=None)
def test_a_plainly_spelled_url_is_read_in_one_step_exactly_as_in_three(text: str) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _reading(text) == _slow_reading(text, monkeypatch)


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
