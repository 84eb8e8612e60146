"""Reads attacked again, by the next spelling of each finding of issue 11.

Over raw sockets: ranges a file is shorter than, several ranges, ``If-None-Match`` lists and
weak tags on the static route, request targets that are not a plain path (``*``, the
absolute form, no leading ``/``). Through the data root, as someone who may write there:
names that are not UTF-8, unreadable chunks, a directory full of names, and links that
multiply the index walk under ``--follow-symlinks``. Each answer is the one RFC 9110/9112
asks for, or a JSON 4xx; none is a 500, a hung connection or a blocked reactor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest_twisted
import tifffile
import treq
from twisted.internet.threads import deferToThread

from neurotrale_twisted.core.static import MAX_LISTED
from tests.conftest import RunningServer
from tests.support import headers_of, raw_http, status_of, write_chunk, write_info

INFO = "/demo-brain/info"
CHUNK = "/demo-brain/1_1_1/0-64_0-64_0-32"
FIBERS = "/demo-brain/annotations/x0y0z0/fibers.json"


def _body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


async def _raw(server: RunningServer, request: bytes, timeout: float = 10.0) -> bytes:
    return await deferToThread(raw_http, server.port.getHost().port, request, timeout)


def _get(target: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- Range ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_static_ranges_a_file_is_shorter_than_or_several_ranges(
    demo_server: RunningServer,
) -> None:
    """A suffix longer than the file is the whole file (RFC 9110 14.1.3); several ranges,
    unsatisfiable ones among them, are answered whole or 416, never a 500 or a hang."""
    content = (demo_server.root / "demo-brain" / "info").read_bytes()
    size = len(content)
    whole = [
        f"bytes=-{size + 1}",
        "bytes=-99999999999999999999999",
        "bytes=0-0,-1",
        "bytes=0-0,-5000",
        "bytes=0-1,-99999999999999999999999",
        f"bytes={size + 10}-{size + 20},0-1",
        "bytes=0-3,2-5",
    ]
    for spec in whole:
        for method in ("GET", "HEAD"):
            answer = await _raw(demo_server, _get(INFO, f"Range: {spec}", method=method), 5)
            assert answer, (spec, method, "no answer: the connection hung")
            status, headers = status_of(answer), headers_of(answer)
            assert status in (200, 206), (spec, method, answer[:300])
            if status == 206:
                assert headers["content-range"] == [f"bytes 0-{size - 1}/{size}"], spec
            assert headers["content-length"] == [str(size)], (spec, method)
            assert _body(answer) == (content if method == "GET" else b""), (spec, method)
    for spec in (f"bytes={size + 10}-{size + 20},{size + 30}-", f"bytes={size}-"):
        answer = await _raw(demo_server, _get(INFO, f"Range: {spec}"), 5)
        assert status_of(answer) in (200, 416), (spec, answer[:300])
        if status_of(answer) == 416:
            assert json.loads(_body(answer))["status"] == 416
            assert headers_of(answer)["content-range"] == [f"bytes */{size}"]
    # An ordinary single range still works.
    answer = await _raw(demo_server, _get(INFO, "Range: bytes=-5"))
    assert (status_of(answer), _body(answer)) == (206, content[-5:])


# --- If-None-Match ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_if_none_match_lists_and_weak_tags_on_every_read_route(
    demo_server: RunningServer,
) -> None:
    """Any spelling of a list (RFC 9110 5.6.1) and a weak tag (weak comparison, 13.1.2) is a
    304 on the static route as on the chunks', and a 304 says no ``Content-Length: 0``."""
    for target in (INFO, CHUNK, FIBERS, "/api/openapi.json", "/api/history.js"):
        answer = await _raw(demo_server, _get(target))
        etag = headers_of(answer)["etag"][0]
        weak_list = f'W/"a",W/{etag}'
        for header in (
            etag,
            f'"a", {etag}',
            f'"a",{etag}',
            f"W/{etag}",
            f'"x" ,W/{etag}',
            weak_list,
            "*",
        ):
            for method in ("GET", "HEAD"):
                answer = await _raw(
                    demo_server, _get(target, f"If-None-Match: {header}", method=method)
                )
                assert status_of(answer) == 304, (target, header, method, answer[:200])
                assert _body(answer) == b""
                assert headers_of(answer).get("content-length", [None]) != ["0"], (target, method)
                assert headers_of(answer)["etag"] == [etag]
        for header in ('"a", "b"', etag[:-1], etag.strip('"')):
            answer = await _raw(demo_server, _get(target, f"If-None-Match: {header}"))
            assert status_of(answer) == 200, (target, header)


