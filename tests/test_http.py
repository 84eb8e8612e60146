"""Content negotiation, ranges, ETags and request-body limits."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, maybeDeferred
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from neurotrale_twisted.core.encoding import encode_body
from neurotrale_twisted.web.negotiation import (
    Unsatisfiable,
    choose_encoding,
    none_match,
    single_range,
)
from neurotrale_twisted.web.site import HttpSettings, NeurotraleSite, fold_slashes
from tests.conftest import RunningServer
from tests.support import fetch_raw, header, headers_of, raw_http, status_of


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
        (b"identity;q=0", None),
        (b"identity;q=0, gzip", "gzip"),
        (b"gzip;q=0.5, zstd;q=0.4", "gzip"),
        (b"*;q=0", None),
        (b"*;q=0.1, gzip;q=0", "zstd"),
        (b"zstd;q=0.000, gzip;q=0.001", "gzip"),
        (b" gzip ;q=1 ,zstd;q=0 ", "gzip"),
        (b"gzip;level=9", None),
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


@pytest_twisted.ensureDeferred
async def test_accept_encoding_is_read_alike_on_every_compressed_route(
    demo_server: RunningServer,
) -> None:
    """The coding of a chunk and of the OpenAPI document is chosen by one reading of
    ``Accept-Encoding`` (weights, ``*``, refusals by ``q=0``, ``identity``)."""
    cases = [
        ("identity;q=0", None),
        ("identity;q=0, gzip", "gzip"),
        ("gzip;q=0.5, zstd;q=0.4", "gzip"),
        ("*;q=0", None),
        ("*;q=0.1, gzip;q=0", "zstd"),
        ("zstd;q=0, gzip;q=0", None),
        ("GZIP;q=0.2, deflate", "gzip"),
        ("br, deflate", None),
    ]
    for target in ("/demo-brain/1_1_1/0-64_0-64_0-32", "/api/openapi.json"):
        whole, _ = await fetch_raw(demo_server.url + target, {})
        assert header(whole, "content-encoding") is None, target
        for accept, coding in cases:
            response, body = await fetch_raw(demo_server.url + target, {"Accept-Encoding": accept})
            assert response.code == 200, (target, accept)
            assert header(response, "content-encoding") == coding, (target, accept)
            assert "Accept-Encoding" in (header(response, "vary") or ""), (target, accept)
            assert response.length == len(body), (target, accept)


@pytest_twisted.ensureDeferred
async def test_if_none_match_decides_before_if_modified_since(demo_server: RunningServer) -> None:
    """RFC 9110 13.2.2: with ``If-None-Match`` present, ``If-Modified-Since`` is ignored, so
    a list naming no current ETag is a 200 whatever the date; without it, the date decides."""
    url = demo_server.url + "/demo-brain/info"
    first, content = await fetch_raw(url, {})
    etag, modified = header(first, "etag") or "", header(first, "last-modified") or ""
    cases = [
        ({"If-Modified-Since": modified}, 304),
        ({"If-Modified-Since": modified, "If-None-Match": '"a", "b"'}, 200),
        ({"If-Modified-Since": modified, "If-None-Match": f'"a",W/{etag}'}, 304),
        ({"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT", "If-None-Match": etag}, 304),
    ]
    for headers, status in cases:
        response, body = await fetch_raw(url, headers)
        assert response.code == status, headers
        assert body == (content if status == 200 else b""), headers


@pytest_twisted.ensureDeferred
async def test_a_request_twisted_cannot_read_is_a_json_400_with_cors(
    serve: Callable[..., RunningServer], demo_root: Path
) -> None:
    """A malformed request (line, header, body framing) is refused like every other error:
    JSON, the CORS headers of the policy, ``nosniff`` (Twisted's own is a bare status line)."""
    server = serve(demo_root, cors=("https://viewer.lab.org",))
    origin = b"Origin: https://viewer.lab.org\r\n"
    for request in (
        b"GET /demo-brain/info\r\nHost: x\r\n\r\n",
        b"GET /demo-brain/info HTTP/1.1\r\nHost: x\r\n" + origin + b"no colon\r\n\r\n",
        b"PUT /demo-brain/annotations/x0y0z0/a.json HTTP/1.1\r\nHost: x\r\n"
        + origin
        + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n[]",
    ):
        answer = await deferToThread(raw_http, server.port.getHost().port, request, 5.0)
        headers = headers_of(answer)
        assert status_of(answer) == 400, (request, answer[:300])
        document = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert document == {"error": document["error"], "status": 400}
        assert headers["content-type"] == ["application/json"]
        assert headers["x-content-type-options"] == ["nosniff"]
        assert headers["vary"] == ["Origin"]
        assert "access-control-expose-headers" in headers
        if origin in request:
            assert headers["access-control-allow-origin"] == ["https://viewer.lab.org"]


class _Broken(Resource):
    """A root whose rendering fails: an error no route's handler sees."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        raise RuntimeError("a bug")


@pytest_twisted.ensureDeferred
async def test_an_error_no_handler_took_is_a_json_500(logged: list[dict[str, Any]]) -> None:
    port = reactor.listenTCP(0, NeurotraleSite(_Broken(), HttpSettings()), interface="127.0.0.1")
    try:
        request = b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await deferToThread(raw_http, port.getHost().port, request, 5.0)
    finally:
        await maybeDeferred(port.stopListening)
    assert status_of(answer) == 500, answer[:300]
    assert headers_of(answer)["content-type"] == ["application/json"]
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": "internal server error",
        "status": 500,
    }
    assert any(e.get("log_failure") is not None for e in logged)


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


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks), time.monotonic() - started


def slow_client(port: int, interval: float, limit: float) -> tuple[bytes, float]:
    """Send a request one byte per ``interval`` until the server answers or closes."""
    request = b"GET /demo-brain/info HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], interval)
            if readable or time.monotonic() - started > limit:
                break
        answer, _ = read_until_closed(sock, limit)
        return answer, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_a_client_too_slow_to_send_its_request_is_dropped(
    serve: Callable[..., RunningServer], demo_root: Path
) -> None:
    server = serve(demo_root, request_timeout=1.0)
    answer, took = await deferToThread(slow_client, server.port.getHost().port, 0.25, 10)
    assert answer.startswith(b"HTTP/1.1 408")
    assert 0.9 < took < 5


def idle_client(port: int, limit: float) -> tuple[bytes, float]:
    """Make one keep-alive request, then wait for the server to close the idle connection."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /demo-brain/info HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        rest, took = read_until_closed(sock, limit)
        return first + rest, took


@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_connections_are_closed(
    serve: Callable[..., RunningServer], demo_root: Path
) -> None:
    server = serve(demo_root, idle_timeout=1.0)
    answer, took = await deferToThread(idle_client, server.port.getHost().port, 10)
    assert answer.startswith(b"HTTP/1.1 200")
    assert took < 5  # closed by the server, not by our 10 s limit


@pytest_twisted.ensureDeferred
async def test_headers_over_the_limit_are_refused(
    serve: Callable[..., RunningServer], demo_root: Path
) -> None:
    server = serve(demo_root, max_header_bytes=2048)
    port = server.port.getHost().port
    small = b"GET /demo-brain/info HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 1000 + b"\r\n\r\n"
    long_line = b"GET /demo-brain/info HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 3000 + b"\r\n\r\n"
    many = b"GET /demo-brain/info HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 1500 + b"\r\n"
    many += b"X-B: " + b"b" * 1500 + b"\r\n\r\n"
    assert (await deferToThread(raw_http, port, small, 5.0)).startswith(b"HTTP/1.1 200")
    assert (await deferToThread(raw_http, port, long_line, 5.0)).startswith(b"HTTP/1.1 431")
    assert (await deferToThread(raw_http, port, many, 5.0)).startswith(b"HTTP/1.1 400")


@pytest_twisted.ensureDeferred
async def test_a_flood_of_chunk_requests_queues_behind_the_decode_threads(
    serve: Callable[..., RunningServer], demo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(demo_root, threads=2, cache_bytes=0)
    source = server.app.chunks
    running, peak = [0], [0]
    lock = threading.Lock()
    original = source._raw

    def counting(*args: Any) -> bytes:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.01)
            return original(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(source, "_raw", counting)
    names = sorted(p.stem for p in (demo_root / "demo-brain" / "1_1_1").glob("*.tiff"))
    urls = [f"{server.url}/demo-brain/1_1_1/{name}" for name in names] * 3
    responses = await gatherResults([treq.get(url) for url in urls])
    bodies = await gatherResults([treq.content(r) for r in responses])
    assert all(r.code == 200 for r in responses)
    assert all(len(b) > 0 for b in bodies)
    assert peak[0] == 2  # never more decodes at once than threads


@pytest_twisted.ensureDeferred
async def test_refusals_sent_before_the_request_is_whole_carry_the_cors_policy(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root, max_body=1000, cors=("https://viewer.lab.org",))
    request = (
        b"PUT /demo-brain/annotations/x0y0z0/fibers.json HTTP/1.1\r\nHost: x\r\n"
        b"Origin: https://viewer.lab.org\r\nContent-Length: 10000000\r\n\r\n"
    )
    answer = await deferToThread(raw_http, server.port.getHost().port, request, 5.0)
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 413")
    assert b"Access-Control-Allow-Origin: https://viewer.lab.org" in head
    assert b"Access-Control-Allow-Credentials: true" in head
    assert b"Vary: Origin" in head
