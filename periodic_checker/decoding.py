"""Content-Encoding decoders whose output never exceeds what the caller has room for.

A body is decoded in bounded steps, so a compression bomb costs at most what the caller asks
for (the body cap + 1 bytes), whatever its ratio: gzip reaches about 1,000:1, brotli and zstd
far more (64 MiB of zeros are 102 bytes of brotli, 2,066 of zstd: `bench/micro.py bombs`).
Every value of the header counts, in order: `Content-Encoding: gzip, br` (or two header lines,
`gzip` then `br`) was gzipped first, so it is decoded with brotli first, then gzip. An inner
coding's output is pulled in steps of at most `STEP` bytes, only as the next coding needs
input, so a bomb inside another coding is bounded too.

- gzip (`x-gzip`): every member, as Python's gzip module reads them (zero padding between or
  after members is skipped; anything else after a member is an error);
- deflate: zlib-wrapped as the standard says, or raw deflate as some servers send it;
- br: the brotli library, with its output limit (brotli >= 1.2);
- zstd: every frame, with the decoding window at most 8 MiB as RFC 8878 asks of HTTP clients
  (a frame asking for more is an error instead of an allocation);
- identity: nothing to do.

A stream that ends early is judged on what it decoded to; anything else is a `DecodeError`.
"""

from __future__ import annotations

import sys
import zlib
from typing import Final, Protocol

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # its backport, the same module
    from backports import zstd

ACCEPT_ENCODING: Final = "gzip, deflate, br, zstd"
# The most an inner coding produces per pull: the next coding's input, at most this at a time.
STEP: Final = 65_536
# curl refuses more than 5 codings (CVE-2022-32206): each one holds a decoder's state.
MAX_CODINGS: Final = 5
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS
# RFC 8878, 3.1.1.1.2: decoders for HTTP may refuse windows over 8 MiB.
_ZSTD_WINDOW_LOG_MAX: Final = 23


class DecodeError(Exception):
    """The body cannot be decoded; the text says why."""


class _Stage(Protocol):
    """One coding: input written in, output read in pieces of at most `limit` bytes."""

    def write(self, data: bytes) -> None: ...

    def read(self, limit: int) -> bytes:
        """At most `limit` bytes of output; b"" once it needs more input (or has ended)."""
        ...


class _Zlib:
    """gzip (every member) or deflate (zlib-wrapped, else raw)."""

    __slots__ = ("_between", "_ended", "_gzip", "_pending", "_raw_tried", "_z")

    def __init__(self, *, gzip: bool) -> None:
        self._gzip = gzip
        self._z = zlib.decompressobj(_GZIP_WBITS if gzip else zlib.MAX_WBITS)
        # "deflate" is zlib-wrapped by the standard, raw deflate by some servers: try both.
        self._raw_tried = gzip
        self._pending = b""
        self._between = False  # gzip: after a member, before the next one (if any)
        self._ended = False  # deflate: the stream ended; what follows is ignored

    def write(self, data: bytes) -> None:
        if not self._ended:
            self._pending = self._pending + data if self._pending else data

    def read(self, limit: int) -> bytes:
        while self._pending:
            if self._between:
                self._pending = self._pending.lstrip(b"\0")
                if not self._pending:
                    break
                self._z = zlib.decompressobj(_GZIP_WBITS)
                self._between = False
            piece = self._decompress(limit)
            if self._z.eof:
                if self._gzip:
                    self._pending = self._z.unused_data
                    self._between = True
                else:
                    self._pending = b""
                    self._ended = True
            if piece:
                return piece
        return b""

    def _decompress(self, limit: int) -> bytes:
        try:
            try:
                piece = self._z.decompress(self._pending, limit)
            except zlib.error:
                if self._raw_tried:
                    raise
                self._raw_tried = True
                self._z = zlib.decompressobj(-zlib.MAX_WBITS)
                piece = self._z.decompress(self._pending, limit)
        except zlib.error as exc:
            raise DecodeError(str(exc)) from None
        self._raw_tried = True
        self._pending = self._z.unconsumed_tail
        return piece