# --- request targets --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_asterisk_is_answered_like_every_other_request(
    demo_server: RunningServer,
) -> None:
    """``OPTIONS *`` is the server's own capabilities; any other method on ``*`` is refused
    like any other request (JSON, CORS, ``nosniff``; 501 for an unknown method)."""
    answer = await _raw(demo_server, _get("*", "Origin: https://viewer.example", method="OPTIONS"))
    headers = headers_of(answer)
    assert status_of(answer) in (200, 204), answer[:300]
    assert headers["access-control-allow-origin"] == ["*"]
    assert headers["x-content-type-options"] == ["nosniff"]
    for method, status in (("GET", 405), ("DELETE", 405), ("get", 405), ("FOO", 501)):
        answer = await _raw(demo_server, _get("*", method=method))
        headers = headers_of(answer)
        assert status_of(answer) == status, (method, answer[:300])
        assert json.loads(_body(answer)) == {
            "error": json.loads(_body(answer))["error"],
            "status": status,
        }
        assert headers["access-control-allow-origin"] == ["*"]
        assert headers["x-content-type-options"] == ["nosniff"]
    no_host = b"OPTIONS * HTTP/1.1\r\nConnection: close\r\n\r\n"
    assert status_of(await _raw(demo_server, no_host)) == 400


@pytest_twisted.ensureDeferred
async def test_request_targets_that_are_not_a_path(demo_server: RunningServer) -> None:
    """The absolute form is served as its path (RFC 9112 3.2.2: a server MUST accept it);
    a target without a leading ``/`` (nor ``*``, nor a scheme) is a 400, never a path
    missing its first letter."""
    content = (demo_server.root / "demo-brain" / "info").read_bytes()
    for target in (f"http://localhost{INFO}", f"HTTP://other.example:81{INFO}"):
        answer = await _raw(demo_server, _get(target))
        assert (status_of(answer), _body(answer)) == (200, content), (target, answer[:300])
    answer = await _raw(demo_server, _get("http://localhost"))
    assert status_of(answer) == 200 and b"demo-brain" in _body(answer)
    for target in ("xdemo-brain/info", "demo-brain/info", "xhealthz", "%2fdemo-brain/info"):
        for method in ("GET", "PUT", "DELETE"):
            answer = await _raw(demo_server, _get(target, method=method))
            assert status_of(answer) == 400, (target, method, answer[:300])
            assert json.loads(_body(answer))["status"] == 400
            assert headers_of(answer)["access-control-allow-origin"] == ["*"]


# --- names and permissions on disk ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_names_that_are_not_utf8_are_left_out_of_the_index_and_listings(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """A name no URL can spell (not UTF-8) breaks neither the index nor a listing."""
    os.mkdir(bytes(data_root) + b"/bad\xffname")
    (Path(os.fsdecode(bytes(data_root) + b"/bad\xffname")) / "info").write_text("{}")
    write_info(data_root / "good", (8, 8, 2))
    with open(bytes(data_root) + b"/demo-brain/f\xfe.txt", "wb") as f:
        f.write(b"x")
    os.mkdir(bytes(data_root) + b"/demo-brain/d\xfe")
    server = serve(data_root)
    index = await treq.get(server.url + "/")
    page = (await treq.content(index)).decode()
    assert index.code == 200, page
    assert 'href="demo-brain/"' in page and 'href="good/"' in page and "bad" not in page
    listing = await treq.get(server.url + "/demo-brain/")
    page = (await treq.content(listing)).decode()
    assert listing.code == 200, page
    assert 'href="info"' in page and "f%" not in page and "d%" not in page


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run as ``nobody`` for a while when root (who reads everything), so that
    permissions count; the server in this process runs with them too."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest_twisted.ensureDeferred
