"""The annotation routes as the viewer and other tools use them, through the real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet.defer import gatherResults

from tests.conftest import RunningServer
from tests.support import header, write_info

FIBERS = "/demo-brain/annotations/x0y0z0/fibers.json"
VIEWER_HEADERS = {
    "Content-Type": "text/plain;charset=UTF-8",
    "Origin": "http://viewer.example",
}


def record(rid: str, z: int = 5, **extra: Any) -> dict[str, Any]:
    """A polygon record as the viewer writes it."""
    return {
        "points": [[10, 20, z], [14, 22, z], [12.5, 30.25, z]],
        "type": "polygon",
        "id": rid,
        "anntype": "glia",
        "reviewed": True,
        "visited": True,
        **extra,
    }


def compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


async def get_json(response: Any) -> Any:
    return json.loads(await treq.content(response))


@pytest_twisted.ensureDeferred
async def test_viewer_put_after_preflight(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    url = server.url + "/demo-brain/annotations/x0y0z0/z-0017.json"
    preflight = await treq.request(
        "OPTIONS",
        url,
        headers={
            "Origin": "http://viewer.example",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.code == 204
    assert "PUT" in (header(preflight, "access-control-allow-methods") or "")
    records = [record("9f1c" * 10), record("1bcd4c15-5ddc-4a36-9871-faca72f9f41b")]
    created = await treq.put(url, data=compact(records), headers=VIEWER_HEADERS)
    assert created.code == 201
    assert header(created, "access-control-allow-origin") == "*"
    assert await get_json(created) == {"filename": "z-0017.json", "count": 2}
    on_disk = data_root / "demo-brain" / "annotations" / "x0y0z0" / "z-0017.json"
    assert json.loads(on_disk.read_bytes()) == records
    etag = header(created, "etag")
    records.append(record("third"))
    replaced = await treq.put(url, data=compact(records), headers=VIEWER_HEADERS)
    assert replaced.code == 200
    assert await get_json(replaced) == {"filename": "z-0017.json", "count": 3}
    assert header(replaced, "etag") not in (None, etag)
    read = await treq.get(url)
    assert read.code == 200
    assert header(read, "content-type") == "application/json"
    assert header(read, "cache-control") == "no-cache"
    assert header(read, "etag") == header(replaced, "etag")
    assert await get_json(read) == records


@pytest_twisted.ensureDeferred
async def test_get_head_and_revalidation(demo_server: RunningServer) -> None:
    for name in ("fibers.json", "centroids.json", "z-0010.json"):
        url = f"{demo_server.url}/demo-brain/annotations/x0y0z0/{name}"
        response = await treq.get(url)
        body = await treq.content(response)
        path = demo_server.root / "demo-brain" / "annotations" / "x0y0z0" / name
        assert response.code == 200 and body == path.read_bytes()
        etag = header(response, "etag")
        assert etag and etag.startswith('"')
        again = await treq.get(url, headers={"If-None-Match": etag})
        assert again.code == 304 and await treq.content(again) == b""
        head = await treq.head(url)
        assert head.code == 200 and int(header(head, "content-length") or 0) == len(body)
    missing = await treq.get(demo_server.url + "/demo-brain/annotations/x0y0z0/z-0099.json")
    assert missing.code == 404
    document = await get_json(missing)
    assert document["status"] == 404 and not isinstance(document, list)
    for url in (
        "/demo-brain/annotations/x150y100z40/fibers.json",
        "/nope/annotations/x0y0z0/a.json",
    ):
        assert (await treq.get(demo_server.url + url)).code == 404


@pytest_twisted.ensureDeferred
async def test_patch_and_delete(serve: Callable[..., RunningServer], data_root: Path) -> None:
    server = serve(data_root)
    url = server.url + "/demo-brain/annotations/x0y0z0/centroids.json"
    path = data_root / "demo-brain" / "annotations" / "x0y0z0" / "centroids.json"
    before = json.loads(path.read_bytes())
    first_id = before[0]["id"]
    changed = {**before[0], "reviewed": True, "extra": {"kept": [1, 2]}}
    response = await treq.patch(f"{url}?id={first_id}", data=compact(changed))
    assert response.code == 200 and await get_json(response) == {"id": first_id}
    after = json.loads(path.read_bytes())
    assert after[0] == changed and after[1:] == before[1:]
    new = {"point": [1, 2, 3], "type": "Point", "id": "new-one"}
    response = await treq.patch(url, data=compact(new))  # the body's id when ?id is absent
    assert await get_json(response) == {"id": "new-one"}
    assert json.loads(path.read_bytes())[-1] == new
    response = await treq.delete(f"{url}?id=new-one")
    assert response.code == 200 and await get_json(response) == {"id": "new-one"}
    assert json.loads(path.read_bytes()) == after
    assert (await treq.delete(f"{url}?id=new-one")).code == 404
    assert (await treq.delete(url)).code == 400
    no_block = server.url + "/demo-brain/annotations/x150y100z40/none.json"
    assert (await treq.delete(no_block)).code == 400  # the missing ?id is what is wrong
    fresh = server.url + "/demo-brain/annotations/x0y0z0/made-by-patch.json"
    assert (await treq.delete(f"{fresh}?id=x")).code == 404
    response = await treq.patch(f"{fresh}?id=a", data=compact({**new, "id": "a"}))
    assert response.code == 200
    assert json.loads((path.parent / "made-by-patch.json").read_bytes()) == [{**new, "id": "a"}]
    mismatch = await treq.patch(f"{url}?id=other", data=compact(new))
    assert mismatch.code == 400
    assert "id" in (await get_json(mismatch))["error"]


BAD_BODIES = [
    (b"[{", "JSON"),
    (b'{"id": "x"}', "array"),
    (b"[null]", "record 0"),
    (b"[1]", "record 0"),
    (compact([record("a"), record("a")]), "record 1"),
    (compact([record("")]), "id"),
    (compact([{**record("a"), "type": "circle"}]), "type"),
    (compact([{**record("a"), "points": [[1, 2]]}]), "points"),
    (compact([{"type": "point", "id": "p", "point": [1, None, 3]}]), "point"),
    (compact([{**record("a"), "anntype": None}]), "anntype"),
    (compact([{**record("a"), "reviewed": None}]), "reviewed"),
    (compact([record("ok"), {**record("b"), "visited": "yes"}]), 'record 1 (id "b")'),
]


@pytest_twisted.ensureDeferred
async def test_refused_writes_change_nothing(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    block = data_root / "demo-brain" / "annotations" / "x0y0z0"
    snapshot = {p.name: p.read_bytes() for p in block.rglob("*") if p.is_file()}
    for body, words in BAD_BODIES:
        response = await treq.put(server.url + FIBERS, data=body, headers=VIEWER_HEADERS)
        assert response.code == 400, body
        document = await get_json(response)
        assert document["status"] == 400 and words in document["error"], (body, document)
        patched = await treq.patch(server.url + FIBERS + "?id=a", data=body)
        assert patched.code == 400, body
    new_file = await treq.put(
        server.url + "/demo-brain/annotations/x0y0z0/new.json", data=b"[null]"
    )
    assert new_file.code == 400
    assert {p.name: p.read_bytes() for p in block.rglob("*") if p.is_file()} == snapshot


@pytest_twisted.ensureDeferred
async def test_if_match(serve: Callable[..., RunningServer], data_root: Path) -> None:
    server = serve(data_root)
    path = data_root / "demo-brain" / "annotations" / "x0y0z0" / "fibers.json"
    etag = header(await treq.get(server.url + FIBERS), "etag") or ""
    ok = await treq.put(server.url + FIBERS, data=b"[]", headers={"If-Match": etag})
    assert ok.code == 200
    new_etag = header(ok, "etag")
    assert path.read_bytes() == b"[]"
    stale = await treq.put(
        server.url + FIBERS, data=compact([record("x")]), headers={"If-Match": etag}
    )
    assert stale.code == 412
    assert (await get_json(stale))["status"] == 412
    assert path.read_bytes() == b"[]"
    assert header(await treq.get(server.url + FIBERS), "etag") == new_etag


@pytest_twisted.ensureDeferred
async def test_stray_empty_put_is_undone_from_a_version(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    url = server.url + "/demo-brain/annotations/x0y0z0/z-0010.json"
    path = data_root / "demo-brain" / "annotations" / "x0y0z0" / "z-0010.json"
    work = path.read_bytes()
    erased = await treq.put(url, data=b"[]", headers=VIEWER_HEADERS)
    assert erased.code == 200 and path.read_bytes() == b"[]"
    versions = await get_json(await treq.get(url + "?versions"))
    assert versions[0]["version"] == 1 and versions[0]["count"] == 2
    assert versions[0]["size"] == len(work) and "T" in versions[0]["modified"]
    old = await treq.get(url + "?version=1")
    assert old.code == 200 and await treq.content(old) == work
    restored = await treq.put(url, data=work, headers=VIEWER_HEADERS)
    assert restored.code == 200
    assert json.loads(path.read_bytes()) == json.loads(work)
    assert [v["version"] for v in await get_json(await treq.get(url + "?versions"))] == [2, 1]
    assert (await treq.get(url + "?version=99")).code == 404
    assert (await treq.get(url + "?version=abc")).code == 400
    for query in ("?history&version=abc", "?versions&version=-1"):
        refused = await treq.get(url + query)
        assert refused.code == 400, query
        assert "?version=" in (await get_json(refused))["error"]
    # Versions are out of sight of listings and of the static files.
    listing = await treq.content(await treq.get(server.url + "/demo-brain/annotations/x0y0z0/"))
    assert b".versions" not in listing and b".lock" not in listing
    hidden = "/demo-brain/annotations/x0y0z0/.versions/z-0010.json/1.json"
    assert (await treq.get(server.url + hidden)).code == 404


@pytest_twisted.ensureDeferred
async def test_versions_are_bounded(serve: Callable[..., RunningServer], data_root: Path) -> None:
    server = serve(data_root, keep_versions=3)
    for i in range(6):
        response = await treq.put(server.url + FIBERS, data=compact([record(f"r{i}")]))
        assert response.code == 200
    versions = await get_json(await treq.get(server.url + FIBERS + "?versions"))
    assert [v["version"] for v in versions] == [6, 5, 4]


@pytest_twisted.ensureDeferred
async def test_blocks_by_point(serve: Callable[..., RunningServer], data_root: Path) -> None:
    server = serve(data_root)
    annotations = data_root / "demo-brain" / "annotations"  # block_info.csv: 100,88,36
    # A point in block (0, 0, 0) reads the existing x0y0z0 directory.
    same = await treq.get(server.url + "/demo-brain/annotations/x57y80z35/fibers.json")
    assert await treq.content(same) == (annotations / "x0y0z0" / "fibers.json").read_bytes()
    # A point in block (1, 1, 1): nothing yet; a write creates x1y1z1.
    url = server.url + "/demo-brain/annotations/x150y100z40/z-0040.json"
    assert (await treq.get(url)).code == 404
    assert not (annotations / "x1y1z1").exists()
    assert (await treq.put(url, data=compact([record("a", 40)]))).code == 201
    assert json.loads((annotations / "x1y1z1" / "z-0040.json").read_bytes()) == [record("a", 40)]
    # Points outside the volume (200 x 176 x 72) never create anything.
    for block in ("x-1y0z0", "x200y0z0", "x0y176z0", "x0y0z72"):
        outside = f"{server.url}/demo-brain/annotations/{block}/fibers.json"
        assert (await treq.get(outside)).code == 404, block
        assert (await treq.put(outside, data=b"[]")).code == 400, block
    assert sorted(p.name for p in annotations.iterdir()) == ["block_info.csv", "x0y0z0", "x1y1z1"]


@pytest_twisted.ensureDeferred
async def test_legacy_block_names(serve: Callable[..., RunningServer], tmp_path: Path) -> None:
    dataset = tmp_path / "old"
    write_info(dataset, (1000, 1000, 100))
    annotations = dataset / "annotations"
    (annotations / "x0002_y0001").mkdir(parents=True)
    (annotations / "block_info.csv").write_text("512,512,100\n")
    (annotations / "x0002_y0001" / "fibers.json").write_text(compact([record("old")]).decode())
    server = serve(tmp_path)
    read = await treq.get(server.url + "/old/annotations/x600y10z3/fibers.json")
    assert await get_json(read) == [record("old")]
    response = await treq.put(
        server.url + "/old/annotations/x10y900z3/fibers.json", data=compact([record("new")])
    )
    assert response.code == 201
    assert json.loads((annotations / "x0001_y0002" / "fibers.json").read_bytes()) == [record("new")]


@pytest_twisted.ensureDeferred
async def test_concurrent_patches_lose_nothing(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    server = serve(data_root)
    url = server.url + "/demo-brain/annotations/x0y0z0/busy.json"
    writes = [
        treq.patch(f"{url}?id=r{i}", data=compact(record(f"r{i}")), headers=VIEWER_HEADERS)
        for i in range(120)
    ]
    reads = [treq.get(url) for _ in range(60)]
    responses = await gatherResults(writes + reads)
    assert all(r.code == 200 for r in responses[:120])
    parsed = 0
    for response in responses[120:]:
        body = await treq.content(response)
        if response.code == 200:
            assert isinstance(json.loads(body), list)  # never torn
            parsed += 1
        else:
            assert response.code == 404  # before the first write
    final = await get_json(await treq.get(url))
    assert sorted(r["id"] for r in final) == sorted(f"r{i}" for i in range(120))
    print(f"writers=120 records={len(final)} reads parsed={parsed} lost=0 torn=0")


@pytest_twisted.ensureDeferred
async def test_writes_never_follow_links_out_of_the_root(
    serve: Callable[..., RunningServer], tmp_path: Path, data_root: Path
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    escape = data_root / "demo-brain" / "annotations" / "escape"
    escape.symlink_to(outside)
    server = serve(data_root, follow_symlinks=True)
    response = await treq.put(
        server.url + "/demo-brain/annotations/escape/fibers.json", data=compact([record("a")])
    )
    assert response.code in (403, 404)
    assert list(outside.iterdir()) == []


@pytest_twisted.ensureDeferred
async def test_writes_outside_any_dataset_are_404s(
    serve: Callable[..., RunningServer], data_root: Path
) -> None:
    # Found by schemathesis: a write under a directory with no info file was a 500.
    server = serve(data_root)
    for path in (
        "/no-such/annotations/x0y0z0/fibers.json",
        "/demo-brain/1_1_1/annotations/x0y0z0/a.json",
    ):
        response = await treq.put(server.url + path, data=compact([record("a")]))
        assert response.code == 404, path
        assert "no dataset" in (await get_json(response))["error"]
    assert not (data_root / "no-such").exists()
    assert not (data_root / "demo-brain" / "1_1_1" / "annotations").exists()
