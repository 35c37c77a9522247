"""checker_common.urls: the URL a task or a `Location` sends the probe to, spelled as written
(what each spelling asks the server for is proven against curl in test_curl_agreement.py)."""

from __future__ import annotations

import pytest
from yarl import URL

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
