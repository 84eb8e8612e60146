"""Content negotiation, ranges, ETags and request-body limits."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from neurotrale_twisted.encoding import encode_body
from neurotrale_twisted.http import (
    Unsatisfiable,
    choose_encoding,
    fold_slashes,
    none_match,
    single_range,
)
from tests.conftest import RunningServer
from tests.support import raw_http


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, None),
        (b"", None),
        (b"gzip, deflate, br, zstd", "zstd"),
        (b"gzip, deflate, br", "gzip"),
        (b"deflate", None),
        (b"br", None),
        (b"identity", None),
        (b"gzip;q=0", None),
        (b"zstd;q=0.5, gzip", "gzip"),
        (b"*", "zstd"),
        (b"*, zstd;q=0", "gzip"),
        (b"GZIP", "gzip"),
        (b"gzip;q=abc, zstd", "zstd"),
        (b"x;;;,", None),
    ],
)
def test_choose_encoding(header: bytes | None, chosen: str | None) -> None:
    assert choose_encoding(header) == chosen


def test_encode_body_skips_what_does_not_shrink() -> None:
    noise = bytes(range(256)) * 2
    import os

    random = os.urandom(4096)
    assert encode_body(random, "gzip") == (random, None)
    assert encode_body(b"small", "zstd") == (b"small", None)
    body, used = encode_body(noise * 100, "zstd")
    assert used == "zstd" and len(body) < len(noise) * 100


@pytest.mark.parametrize(
    ("header", "length", "span"),
    [
        (None, 10, None),
        (b"bytes=0-3", 10, (0, 4)),
        (b"bytes=5-", 10, (5, 10)),
        (b"bytes=-3", 10, (7, 10)),
        (b"bytes=-30", 10, (0, 10)),
        (b"bytes=8-100", 10, (8, 10)),
        (b"bytes=0-1,4-5", 10, None),
        (b"items=0-3", 10, None),
        (b"bytes=-", 10, None),
    ],
)
def test_single_range(header: bytes | None, length: int, span: tuple[int, int] | None) -> None:
    assert single_range(header, length) == span


@pytest.mark.parametrize("header", [b"bytes=10-", b"bytes=10-20", b"bytes=-0", b"bytes=5-2"])
def test_unsatisfiable_ranges(header: bytes) -> None:
    with pytest.raises(Unsatisfiable):
        single_range(header, 10)


def test_none_match() -> None:
    assert none_match(b'"a", "b"', '"b"')
    assert none_match(b'W/"b"', '"b"')
    assert none_match(b"*", '"b"')
    assert not none_match(b'"a"', '"b"')
    assert not none_match(None, '"b"')


def test_fold_slashes() -> None:
    assert fold_slashes([b"a", b"", b"b"]) == [b"a", b"b"]
    assert fold_slashes([b"a", b"b", b""]) == [b"a", b"b", b""]
    assert fold_slashes([b"", b"", b"a"]) == [b"a"]


@pytest_twisted.ensureDeferred
async def test_declared_body_over_the_limit_is_refused_before_it_is_sent(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root, max_body=1000)
    path = data_root / "demo-brain" / "annotations" / "x0y0z0" / "fibers.json"
    before = path.read_bytes()
    # Headers only: the server must answer without waiting for the 10 MB it was promised.
    request = (
        b"PUT /demo-brain/annotations/x0y0z0/fibers.json HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n[]"
    )
    answer = await deferToThread(raw_http, server.port.getHost().port, request, 5.0)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Access-Control-Allow-Origin: *" in head
    assert json.loads(body)["status"] == 413
    assert path.read_bytes() == before


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_refused(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root, max_body=1000)
    path = data_root / "demo-brain" / "annotations" / "x0y0z0" / "fibers.json"
    before = path.read_bytes()
    piece = b"[" + b" " * 1500 + b"]"
    request = (
        b"PUT /demo-brain/annotations/x0y0z0/fibers.json HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(piece) + piece + b"\r\n0\r\n\r\n"
    )
    answer = await deferToThread(raw_http, server.port.getHost().port, request, 5.0)
    assert answer.startswith(b"HTTP/1.1 413")
    assert path.read_bytes() == before
