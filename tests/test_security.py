"""Hostile input: paths that try to leave the root, corrupt TIFFs, oversized requests.

Every hostile path is sent raw (no client normalises it) with every method to every kind of
route; the answer must be 400, 403 or 404, never 500, and nothing outside the data root may be
read or written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import pytest_twisted
import tifffile
import treq
from twisted.internet.threads import deferToThread

from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.process.service import clean_stale_temporaries
from tests.conftest import RunningServer
from tests.support import raw_http, write_chunk, write_info

#: Ways of spelling a way out of the root, or of naming something outside it.
ESCAPES = [
    "..",
    "../..",
    "../../../../../../etc",
    "%2e%2e",
    "%2E%2E",
    "%2e.",
    ".%2e",
    "%2e%2e%2f%2e%2e",
    "%252e%252e",
    "%252e%252e%252f",
    "..%2f..%2f..",
    "..%5c..%5c..",
    "..\\..\\..",
    "%5c..%5c..",
    "%c0%ae%c0%ae",
    "%c0%ae%c0%ae%c0%af",
    "%e0%80%ae%e0%80%ae",
    "..%00",
    "%00",
    "a%00b",
    "%2fetc",
    "%2f..%2f..",
    "/etc",
    "outside",
    "link-out",
    "link-out/secret.txt",
    ".hidden",
    ".versions",
    "x" * 300,
    "a/" * 200 + "b",
]


def targets(escape: str) -> list[str]:
    """The routes a hostile segment can reach: chunks, annotations, static files."""
    return [
        f"/{escape}",
        f"/{escape}/info",
        f"/{escape}/1_1_1/0-64_0-64_0-32",
        f"/demo-brain/{escape}/0-64_0-64_0-32",
        f"/{escape}/annotations/x0y0z0/fibers.json",
        f"/demo-brain/annotations/{escape}/fibers.json",
        f"/demo-brain/annotations/x0y0z0/{escape}",
        f"/demo-brain/{escape}/secret.txt",
    ]


METHODS = ["GET", "HEAD", "PUT", "PATCH", "DELETE"]


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``directory`` with its content and mtime (links not followed)."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture
def fenced(tmp_path: Path, data_root: Path) -> tuple[Path, Path]:
    """A data root beside an ``outside`` directory holding secrets and a dataset."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("root:secret")
    write_info(outside / "stolen", (8, 8, 2))
    write_chunk(outside / "stolen", "1_1_1", (0, 8, 0, 8, 0, 2), np.ones((2, 8, 8), "uint16"))
    (outside / "stolen" / "annotations" / "x0y0z0").mkdir(parents=True)
    (outside / "stolen" / "annotations" / "x0y0z0" / "fibers.json").write_text("[]")
    (data_root / "link-out").symlink_to(outside)
    (data_root / "demo-brain" / "annotations" / "link-out").symlink_to(outside)
    (data_root / "stolen").symlink_to(outside / "stolen")
    (data_root / "demo-brain" / ".hidden").write_text("root:hidden")
    return data_root, outside


