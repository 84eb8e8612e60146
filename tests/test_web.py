"""The image and file routes, through the real server on a real port, with treq."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest_twisted
import tifffile
import treq
import zstandard
from twisted.internet.threads import deferToThread

from tests.conftest import RunningServer
from tests.support import fetch_raw, header, raw_http, raw_of, write_chunk, write_info

CHUNK = "/demo-brain/1_1_1/0-64_0-64_0-32"
BROWSER_ENCODINGS = "gzip, deflate, br, zstd"


def expected_chunk(root: Path, relative: str) -> bytes:
    """The raw bytes of a chunk file of the demo, decoded independently of the server."""
    return raw_of(tifffile.imread(root / (relative.lstrip("/") + ".tiff"))[np.newaxis])


@pytest_twisted.ensureDeferred
async def test_every_chunk_of_every_scale_is_byte_exact(demo_server: RunningServer) -> None:
    root = demo_server.root
    files = sorted(root.glob("demo-brain/*/*.tiff"))
    assert len(files) > 30
    for path in files:
        relative = str(path.relative_to(root).with_suffix(""))
        response = await treq.get(f"{demo_server.url}/{relative}")
        body = await treq.content(response)
        assert response.code == 200
        assert header(response, "content-type") == "application/octet-stream"
        assert header(response, "x-content-type-options") == "nosniff"
        assert body == expected_chunk(root, relative)
        z, y, x = tifffile.imread(path).shape
        assert len(body) == x * y * z * 2


@pytest_twisted.ensureDeferred
async def test_tiff_suffix_and_double_slashes(demo_server: RunningServer) -> None:
    want = expected_chunk(demo_server.root, CHUNK)
    for url in [
        CHUNK + ".tiff",
        "/demo-brain//1_1_1/0-64_0-64_0-32",
        "//demo-brain/1_1_1//0-64_0-64_0-32",
    ]:
        response = await treq.get(demo_server.url + url)
        assert response.code == 200, url
        assert await treq.content(response) == want


@pytest_twisted.ensureDeferred
async def test_content_encoding_is_negotiated(demo_server: RunningServer) -> None:
    want = expected_chunk(demo_server.root, CHUNK)
    cases = [
        (BROWSER_ENCODINGS, "zstd"),
        ("gzip", "gzip"),
        ("gzip, deflate", "gzip"),
        ("deflate", None),
        ("zstd;q=0, gzip", "gzip"),
        ("identity", None),
        ("*", "zstd"),
    ]
    for accept, coding in cases:
        response, body = await fetch_raw(demo_server.url + CHUNK, {"Accept-Encoding": accept})
        assert response.code == 200
        assert header(response, "content-encoding") == coding, accept
        assert "Accept-Encoding" in (header(response, "vary") or "")
        if coding == "gzip":
            body = gzip.decompress(body)
        elif coding == "zstd":
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=len(want))
        assert body == want, accept


@pytest_twisted.ensureDeferred
async def test_chunk_range_is_never_compressed(demo_server: RunningServer) -> None:
    want = expected_chunk(demo_server.root, CHUNK)
    response, body = await fetch_raw(
        demo_server.url + CHUNK, {"Range": "bytes=100-1099", "Accept-Encoding": "gzip"}
    )
    assert response.code == 206
    assert header(response, "content-encoding") is None
    assert header(response, "content-range") == f"bytes 100-1099/{len(want)}"
    assert body == want[100:1100]
    response = await treq.get(demo_server.url + CHUNK, headers={"Range": "bytes=-10"})
    assert await treq.content(response) == want[-10:]
    response = await treq.get(demo_server.url + CHUNK, headers={"Range": f"bytes={len(want)}-"})
    assert response.code == 416
    assert header(response, "content-range") == f"bytes */{len(want)}"
    assert json.loads(await treq.content(response))["status"] == 416


@pytest_twisted.ensureDeferred
async def test_chunk_head_and_etag(demo_server: RunningServer) -> None:
    want = expected_chunk(demo_server.root, CHUNK)
    response, body = await fetch_raw(demo_server.url + CHUNK, {}, method=b"HEAD")
    assert response.code == 200
    assert int(header(response, "content-length") or 0) == len(want)
    assert body == b""
    for accept in (None, "gzip"):
        headers = {"Accept-Encoding": accept} if accept else {}
        first, _ = await fetch_raw(demo_server.url + CHUNK, headers)
        etag = header(first, "etag")
        assert etag and etag.startswith('"') and not etag.startswith("W/")
        again, body = await fetch_raw(demo_server.url + CHUNK, {**headers, "If-None-Match": etag})
        assert again.code == 304
        assert body == b""
    # An edited file gets a new ETag, and the old one no longer matches.
    path = demo_server.root / (CHUNK.lstrip("/") + ".tiff")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        changed = await treq.get(demo_server.url + CHUNK, headers={"If-None-Match": etag or ""})
        assert changed.code == 200
        assert header(changed, "etag") != etag
        assert await treq.content(changed) == want
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest_twisted.ensureDeferred
async def test_absent_things_are_plain_404s(demo_server: RunningServer) -> None:
    for url in [
        "/demo-brain/1_1_1/0-64_0-64_500-532",
        "/demo-brain/1_1_1/0-64_0-64_500-532.tiff",
        "/demo-brain/9_9_9/0-64_0-64_0-32",
        "/demo-brain/provenance",
        "/demo-brain/mesh/info",
        "/no-such-dataset/1_1_1/0-64_0-64_0-32",
        "/no-such-dataset/info",
    ]:
        response = await treq.get(demo_server.url + url)
        assert response.code == 404, url
        assert header(response, "content-type") == "application/json"
        document = json.loads(await treq.content(response))
        assert document["status"] == 404 and document["error"]
        assert header(response, "access-control-allow-origin") == "*"


@pytest_twisted.ensureDeferred
async def test_nested_multichannel_and_compressed_datasets(
    serve: Callable[..., RunningServer], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    dataset = tmp_path / "lab" / "2024" / "brain7"
    czyx = rng.integers(0, 255, (3, 5, 6, 7), dtype="uint8")
    write_info(dataset, (7, 6, 5), "uint8", channels=3)
    write_chunk(
        dataset,
        "1_1_1",
        (0, 7, 0, 6, 0, 5),
        np.moveaxis(czyx, 0, -1),
        planarconfig="contig",
        compression="zlib",
    )
    single = tmp_path / "lzw"
    zyx = rng.integers(0, 2**31, (4, 9, 8), dtype="uint32")
    write_info(single, (8, 9, 4), "uint32")
    write_chunk(
        single, "1_1_1", (0, 8, 0, 9, 0, 4), zyx.astype(">u4"), byteorder=">", compression="lzw"
    )
    server = serve(tmp_path)
    response = await treq.get(server.url + "/lab/2024/brain7/1_1_1/0-7_0-6_0-5")
    assert response.code == 200
    assert await treq.content(response) == raw_of(czyx)
    response = await treq.get(server.url + "/lzw/1_1_1/0-8_0-9_0-4")
    assert await treq.content(response) == zyx.astype("<u4").tobytes()
    index = await treq.content(await treq.get(server.url + "/"))
    assert b'href="lab/2024/brain7/"' in index and b'href="lzw/"' in index


@pytest_twisted.ensureDeferred
async def test_mismatched_chunk_is_a_500_logged_with_its_path(
    serve: Callable[..., RunningServer], tmp_path: Path, logged: list[dict[str, Any]]
) -> None:
    write_info(tmp_path / "ds", (8, 8, 4), "uint16")
    bad_shape = write_chunk(
        tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 0, 4), np.zeros((3, 8, 8), "uint16")
    )
    bad_type = write_chunk(
        tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 4, 8), np.zeros((4, 8, 8), "uint8")
    )
    corrupt = write_chunk(
        tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 8, 12), np.zeros((4, 8, 8), "uint16")
    )
    corrupt.write_bytes(b"II*\x00garbage")
    server = serve(tmp_path)
    for path in (bad_shape, bad_type, corrupt):
        response = await treq.get(f"{server.url}/ds/1_1_1/{path.stem}")
        assert response.code == 500
        assert json.loads(await treq.content(response))["status"] == 500
        assert header(response, "access-control-allow-origin") == "*"
        lines = [e.get("message", "") for e in logged if e.get("log_level") is not None]
        assert any(str(path) in str(line) for line in lines), path


@pytest_twisted.ensureDeferred
async def test_static_files_types_and_conditional_requests(demo_server: RunningServer) -> None:
    url = demo_server.url + "/demo-brain/info"
    response = await treq.get(url)
    body = await treq.content(response)
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    assert json.loads(body)["scales"][0]["key"] == "1_1_1"
    etag, modified = header(response, "etag"), header(response, "last-modified")
    assert etag and not etag.startswith("W/") and modified
    assert (await treq.get(url, headers={"If-None-Match": etag})).code == 304
    assert (await treq.get(url, headers={"If-Modified-Since": modified})).code == 304
    partial = await treq.get(url, headers={"Range": "bytes=0-9"})
    assert partial.code == 206 and await treq.content(partial) == body[:10]
    head = await treq.head(url)
    assert head.code == 200 and int(header(head, "content-length") or 0) == len(body)
    csv = await treq.get(demo_server.url + "/demo-brain/annotations/block_info.csv")
    assert header(csv, "content-type") == "text/csv"
    # The chunk route finds a chunk's file whichever TIFF suffix the URL spells.
    tif = await treq.get(demo_server.url + "/demo-brain/1_1_1/0-64_0-64_0-32.tif")
    assert await treq.content(tif) == expected_chunk(demo_server.root, CHUNK)


@pytest_twisted.ensureDeferred
async def test_unknown_types_are_never_html(
    serve: Callable[..., RunningServer], tmp_path: Path
) -> None:
    (tmp_path / "README").write_text("<script>alert(1)</script>")
    (tmp_path / "x.unknownext").write_text("<script>alert(1)</script>")
    for name in ("page.html", "page.htm", "image.svg", "doc.xhtml", "code.js"):
        (tmp_path / name).write_text("<script>alert(1)</script>")
    server = serve(tmp_path)
    for name in (
        "README",
        "x.unknownext",
        "page.html",
        "page.htm",
        "image.svg",
        "doc.xhtml",
        "code.js",
    ):
        response = await treq.get(f"{server.url}/{name}")
        assert response.code == 200
        assert header(response, "content-type") == "application/octet-stream"


@pytest_twisted.ensureDeferred
async def test_listing_escapes_names_and_hides_dot_files(
    serve: Callable[..., RunningServer], tmp_path: Path
) -> None:
    nasty = '<img src=x onerror=alert(1)>&"q.txt'
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / nasty).write_text("x")
    (tmp_path / "ds" / ".secret").write_text("token")
    (tmp_path / "ds" / ".versions").mkdir()
    (tmp_path / "ds" / ".versions" / "1.json").write_text("[]")
    server = serve(tmp_path)
    response = await treq.get(server.url + "/ds/")
    page = (await treq.content(response)).decode()
    assert response.code == 200
    assert "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&quot;q.txt" in page
    assert 'href="%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%26%22q.txt"' in page
    assert ".secret" not in page and ".versions" not in page
    for url in ("/ds/.secret", "/ds/.versions/1.json", "/ds/.versions/"):
        assert (await treq.get(server.url + url)).code == 404, url
    redirect = await treq.get(server.url + "/ds", allow_redirects=False)
    assert redirect.code in (301, 302)
    assert (header(redirect, "location") or "").endswith("/ds/")


@pytest_twisted.ensureDeferred
async def test_index_lists_datasets(demo_server: RunningServer) -> None:
    for url in ("/", "/index.html"):
        response = await treq.get(demo_server.url + url)
        assert response.code == 200
        assert header(response, "content-type") == "text/html; charset=utf-8"
        assert b'<a href="demo-brain/">demo-brain</a>' in await treq.content(response)


HOSTILE = [
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/demo-brain/%2e%2e/%2e%2e/etc/passwd",
    "/demo-brain/..%2f..%2f..%2fetc%2fpasswd",
    "/demo-brain/%2E%2E/%2E%2E/etc/passwd",
    "/demo-brain/..%5c..%5cetc%5cpasswd",
    "/%2fetc%2fpasswd",
    "//etc/passwd",
    "/demo-brain/1_1_1/..%2f..%2f..%2f..%2fetc/0-1_0-1_0-1",
    "/demo-brain%00/info",
    "/..%2f/1_1_1/0-64_0-64_0-32",
    "/demo-brain/annotations/..%2f..%2f/fibers.json",
]


@pytest_twisted.ensureDeferred
async def test_hostile_paths_never_leave_the_root(demo_server: RunningServer) -> None:
    for url in HOSTILE:
        answer = await deferToThread(
            raw_http,
            demo_server.port.getHost().port,
            f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 403, 404), (url, answer[:200])
        assert b"root:" not in answer


@pytest_twisted.ensureDeferred
async def test_symbolic_links(serve: Callable[..., RunningServer], tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    write_info(outside / "linked", (8, 8, 2))
    write_chunk(outside / "linked", "1_1_1", (0, 8, 0, 8, 0, 2), np.ones((2, 8, 8), "uint16"))
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside.txt").write_text("inside")
    (root / "escape").symlink_to(outside)
    (root / "ok").symlink_to(root / "inside.txt")
    (root / "linked").symlink_to(outside / "linked")
    strict = serve(root)
    # Without --follow-symlinks a link is followed only while it stays inside the root.
    assert await treq.content(await treq.get(strict.url + "/ok")) == b"inside"
    for url in ("/escape/secret.txt", "/linked/info", "/linked/1_1_1/0-8_0-8_0-2"):
        response = await treq.get(strict.url + url)
        assert response.code == 404, url
        assert b"secret" not in await treq.content(response)
    listing = await treq.content(await treq.get(strict.url + "/index.html"))
    assert b"linked" not in listing
    lenient = serve(root, follow_symlinks=True)
    assert await treq.content(await treq.get(lenient.url + "/ok")) == b"inside"
    assert await treq.content(await treq.get(lenient.url + "/escape/secret.txt")) == b"secret"
    chunk = await treq.get(lenient.url + "/linked/1_1_1/0-8_0-8_0-2")
    assert await treq.content(chunk) == np.ones((2, 8, 8), "<u2").tobytes()


@pytest_twisted.ensureDeferred
async def test_cors_on_every_answer_and_preflight(demo_server: RunningServer) -> None:
    for method, url in [
        ("GET", CHUNK),
        ("GET", "/demo-brain/info"),
        ("GET", "/nope/info"),
        ("PUT", "/demo-brain/info"),
        ("GET", "/%2e%2e/x"),
    ]:
        response = await treq.request(
            method, demo_server.url + url, headers={"Origin": "http://viewer"}
        )
        await treq.content(response)
        assert header(response, "access-control-allow-origin") == "*", (method, url)
        exposed = header(response, "access-control-expose-headers") or ""
        for name in ("ETag", "Content-Length", "Content-Range", "Content-Encoding"):
            assert name in exposed
        assert header(response, "access-control-allow-credentials") is None
    response = await treq.request(
        "OPTIONS",
        demo_server.url + "/demo-brain/annotations/x0y0z0/fibers.json",
        headers={
            "Origin": "http://viewer",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert response.code == 204
    assert "PUT" in (header(response, "access-control-allow-methods") or "")
    assert header(response, "access-control-allow-headers") == "content-type"


@pytest_twisted.ensureDeferred
async def test_configured_origins(serve: Callable[..., RunningServer], demo_root: Path) -> None:
    server = serve(demo_root, cors=("https://viewer.lab.org",))
    good = await treq.get(
        server.url + "/demo-brain/info", headers={"Origin": "https://viewer.lab.org"}
    )
    assert header(good, "access-control-allow-origin") == "https://viewer.lab.org"
    assert header(good, "access-control-allow-credentials") == "true"
    assert "Origin" in (header(good, "vary") or "")
    other = await treq.get(
        server.url + "/demo-brain/info", headers={"Origin": "https://evil.example"}
    )
    assert header(other, "access-control-allow-origin") is None


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_a_json_405(demo_server: RunningServer) -> None:
    for method, url in [("POST", CHUNK), ("DELETE", "/demo-brain/info"), ("PUT", CHUNK)]:
        response = await treq.request(method, demo_server.url + url, data=b"x")
        assert response.code == 405
        assert json.loads(await treq.content(response))["status"] == 405


@pytest_twisted.ensureDeferred
async def test_static_range_past_the_end_is_a_json_416(demo_server: RunningServer) -> None:
    url = demo_server.url + "/demo-brain/info"
    size = len(await treq.content(await treq.get(url)))
    response = await treq.get(url, headers={"Range": f"bytes={size}-{size + 10}"})
    assert response.code == 416
    assert header(response, "content-type") == "application/json"
    assert header(response, "content-range") == f"bytes */{size}"
    assert json.loads(await treq.content(response)) == {
        "error": "range not satisfiable",
        "status": 416,
    }


@pytest_twisted.ensureDeferred
async def test_405_names_the_methods_of_the_route(demo_server: RunningServer) -> None:
    fibers = "/demo-brain/annotations/x0y0z0/fibers.json"
    for url, allowed in [
        (CHUNK, "GET, HEAD, OPTIONS"),
        (fibers, "DELETE, GET, HEAD, PATCH, PUT, OPTIONS"),
    ]:
        response = await treq.post(demo_server.url + url, data=b"x")
        assert response.code == 405
        assert header(response, "allow") == allowed, url
    # A preflight names no Allow (that would be the route's); browsers read the CORS header.
    preflight = await treq.request("OPTIONS", demo_server.url + CHUNK)
    assert preflight.code == 204 and header(preflight, "allow") is None


@pytest_twisted.ensureDeferred
async def test_head_of_a_missing_file_is_a_quiet_404(
    demo_server: RunningServer, logged: list[dict[str, Any]]
) -> None:
    response, body = await fetch_raw(demo_server.url + "/demo-brain/mesh/info", {}, method=b"HEAD")
    assert response.code == 404
    assert header(response, "content-type") == "application/json"
    assert int(header(response, "content-length") or 0) > 0 and body == b""
    assert not any("I think I'll eat it" in str(e.get("log_format", "")) for e in logged)


@pytest_twisted.ensureDeferred
async def test_chunk_fast_path_answers_as_the_klein_route(demo_server: RunningServer) -> None:
    """A chunk URL in plain segments is answered before Klein (``web.ChunkRoutes``); the same
    URL with an escape (``%2D`` for ``-``) goes through Klein's chunk route. Both answers,
    found and missing, plain and compressed, ``GET`` and ``HEAD``, must be the same bytes and
    headers."""
    identity = {"Accept-Encoding": "identity"}
    cases = [
        ("GET", CHUNK, identity, 200),
        ("GET", CHUNK, {"Accept-Encoding": BROWSER_ENCODINGS}, 200),
        ("GET", CHUNK, {**identity, "Range": "bytes=10-19"}, 206),
        ("HEAD", CHUNK, identity, 200),
        ("GET", "/demo-brain/1_1_1/0-64_0-64_0-31", identity, 404),  # no such chunk
        ("GET", "/demo-brain/9_9_9/0-64_0-64_0-32", identity, 404),  # no such scale
    ]
    for method, url, headers, status in cases:
        escaped = url.replace("demo-brain", "demo%2Dbrain")
        answers = []
        for spelling in (url, escaped):
            response = await treq.request(method, demo_server.url + spelling, headers=headers)
            body = await treq.content(response)
            kept = {
                name: values
                for name, values in response.headers.getAllRawHeaders()
                if name.lower() not in (b"date", b"x-neurotrale-worker")
            }
            answers.append((response.code, kept, body))
        assert answers[0][0] == status, (method, url)
        assert answers[0] == answers[1], (method, url)
        if method == "GET" and status == 200 and headers == identity:
            assert answers[0][2] == expected_chunk(demo_server.root, CHUNK)


@pytest_twisted.ensureDeferred
async def test_cached_chunks_are_answered_on_the_reactor_while_looks_are_fast(
    serve: Callable[..., RunningServer], tmp_path: Path, logged: list[dict[str, Any]]
) -> None:
    write_info(tmp_path / "ds", (8, 8, 4), "uint16")
    ones = np.ones((4, 8, 8), "uint16")
    path = write_chunk(tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 0, 4), ones)
    server = serve(tmp_path)
    app = server.app
    on_pool: list[object] = []
    respond = app.chunks.respond

    def counted(*args: Any, **kwargs: Any) -> Any:
        on_pool.append(args)
        return respond(*args, **kwargs)

    app.chunks.respond = counted  # type: ignore[method-assign]
    url = f"{server.url}/ds/1_1_1/0-8_0-8_0-4"

    async def get(**headers: str) -> tuple[int, bytes, str | None]:
        response = await treq.get(url, headers=headers)
        return response.code, await treq.content(response), header(response, "etag")

    first = await get()
    assert first[0] == 200 and first[1] == raw_of(ones[np.newaxis]) and len(on_pool) == 1
    assert await get() == first
    assert (await get(**{"If-None-Match": first[2] or ""}))[0] == 304
    assert len(on_pool) == 1  # answered on the reactor: no thread hand-off
    # A changed file is seen at once (the look finds its new version) and read on the pool.
    write_chunk(tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 0, 4), ones * 2)
    changed = await get()
    assert changed[1] == raw_of((ones * 2)[np.newaxis]) and changed[2] != first[2]
    assert len(on_pool) == 2
    # A look that waited 5 ms (for the interpreter lock, say) now and then changes nothing.
    stamps = iter([0.0, 0.005, 0.0, 0.0, 0.0, 0.0] * 2)  # (start, end) of each look
    app.hits.timer = lambda: next(stamps)
    warnings = [e for e in logged if "cached chunks are looked up on the thread pool" in str(e)]
    for _ in range(6):
        assert await get() == changed
    assert len(on_pool) == 2 and not warnings
    # Slow looks (a loaded network file system) send the looks to the pool for a while.
    ticks = iter(range(0, 10**6, 4))
    app.hits.timer = lambda: next(ticks) / 1000  # every look takes 4 ms
    while len(on_pool) == 2:
        assert await get() == changed
        assert len(logged) < 10**4
    warnings = [e for e in logged if "cached chunks are looked up on the thread pool" in str(e)]
    assert len(warnings) == 1
    assert await get() == changed and await get() == changed
    assert len(on_pool) == 5
    # One stalled look (50 ms) is enough.
    app.hits.paused_until = 0.0
    stalled = iter([0.0, 0.06])
    app.hits.timer = lambda: next(stalled)
    assert await get() == changed and len(on_pool) == 5  # the stalled look answered
    assert await get() == changed and len(on_pool) == 6
    app.hits.paused_until = 0.0  # the pause is over
    app.hits.timer = time.perf_counter
    assert await get() == changed and len(on_pool) == 6
    path.unlink()
    assert (await get())[0] == 404