async def test_unreadable_datasets_scales_chunks_and_infos_are_403s(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """chmod 000 anywhere on a chunk's way is a JSON 403 with no path, never a 500."""
    demo = data_root / "demo-brain"
    for name in ("locked", "noinfo", "noscale", "nochunk"):
        shutil.copytree(demo, data_root / name)
    (data_root / "locked").chmod(0)
    (data_root / "noinfo" / "info").chmod(0)
    (data_root / "noscale" / "1_1_1").chmod(0)
    (data_root / "nochunk" / "1_1_1" / "0-64_0-64_0-32.tiff").chmod(0)
    server = serve(data_root)
    try:
        with unprivileged():
            assert (await treq.get(server.url + CHUNK)).code == 200
            for name in ("locked", "noinfo", "noscale", "nochunk"):
                for suffix in ("", ".tiff"):
                    response = await treq.get(f"{server.url}/{name}/1_1_1/0-64_0-64_0-32{suffix}")
                    document = json.loads(await treq.content(response))
                    assert response.code == 403, (name, document)
                    assert document == {"error": document["error"], "status": 403}
                    assert str(data_root) not in document["error"]
    finally:
        for path in (data_root / "locked", data_root / "noinfo" / "info"):
            path.chmod(0o755)
        (data_root / "noscale" / "1_1_1").chmod(0o755)


@pytest_twisted.ensureDeferred
async def test_a_huge_directory_lists_its_first_names_only(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """A directory of more names than a page shows lists the first ones and says how many
    there are: its page costs the same whatever the attacker puts in the directory."""
    big = data_root / "big"
    big.mkdir()
    count = MAX_LISTED + 1500
    for i in range(count):
        os.close(os.open(big / f"f{i:06d}.txt", os.O_CREAT | os.O_WRONLY, 0o644))
    (big / "sub").mkdir()
    server = serve(data_root)
    for method in ("GET", "HEAD"):
        answer = await _raw(server, _get("/big/", method=method), 30)
        assert status_of(answer) == 200
        page = _body(answer).decode()
        if method == "HEAD":
            assert page == ""
            continue
        assert page.count("<tr") == MAX_LISTED + 1  # and the header row
        assert f'href="f{MAX_LISTED - 1:06d}.txt"' in page
        assert f'href="f{MAX_LISTED:06d}.txt"' not in page and 'href="sub/"' not in page
        assert f"the first {MAX_LISTED} of {count + 1} names" in page
    small = await _raw(server, _get("/demo-brain/"))
    assert b"names)" not in _body(small)


@pytest_twisted.ensureDeferred
async def test_links_never_multiply_the_index_walk(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """Under ``--follow-symlinks``, eight links to the root (8**6 paths of depth 6) and a
    chain of links between directories cost one visit of each directory."""
    for i in range(8):
        (data_root / f"l{i}").symlink_to(".")
    (data_root / "a").mkdir()
    (data_root / "a" / "to-b").symlink_to("../b")
    (data_root / "b").mkdir()
    (data_root / "b" / "to-a").symlink_to("../a")
    server = serve(data_root, follow_symlinks=True)
    response = await treq.get(server.url + "/", timeout=20)
    page = (await treq.content(response)).decode()
    assert response.code == 200
    assert page.count("<li>") == 1 and 'href="demo-brain/"' in page, page[:2000]
    # The links are still followed for reads.
    response = await treq.get(server.url + "/l3/l5/demo-brain/info")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_once_the_root_may_not_be_read(
    serve: Callable[..., RunningServer],
) -> None:
    """A root made unreadable after start-up (chmod by its owner) serves nothing: the
    handle held since start-up still lists it, but the health check must not say ok."""
    # Not under pytest's private temporary directory: ``nobody`` must reach the path too.
    data_root = Path(tempfile.mkdtemp(prefix="neurotrale-attack-"))
    data_root.chmod(0o755)
    write_info(data_root / "brain", (8, 8, 2))
    server = serve(data_root)

    async def health() -> tuple[int, dict[str, str]]:
        with unprivileged():
            response = await treq.get(server.url + "/healthz")
            return response.code, json.loads(await treq.content(response))

    try:
        assert (await health())[0] == 200
        for mode in (0, 0o311, 0o644):  # nothing; enter but not list; list but not enter
            data_root.chmod(mode)
            code, document = await health()
            assert (code, document["status"]) == (503, "unavailable"), (oct(mode), document)
            assert str(data_root) not in document["detail"]
        data_root.chmod(0o755)
        assert (await health())[0] == 200
    finally:
        data_root.chmod(0o755)
        shutil.rmtree(data_root)


@pytest_twisted.ensureDeferred
async def test_if_range_that_names_another_version_gets_the_whole_file(
    demo_server: RunningServer,
) -> None:
    """RFC 9110 13.1.5: a ``Range`` under an ``If-Range`` that does not name the current
    representation (a download resumed after the file changed) is ignored: 200, the whole
    body; one that names it (its strong ETag, its ``Last-Modified``) gets the range."""
    for target in (INFO, CHUNK):
        whole = await _raw(demo_server, _get(target))
        headers = headers_of(whole)
        etag, modified = headers["etag"][0], headers["last-modified"][0]
        for validator in ('"another"', f"W/{etag}", "Thu, 01 Jan 1970 00:00:00 GMT"):
            asked = _get(target, "Range: bytes=0-3", f"If-Range: {validator}")
            answer = await _raw(demo_server, asked)
            assert status_of(answer) == 200, (target, validator, answer[:200])
            assert _body(answer) == _body(whole)
        for validator in (etag, modified):
            asked = _get(target, "Range: bytes=0-3", f"If-Range: {validator}")
            answer = await _raw(demo_server, asked)
            assert (status_of(answer), _body(answer)) == (206, _body(whole)[:4]), (
                target,
                validator,
            )


@pytest_twisted.ensureDeferred
async def test_a_huge_info_is_refused_without_being_read(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """An ``info`` of gigabytes (a sparse file costs its planter nothing) would be read whole
    into memory by every chunk request: it is a JSON 500 naming the limit, read no further."""
    shutil.copytree(data_root / "demo-brain", data_root / "fat")
    with open(data_root / "fat" / "info", "r+b") as info:
        info.truncate(4 << 30)
    server = serve(data_root)
    response = await treq.get(server.url + "/fat/1_1_1/0-64_0-64_0-32")
    document = json.loads(await treq.content(response))
    assert response.code == 500, document
    assert "larger than" in document["error"] and str(data_root) not in document["error"]
    assert (await treq.get(server.url + CHUNK)).code == 200


@pytest_twisted.ensureDeferred
async def test_a_tiff_claiming_huge_strips_is_refused_before_they_are_read(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """Compressed strips whose byte counts claim far more than the chunk can hold (a sparse
    file, or every strip pointing at the same region) would be read whole into memory
    (2 GiB for a chunk of 256 bytes): a JSON 500 naming the file, relative to the root."""
    write_info(data_root / "strips", (8, 8, 2))
    path = write_chunk(
        data_root / "strips",
        "1_1_1",
        (0, 8, 0, 8, 0, 2),
        np.ones((2, 8, 8), "uint16"),
        compression="zlib",
    )
    with tifffile.TiffFile(path) as tif:
        pages = [page for page in tif.pages if isinstance(page, tifffile.TiffPage)]
        where = [page.tags["StripByteCounts"].valueoffset for page in pages]
    assert len(where) == 2
    data = bytearray(path.read_bytes())
    for offset in where:
        struct.pack_into("<I", data, offset, 64 << 20)
    path.write_bytes(data)
    with open(path, "r+b") as f:
        f.truncate((64 << 20) + len(data))
    server = serve(data_root)
    response = await treq.get(server.url + "/strips/1_1_1/0-8_0-8_0-2")
    content = await treq.content(response)
    assert response.code == 500, content[:200]
    document = json.loads(content)
    assert "strips/1_1_1/0-8_0-8_0-2.tiff" in document["error"], document
    assert "too many" in document["error"] and str(data_root) not in document["error"]


@pytest_twisted.ensureDeferred
async def test_unreadable_annotation_places_are_403s(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    """chmod 000 on an annotation's dataset, its ``annotations`` folder, its block or the file
    itself: reading it is a JSON 403 with no path, as for a chunk (not a 500); a write is a
    JSON 500 (the server's setup is at fault, as ``test_disk_failures`` holds), with no path,
    and nothing is written."""
    demo = data_root / "demo-brain"
    places = {
        "locked": data_root / "locked",
        "noannotations": data_root / "noannotations" / "annotations",
        "noblock": data_root / "noblock" / "annotations" / "x0y0z0",
        "nofile": data_root / "nofile" / "annotations" / "x0y0z0" / "fibers.json",
    }
    for name in places:
        shutil.copytree(demo, data_root / name)
    before = {name: sorted(p.name for p in (data_root / name).rglob("*")) for name in places}
    for path in places.values():
        path.chmod(0)
    server = serve(data_root)
    try:
        with unprivileged():
            ok = await treq.get(f"{server.url}/demo-brain/annotations/x0y0z0/fibers.json")
            assert ok.code == 200
            for name in places:
                url = f"{server.url}/{name}/annotations/x0y0z0/fibers.json"
                for method, body in (("GET", None), ("PUT", b"[]"), ("DELETE", None)):
                    query = "" if method != "DELETE" else "?id=x"
                    response = await treq.request(method, url + query, data=body)
                    document = json.loads(await treq.content(response))
                    expected = 403 if method == "GET" else 500
                    assert response.code == expected, (name, method, document)
                    assert document == {"error": document["error"], "status": expected}
                    assert str(data_root) not in document["error"]
    finally:
        for path in places.values():
            path.chmod(0o755)
    (places["nofile"]).chmod(0o644)
    after = {name: sorted(p.name for p in (data_root / name).rglob("*")) for name in places}
    assert after == before