@pytest_twisted.ensureDeferred
async def test_hostile_paths_on_every_route_and_method(
    serve: Callable[..., RunningServer], fenced: tuple[Path, Path]
) -> None:
    root, outside = fenced
    server = serve(root)
    port = server.port.getHost().port
    before_outside, before_root = snapshot(outside), snapshot(root)
    tried = 0
    statuses: dict[int, int] = {}
    for escape in ESCAPES:
        for target in targets(escape):
            for method in METHODS:
                body = b"[]" if method in ("PUT", "PATCH") else b""
                request = (
                    f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode() + body
                answer = await deferToThread(raw_http, port, request)
                status = int(answer.split(b" ", 2)[1])
                statuses[status] = statuses.get(status, 0) + 1
                tried += 1
                assert status in (400, 403, 404, 405), (method, target, answer[:300])
                assert b"root:" not in answer, (method, target)
                assert answer.count(b"Access-Control-Allow-Origin: *") == 1
    assert snapshot(outside) == before_outside
    assert snapshot(root) == before_root
    print(f"hostile requests tried: {tried}; answers: {dict(sorted(statuses.items()))}")


@pytest_twisted.ensureDeferred
async def test_links_out_of_the_root_are_followed_for_reads_only_when_allowed(
    serve: Callable[..., RunningServer], fenced: tuple[Path, Path]
) -> None:
    root, outside = fenced
    strict, lenient = serve(root), serve(root, follow_symlinks=True)
    chunk = "/stolen/1_1_1/0-8_0-8_0-2"
    assert (await treq.get(strict.url + chunk)).code == 404
    assert (await treq.get(strict.url + "/link-out/secret.txt")).code == 404
    assert (
        await treq.content(await treq.get(lenient.url + chunk)) == np.ones(16 * 8, "<u2").tobytes()
    )
    assert (
        await treq.content(await treq.get(lenient.url + "/link-out/secret.txt")) == b"root:secret"
    )
    before = snapshot(outside)
    for server in (strict, lenient):
        for method in ("PUT", "PATCH", "DELETE"):
            url = server.url + "/stolen/annotations/x0y0z0/fibers.json?id=a"
            body = b'{"id":"a","type":"point","point":[1,2,3]}' if method == "PATCH" else b"[]"
            response = await treq.request(method, url, data=body)
            assert response.code in (403, 404), (method, response.code)
            assert json.loads(await treq.content(response))["status"] == response.code
    assert snapshot(outside) == before


@pytest_twisted.ensureDeferred
async def test_very_long_request_line_is_refused(demo_server: RunningServer) -> None:
    port = demo_server.port.getHost().port
    request = f"GET /{'a' * 70000} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    answer = await deferToThread(raw_http, port, request)
    assert int(answer.split(b" ", 2)[1]) == 431


def _corrupt_tiffs(dataset: Path) -> dict[str, Path]:
    volume = np.arange(2 * 8 * 8, dtype="uint16").reshape(2, 8, 8)
    files = {}
    for i, kind in enumerate(["truncated", "garbage", "huge", "truncated-zlib", "empty"]):
        box = (0, 8, 0, 8, 2 * i, 2 * i + 2)
        path = write_chunk(
            dataset, "1_1_1", box, volume, compression="zlib" if "zlib" in kind else None
        )
        files[kind] = path
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) - 100])
    data = files["truncated-zlib"].read_bytes()
    files["truncated-zlib"].write_bytes(data[: len(data) // 2])
    files["garbage"].write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    files["empty"].write_bytes(b"")
    # A header that claims a 60000 x 60000 image: decoding it would need gigabytes.
    with tifffile.TiffFile(files["huge"]) as tif:
        page = tif.pages.first
        width = page.tags["ImageWidth"].valueoffset
        length = page.tags["ImageLength"].valueoffset
        kind_w, kind_l = page.tags["ImageWidth"].dtype, page.tags["ImageLength"].dtype
    raw = bytearray(files["huge"].read_bytes())
    for offset, dtype in ((width, kind_w), (length, kind_l)):
        struct.pack_into("<I" if dtype == 4 else "<H", raw, offset, 60000)
    files["huge"].write_bytes(bytes(raw))
    return files


@pytest_twisted.ensureDeferred
async def test_corrupt_tiffs_are_clean_500s_naming_the_file(
    serve: Callable[..., RunningServer], tmp_path: Path
) -> None:
    dataset = tmp_path / "bad"
    write_info(dataset, (8, 8, 10))
    files = _corrupt_tiffs(dataset)
    server = serve(tmp_path)
    for kind, path in files.items():
        for accept in ("", "gzip"):
            response = await treq.get(
                f"{server.url}/bad/1_1_1/{path.stem}", headers={"Accept-Encoding": accept}
            )
            document = json.loads(await treq.content(response))
            assert response.code == 500, kind
            assert document == {"error": document["error"], "status": 500}
    # The server is still fine afterwards.
    assert (await treq.get(server.url + "/bad/info")).code == 200
    shutil.rmtree(dataset)


def test_start_up_removes_abandoned_temporary_files_but_keeps_locks(data_root: Path) -> None:
    block = data_root / "demo-brain" / "annotations" / "x0y0z0"
    versions = block / ".versions" / "fibers.json"
    versions.mkdir(parents=True)
    stale = [block / ".fibers.json.tmp-0123456789abcdef", versions / ".3.json.tmp-fedcba9876543210"]
    fresh = block / ".z-0010.json.tmp-00112233445566ff"
    lock = block / ".fibers.json.lock"
    for path in [*stale, fresh, lock]:
        path.write_text("partial")
    for path in [*stale, lock]:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    before = {p: p.read_bytes() for p in block.rglob("*.json") if p.is_file()}
    clean_stale_temporaries(DataRoot(data_root))
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and lock.exists()
    assert {p: p.read_bytes() for p in block.rglob("*.json") if p.is_file()} == before
