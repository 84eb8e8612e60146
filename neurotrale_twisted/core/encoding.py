"""Compressing response bodies for the wire (runs on worker threads, never the reactor's).

Which coding to use is the HTTP layer's choice (``web.negotiation.choose_encoding``); this
module only produces the bytes.
"""

from __future__ import annotations

import gzip
import threading

import zstandard

#: Bodies smaller than this are sent as they are: compressing them saves nothing.
MIN_COMPRESSED_SIZE = 256

_zstd = threading.local()


def compress(body: bytes, coding: str) -> bytes:
    """Compress ``body`` with ``coding`` (``zstd`` or ``gzip``) at a fast level."""
    if coding == "gzip":
        return gzip.compress(body, compresslevel=1, mtime=0)
    if coding == "zstd":
        compressor = getattr(_zstd, "compressor", None)
        if compressor is None:
            # One compressor per thread: a ZstdCompressor must not be shared between threads.
            compressor = _zstd.compressor = zstandard.ZstdCompressor(level=1)
        return bytes(compressor.compress(body))
    raise ValueError(f"unsupported coding {coding!r}")


def encode_body(body: bytes, coding: str | None) -> tuple[bytes, str | None]:
    """``body`` in ``coding`` when that makes it smaller; else the body as it is, and None."""
    if coding is None or len(body) < MIN_COMPRESSED_SIZE:
        return body, None
    encoded = compress(body, coding)
    if len(encoded) >= len(body):
        return body, None
    return encoded, coding


class CompressionLimit:
    """At most ``limit`` bodies compressed at once (None: no limit).

    Compressing a chunk costs a core for milliseconds. When ``limit`` are being compressed
    already, every core is busy: a body sent as it is reaches the client sooner than one
    queued behind them, and the CPU goes to the answers instead. On a slow link the server's
    cores are idle and every body is compressed; it is a busy server on a fast one (where
    bytes are cheap) that sends some uncompressed.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._busy = 0
        self._lock = threading.Lock()

    def encode(self, body: bytes, coding: str | None) -> tuple[bytes, str | None] | None:
        """:func:`encode_body` of ``body``, or None when ``limit`` are being compressed now
        (the caller sends it as it is, and keeps no compressed answer)."""
        if coding is None or self.limit is None:
            return encode_body(body, coding)
        with self._lock:
            if self._busy >= self.limit:
                return None
            self._busy += 1
        try:
            return encode_body(body, coding)
        finally:
            with self._lock:
                self._busy -= 1
