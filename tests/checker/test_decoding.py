"""Content-Encoding decoding without a network: every coding and chain of codings gives back
the bytes, fed whole or a byte at a time; a bomb never yields more than the room it is given,
in the last coding or in one inside another; what cannot be decoded says why."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import pytest
from checker.targets import encoded, zeros

from periodic_checker.decoding import STEP, BodyDecoder, DecodeError

TEXT = b"<html><body><h1>hello periodic checker</h1></body></html>" * 50


def decode_all(header: str, wire: bytes, *, piece: int, room: int = 1 << 30) -> bytes:
    decoder = BodyDecoder.for_header(header)
    assert decoder is not None
    out: list[bytes] = []
    for at in range(0, len(wire), piece):
        out += decoder.feed(wire[at : at + piece], room - sum(map(len, out)))
    out += decoder.finish(room - sum(map(len, out)))
    return b"".join(out)


def apply(data: bytes, codings: list[str], *, members: int = 1) -> bytes:
    for coding in codings:
        data = encoded(data, coding, members=members)
    return data


CHAINS = [
    ["gzip"],
    ["deflate"],
    ["br"],
    ["zstd"],
    ["gzip", "br"],
    ["br", "gzip"],
    ["deflate", "zstd", "br"],
    ["gzip", "gzip", "gzip", "gzip", "gzip"],
]


@pytest.mark.parametrize("codings", CHAINS, ids=[",".join(c) for c in CHAINS])
@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_every_chain_gives_the_bytes_back(codings: list[str], piece: int) -> None:
    wire = apply(TEXT, codings)

    assert decode_all(", ".join(codings), wire, piece=piece) == TEXT


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
@pytest.mark.parametrize("piece", [1, 1 << 20])
def test_every_member_is_read(coding: str, piece: int) -> None:
    wire = apply(TEXT, [coding], members=3)

    assert decode_all(coding, wire, piece=piece) == TEXT


def test_zero_padding_after_a_gzip_member_is_skipped() -> None:
    wire = gzip.compress(TEXT) + bytes(100) + gzip.compress(b"tail") + bytes(3)

    assert decode_all("gzip", wire, piece=5) == TEXT + b"tail"


def test_raw_deflate_is_read_as_deflate() -> None:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    wire = compressor.compress(TEXT) + compressor.flush()

    assert decode_all("deflate", wire, piece=3) == TEXT


@pytest.mark.parametrize("header", ["", "identity", " identity , "])
def test_identity_needs_no_decoder(header: str) -> None:
    assert BodyDecoder.for_header(header) is None


@pytest.mark.parametrize(
    ("header", "wire", "words"),
    [
        ("compress", b"", "unsupported content-encoding 'compress'"),
        ("gzip, x-unknown", b"", "unsupported content-encoding 'x-unknown'"),
        ("gzip, " * 5 + "gzip", b"", "more than 5 content codings"),
        ("gzip", gzip.compress(TEXT) + b"garbage", "header"),
        ("gzip", b"not gzip at all", "header"),
        ("br", b"\xff" * 64, "brotli"),
        ("zstd", b"not zstd", "Unknown frame descriptor"),
        # A frame that asks for a 128 MiB window: refused, not allocated (RFC 8878: 8 MiB).
        ("zstd", encoded(b"x", "zstd")[:4] + b"\x00\x88", "too much memory"),
    ],
)
def test_what_cannot_be_decoded_says_why(header: str, wire: bytes, words: str) -> None:
    with pytest.raises(DecodeError, match=words):
        decode_all(header, wire, piece=1 << 20)


BOMBS = [["gzip"], ["br"], ["zstd"], ["gzip", "br"], ["br", "zstd"], ["zstd", "gzip"]]


@pytest.mark.parametrize("codings", BOMBS, ids=[",".join(c) for c in BOMBS])
def test_a_bomb_yields_no_more_than_the_room(codings: list[str]) -> None:
    room = 1 << 20
    wire = apply(zeros(64), codings)
    decoder = BodyDecoder.for_header(", ".join(codings))
    assert decoder is not None

    tracemalloc.start()
    try:
        first = decoder.feed(wire, room)
        rest = decoder.finish(1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert sum(map(len, first)) == room
    assert sum(map(len, rest)) == 1
    # The output (built in a buffer, then copied: twice the room at most) and a few steps of
    # the inner codings', never the 64 MiB they hold.
    assert peak < 2 * room + 8 * STEP + len(wire), peak
