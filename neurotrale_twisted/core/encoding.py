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