class _Brotli:
    """brotli, with its output limit: past the limit it keeps the input for the next call."""

    __slots__ = ("_d", "_pending", "_spill")

    def __init__(self) -> None:
        self._d = brotli.Decompressor()
        self._pending = b""
        self._spill = b""  # output past `limit` (the library returns up to ~32 KiB: micro.py bombs)

    def write(self, data: bytes) -> None:
        self._pending = self._pending + data if self._pending else data

    def read(self, limit: int) -> bytes:
        if self._spill:
            piece, self._spill = self._spill[:limit], self._spill[limit:]
            return piece
        while not self._d.is_finished():
            if self._d.can_accept_more_data():
                if not self._pending:
                    return b""
                data, self._pending = self._pending, b""
            else:
                data = b""
            try:
                # Its buffer grows past the limit by doubling: asked for little at a time.
                out: bytes = self._d.process(data, output_buffer_limit=min(limit, STEP))
            except brotli.error as exc:
                raise DecodeError(str(exc) or "invalid brotli data") from None
            if len(out) > limit:
                out, self._spill = out[:limit], out[limit:]
            if out:
                return out
            if not data:
                break  # nothing came of an empty call: more input is needed
        self._pending = b""  # after the end of the stream: ignored
        return b""


class _Zstd:
    """zstd, every frame."""

    __slots__ = ("_d", "_pending")

    def __init__(self) -> None:
        self._d = self._new()
        self._pending = b""

    @staticmethod
    def _new() -> zstd.ZstdDecompressor:
        window: dict[int, int] = {zstd.DecompressionParameter.window_log_max: _ZSTD_WINDOW_LOG_MAX}
        return zstd.ZstdDecompressor(options=window)

    def write(self, data: bytes) -> None:
        self._pending = self._pending + data if self._pending else data

    def read(self, limit: int) -> bytes:
        while True:
            if self._d.needs_input:
                if not self._pending:
                    return b""
                data, self._pending = self._pending, b""
            else:
                data = b""
            try:
                out: bytes = self._d.decompress(data, limit)
            except zstd.ZstdError as exc:
                raise DecodeError(str(exc)) from None
            if self._d.eof:
                # Another frame may follow: a new decompressor for it.
                self._pending = self._d.unused_data + self._pending
                self._d = self._new()
            if out:
                return out
            if not data and not self._pending:
                return b""


def _stage(coding: str) -> _Stage:
    if coding in ("gzip", "x-gzip"):
        return _Zlib(gzip=True)
    if coding == "deflate":
        return _Zlib(gzip=False)
    if coding == "br":
        return _Brotli()
    if coding == "zstd":
        return _Zstd()
    raise DecodeError(f"unsupported content-encoding {coding[:40]!r}")


class BodyDecoder:
    """The codings of one response, undone in the reverse of the order they were applied."""

    __slots__ = ("_stages",)

    def __init__(self, stages: list[_Stage]) -> None:
        self._stages = stages  # [0] gets the bytes from the network

    @classmethod
    def for_header(cls, content_encoding: str) -> BodyDecoder | None:
        """The decoder for a Content-Encoding value (every header line joined with ", "), or
        None when there is nothing to undo. DecodeError for a coding it does not know."""
        codings = [c.strip().lower() for c in content_encoding.split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if not codings:
            return None
        if len(codings) > MAX_CODINGS:
            raise DecodeError(f"more than {MAX_CODINGS} content codings")
        return cls([_stage(coding) for coding in reversed(codings)])

    def feed(self, data: bytes, room: int) -> list[bytes]:
        """Decode `data`, returning at most `room` bytes (room >= 1); stops there."""
        self._stages[0].write(data)
        return self.finish(room)

    def finish(self, room: int) -> list[bytes]:
        """What is left to decode of the input already fed, at most `room` bytes."""
        out: list[bytes] = []
        last = len(self._stages) - 1
        while room > 0:
            piece = self._pull(last, room)
            if not piece:
                break
            out.append(piece)
            room -= len(piece)
        return out

    def _pull(self, index: int, limit: int) -> bytes:
        stage = self._stages[index]
        while True:
            piece = stage.read(limit)
            if piece or index == 0:
                return piece
            upstream = self._pull(index - 1, STEP)
            if not upstream:
                return b""
            stage.write(upstream)
