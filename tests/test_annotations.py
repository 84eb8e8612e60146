"""Tests of neurotrale_twisted.core.annotations: what a user sees on disk and in errors.

Plain pytest with ``tmp_path``; no reactor. The concurrency and crash tests use real
threads and real processes (``spawn``) on one file and print their figures (run with ``-s``).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest

# The package is not installed in the test environment: make the checkout importable
# (spawned child processes inherit this sys.path).
_CHECKOUT = str(Path(__file__).resolve().parents[1])
if _CHECKOUT not in sys.path:
    sys.path.insert(0, _CHECKOUT)

from neurotrale_twisted.core.annotations.records import (  # noqa: E402
    ANNOTATION_NAME,
    parse_records,
    validate_records,
)
from neurotrale_twisted.core.annotations.store import (  # noqa: E402
    AnnotationStore,
    WriteResult,
)
from neurotrale_twisted.core.annotations.versions import StoredFile, etag_of  # noqa: E402
from neurotrale_twisted.core.errors import (  # noqa: E402
    BadRequest,
    DomainError,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ServerError,
)
from neurotrale_twisted.core.paths import DataRoot  # noqa: E402

SIZE = (1000, 800, 300)


# --- helpers ----------------------------------------------------------------------------


class Site:
    """A data root holding one dataset ``brain1`` with a 1000 x 800 x 300 volume."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        block_info: str | None = None,
        annotations: bool = True,
        keep_versions: int = 20,
        follow_symlinks: bool = False,
    ) -> None:
        self.data = tmp_path / "data"
        self.dataset = self.data / "brain1"
        self.dataset.mkdir(parents=True)
        info = {
            "type": "image",
            "data_type": "uint16",
            "num_channels": 1,
            "scales": [
                {
                    "key": "1_1_1",
                    "size": list(SIZE),
                    "resolution": [1, 1, 1],
                    "voxel_offset": [0, 0, 0],
                    "chunk_sizes": [[64, 64, 64]],
                    "encoding": "raw",
                }
            ],
        }
        (self.dataset / "info").write_text(json.dumps(info))
        self.ann = self.dataset / "annotations"
        if annotations or block_info is not None:
            self.ann.mkdir()
        if block_info is not None:
            (self.ann / "block_info.csv").write_text(block_info)
        self.root = DataRoot(self.data, follow_symlinks=follow_symlinks)
        self.store = AnnotationStore(self.root, keep_versions=keep_versions)

    def locate(self, block: str, name: str = "fibers.json", *, write: bool = False) -> Path:
        return self.store.locate(self.dataset, block, name, for_write=write)


def point(rid: str, x: float = 10.5, **extra: object) -> dict[str, object]:
    """A point record as the viewer writes it."""
    record: dict[str, object] = {
        "point": [x, 20.25, 117],
        "type": "point",
        "id": rid,
        "anntype": "neuron",
        "reviewed": False,
        "visited": False,
    }
    record.update(extra)
    return record


def polygon(rid: str) -> dict[str, object]:
    return {
        "points": [[10, 20, 117], [14, 22, 117], [12, 30, 117]],
        "type": "polygon",
        "id": rid,
        "anntype": "glia",
        "reviewed": True,
        "visited": True,
    }


def body(records: object) -> bytes:
    """A request body, deliberately not in the canonical form (spaces, ASCII escapes)."""
    return json.dumps(records, indent=1).encode()


def canonical(records: object) -> bytes:
    return json.dumps(records, separators=(",", ":"), ensure_ascii=False).encode()


def snapshot(top: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under ``top``, dot-names included."""
    seen: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for d in dirnames:
            seen[os.path.relpath(os.path.join(dirpath, d), top)] = None
        for f in filenames:
            full = os.path.join(dirpath, f)
            seen[os.path.relpath(full, top)] = Path(full).read_bytes()
    return seen


def refused(
    exc: type[DomainError], call: Callable[[], object], top: Path, match: str | None = None
) -> DomainError:
    """Run a write that must be refused; check that nothing under ``top`` changed."""
    before = snapshot(top)
    with pytest.raises(exc) as info:
        call()
    assert snapshot(top) == before
    if match is not None:
        assert match in info.value.message, info.value.message
    return info.value


# --- block resolution -------------------------------------------------------------------


def test_literal_block_directory_is_used(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="100,100,100\n")
    (site.ann / "x5y5z5").mkdir()
    (site.ann / "my-block").mkdir()
    assert site.locate("x5y5z5") == site.ann / "x5y5z5" / "fibers.json"
    assert site.locate("x5y5z5", write=True) == site.ann / "x5y5z5" / "fibers.json"
    assert site.locate("my-block", "z-0001.json") == site.ann / "my-block" / "z-0001.json"


def test_block_info_maps_a_point_to_a_zero_based_block(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="512,512,64\n")
    (site.ann / "x1y0z2").mkdir()
    want = site.ann / "x1y0z2" / "fibers.json"
    assert site.locate("x600y10z130") == want
    assert site.locate("x512y511z128", write=True) == want
    result = site.store.put(site.locate("x700y0z150", write=True), body([point("a")]))
    assert result.created
    assert json.loads(want.read_bytes()) == [point("a")]


def test_block_info_maps_a_point_to_a_legacy_block(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="512,512,512\n")
    legacy = site.ann / "x0002_y0001"
    legacy.mkdir()
    # (600, 10, 5) is in block (1, 0, 0): one-based, zero-padded, no z.
    assert site.locate("x600y10z5") == legacy / "fibers.json"
    site.store.put(site.locate("x600y10z5", write=True), body([point("a")]))
    assert json.loads((legacy / "fibers.json").read_bytes()) == [point("a")]
    # A new block of this dataset is created in its legacy style.
    path = site.locate("x10y600z0", write=True)
    assert path == site.ann / "x0001_y0002" / "fibers.json"
    assert not path.parent.exists()  # locate creates nothing
    site.store.put(path, body([point("b")]))
    assert sorted(p.name for p in site.ann.iterdir()) == [
        "block_info.csv",
        "x0001_y0002",
        "x0002_y0001",
    ]


def test_new_blocks_use_the_zero_based_style_without_legacy_directories(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="512,512,512")
    path = site.locate("x600y10z5", write=True)
    assert path == site.ann / "x1y0z0" / "fibers.json"
    with pytest.raises(NotFound):
        site.locate("x600y10z5")
    site.store.put(path, b"[]")
    assert site.locate("x600y10z5") == path
    assert site.locate("x513y0z0") == path


@pytest.mark.parametrize(
    "text",
    [
        "100,100,10",
        "100,100,10\n",
        "sx,sy,sz\n100,100,10\n",
        "  100 , 100 ,\t10  \r\n\n",
        "\ufeffsx, sy, sz\r\n100, 100, 10\r\n",
    ],
)
def test_block_info_csv_forms_are_tolerated(tmp_path: Path, text: str) -> None:
    site = Site(tmp_path, block_info=text)
    assert site.locate("x250y0z25", write=True) == site.ann / "x2y0z2" / "fibers.json"


def test_block_info_csv_without_a_size_is_a_server_error(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="sx,sy,sz\nsmall,big,0\n")
    with pytest.raises(ServerError, match=r"block_info\.csv"):
        site.locate("x1y1z1", write=True)


def test_a_changed_block_info_csv_is_seen(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="100,100,100\n")
    csv = site.ann / "block_info.csv"
    assert site.locate("x150y0z0", write=True).parent.name == "x1y0z0"
    before = csv.stat()
    # Same length, same mtime: only reading the file again can see this change.
    csv.write_text("300,300,300\n")
    os.utime(csv, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert site.locate("x150y0z0", write=True).parent.name == "x0y0z0"
    csv.unlink()
    # Without block_info.csv the directory is the block name itself.
    assert site.locate("x150y0z0", write=True).parent.name == "x150y0z0"


def test_without_block_info_the_block_name_is_the_directory(tmp_path: Path) -> None:
    site = Site(tmp_path, annotations=False)
    with pytest.raises(NotFound):
        site.locate("x0y0z0")
    path = site.locate("x0y0z0", write=True)
    assert path == site.ann / "x0y0z0" / "fibers.json"
    assert not site.ann.exists()
    result = site.store.put(path, body([point("a")]))
    assert result == WriteResult("fibers.json", etag_of(canonical([point("a")])), True, 1, None)
    assert site.locate("x0y0z0") == path
    # Other names must exist already; a new directory must be x{X}y{Y}z{Z}, unpadded.
    for block in ("notes", "x007y0z0", "x-0y0z0", "x1y2", "X1Y2Z3"):
        with pytest.raises(NotFound):
            site.locate(block)
        refused(BadRequest, partial(site.locate, block, write=True), site.data)


@pytest.mark.parametrize("block_info", [None, "100,100,100\n"])
@pytest.mark.parametrize(
    "block",
    ["x-1y0z0", "x0y-5z0", "x0y0z-100", "x1000y0z0", "x0y800z0", "x0y0z300", "x5000y5000z5000"],
)
def test_points_outside_the_volume_never_create_a_directory(
    tmp_path: Path, block_info: str | None, block: str
) -> None:
    site = Site(tmp_path, block_info=block_info)
    with pytest.raises(NotFound):
        site.locate(block)
    refused(BadRequest, lambda: site.locate(block, write=True), site.data, "outside the volume")
    assert sorted(os.listdir(site.ann)) == ([] if block_info is None else ["block_info.csv"])


def test_the_last_voxel_is_inside_the_volume(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x999y799z299", write=True)
    site.store.put(path, b"[]")
    assert path.read_bytes() == b"[]"


def test_a_point_past_the_volume_names_no_block_even_an_existing_one(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="512,512,512\n")
    (site.ann / "x1y1z0").mkdir()
    # (1010, 900, 0) lies past the volume (1000 x 800 x 300) but in block (1, 1, 0), which exists.
    with pytest.raises(BadRequest, match="outside the volume"):
        site.locate("x1010y900z0", write=True)
    with pytest.raises(NotFound, match="outside the volume"):
        site.locate("x1010y900z0", write=False)
    assert site.locate("x999y799z0", write=True) == site.ann / "x1y1z0" / "fibers.json"


def test_huge_block_coordinates_are_just_outside_the_volume(tmp_path: Path) -> None:
    site = Site(tmp_path, block_info="1,1,1\n")
    (site.ann / "x0001_y0001").mkdir()  # legacy names: x{i+1:04d} of 240 digits is too long
    block = "x" + "9" * 240 + "y0z0"
    with pytest.raises(NotFound):
        site.locate(block)
    refused(BadRequest, partial(site.locate, block, write=True), site.data, "outside the volume")


@pytest.mark.parametrize(
    ("block", "exc"),
    [("..", BadRequest), ("a/b", BadRequest), ("", BadRequest), (".versions", NotFound)],
)
def test_unsafe_block_names_are_refused(tmp_path: Path, block: str, exc: type[DomainError]) -> None:
    site = Site(tmp_path)
    (site.ann / "a" / "b").mkdir(parents=True)
    for write in (False, True):
        refused(exc, partial(site.locate, block, write=write), site.data)


@pytest.mark.parametrize(
    "name", ["fibers.json", "centroids.json", "z-0001.json", "my_file.v2.json", "A-b_9.json"]
)
def test_good_file_names(tmp_path: Path, name: str) -> None:
    site = Site(tmp_path)
    assert ANNOTATION_NAME.match(name)
    assert site.locate("x0y0z0", name, write=True).name == name


@pytest.mark.parametrize(
    "name",
    [
        "fibers",
        "fibers.txt",
        ".json",
        ".hidden.json",
        "a..json",
        "a..b.json",
        "a/b.json",
        "../x.json",
        "a b.json",
        "ä.json",
        "fibers.json\n",
        "fibers.json.lock",
        "",
        "x" * 300 + ".json",
    ],
)
def test_bad_file_names_are_refused(tmp_path: Path, name: str) -> None:
    site = Site(tmp_path)
    assert not ANNOTATION_NAME.match(name)
    for write in (False, True):
        refused(
            BadRequest,
            partial(site.locate, "x0y0z0", name, write=write),
            site.data,
            "file name",
        )


def test_writes_never_follow_a_link_out_of_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "x0y0z0").mkdir(parents=True)
    site = Site(tmp_path, annotations=False)
    site.ann.symlink_to(outside)
    refused(Forbidden, lambda: site.locate("x0y0z0", write=True), tmp_path)
    refused(Forbidden, lambda: site.locate("x1y1z1", write=True), tmp_path)
    with pytest.raises(NotFound):
        site.locate("x0y0z0")
    # A path handed straight to a write is checked again.
    refused(Forbidden, lambda: site.store.put(site.ann / "x0y0z0" / "a.json", b"[]"), tmp_path)
    refused(Forbidden, lambda: site.store.put(site.ann / "x9y9z9" / "a.json", b"[]"), tmp_path)
    assert snapshot(outside) == {"x0y0z0": None}


def test_a_block_directory_linked_out_of_the_root_is_read_only_at_most(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "fibers.json").write_bytes(b"[]")
    for follow in (False, True):
        site = Site(tmp_path / str(follow), follow_symlinks=follow)
        (site.ann / "x0y0z0").symlink_to(outside)
        if follow:
            assert site.store.read(site.locate("x0y0z0")).content == b"[]"
        else:
            with pytest.raises(NotFound):
                site.locate("x0y0z0")
        refused(Forbidden, partial(site.locate, "x0y0z0", write=True), tmp_path)
        refused(
            Forbidden,
            partial(site.store.patch, site.ann / "x0y0z0" / "fibers.json", body(point("a")), None),
            tmp_path,
        )
    assert snapshot(outside) == {"fibers.json": b"[]"}


def test_a_versions_directory_linked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, body([point("a")]))
    (path.parent / ".versions").symlink_to(outside)
    refused(Forbidden, lambda: site.store.put(path, body([point("b")])), tmp_path)
    assert json.loads(path.read_bytes()) == [point("a")]
    assert os.listdir(outside) == []


# --- validation -------------------------------------------------------------------------

GOOD = [point("p1"), polygon("g1")]

BAD_BODIES: list[tuple[bytes, str]] = [
    (b'[{"id": "a", "type": ]', "invalid JSON: Expecting value at line 1 column 22"),
    (b'[\n{"id": "a",\n "type" "point"}]', "invalid JSON: Expecting ':' delimiter at line 3"),
    (b"", "invalid JSON: Expecting value at line 1 column 1"),
    (b"[\xff]", "invalid JSON: the body is not UTF-8"),
    (b'[{"id": "a", "type": "point", "point": [NaN, 1, 2]}]', "invalid JSON: NaN is not allowed"),
    (b'[{"id": "a", "type": "point", "point": [1e999, 1, 2]}]', "invalid JSON: the number 1e999"),
    (b'{"id": "a", "type": "point", "point": [1, 2, 3]}', "must be a JSON array"),
    (b"[null]", "record 0: must be an object, got null"),
    (
        b'[{"id":"a","type":"point","point":[1,2,3]}, 7]',
        "record 1: must be an object, got a number",
    ),
    (b'[{"type": "point", "point": [1, 2, 3]}]', 'record 0: field "id" is required'),
    (
        b'[{"id": null, "type": "point", "point": [1, 2, 3]}]',
        'record 0: field "id" may not be null',
    ),
    (b'[{"id": "", "type": "point", "point": [1, 2, 3]}]', 'field "id" must be a non-empty string'),
    (b'[{"id": 7, "type": "point", "point": [1, 2, 3]}]', 'field "id" must be a non-empty string'),
    (
        b'[{"id":"a","type":"point","point":[1,2,3]},{"id":"a","type":"point","point":[1,2,3]}]',
        'record 1 (id "a"): field "id" is not unique (record 0 has the same id)',
    ),
    (b'[{"id": "a", "point": [1, 2, 3]}]', 'record 0 (id "a"): field "type" is required'),
    (b'[{"id": "a", "type": null}]', 'record 0 (id "a"): field "type" may not be null'),
    (b'[{"id": "a", "type": "circle"}]', 'field "type" must be one of point, polygon'),
    (b'[{"id": "a", "type": 3}]', 'field "type" must be one of'),
    (b'[{"id": "a", "type": "point"}]', 'record 0 (id "a"): field "point" is required'),
    (b'[{"id": "a", "type": "point", "point": null}]', 'field "point" may not be null'),
    (b'[{"id": "a", "type": "point", "point": [1, 2]}]', 'field "point" must be three finite'),
    (b'[{"id": "a", "type": "point", "point": [1, 2, 3, 4]}]', 'field "point" must be three'),
    (b'[{"id": "a", "type": "point", "point": [1, true, 3]}]', 'field "point" must be three'),
    (b'[{"id": "a", "type": "point", "point": [1, "2", 3]}]', 'field "point" must be three'),
    (b'[{"id": "a", "type": "point", "point": [1, null, 3]}]', 'field "point" must be three'),
    (b'[{"id": "a", "type": "point", "point": "1,2,3"}]', 'field "point" must be three'),
    (
        b'[{"id": "a", "type": "point", "point": [1' + b"0" * 400 + b", 2, 3]}]",
        'field "point" must be three finite numbers',
    ),
    (b'[{"id": "a", "type": "polygon"}]', 'record 0 (id "a"): field "points" is required'),
    (b'[{"id": "a", "type": "LineString"}]', 'field "points" is required for type "linestring"'),
    (b'[{"id": "a", "type": "polygon", "points": null}]', 'field "points" may not be null'),
    (b'[{"id": "a", "type": "polygon", "points": {}}]', 'field "points" must be an array'),
    (
        b'[{"id":"x","type":"point","point":[1,2,3]},{"id":"y","type":"point","point":[1,2,3]},'
        b'{"id":"z","type":"point","point":[1,2,3]},'
        b'{"id":"abc","type":"polygon","points":[[1,2,3],[4,5,6],[7,8]]}]',
        'record 3 (id "abc"): field "points"[2] must be three finite numbers',
    ),
    (b'[{"id": "a", "type": "line", "points": [null]}]', 'field "points"[0] must be three'),
    (b'[{"id": "a", "type": "ellipsoid", "anntype": null}]', 'field "anntype" may not be null'),
    (b'[{"id": "a", "type": "ellipsoid", "anntype": 5}]', 'field "anntype" must be a string'),
    (b'[{"id": "a", "type": "ellipsoid", "reviewed": "yes"}]', 'field "reviewed" must be a bool'),
    (b'[{"id": "a", "type": "ellipsoid", "reviewed": null}]', 'field "reviewed" may not be null'),
    (b'[{"id": "a", "type": "ellipsoid", "visited": 0}]', 'field "visited" must be a boolean'),
    (b'[{"id": "a", "type": "ellipsoid", "visited": null}]', 'field "visited" may not be null'),
    (b'[{"id": "a", "type": "ellipsoid", "length": "3"}]', 'field "length" must be a number'),
    (b'[{"id": "a", "type": "ellipsoid", "length": null}]', 'field "length" may not be null'),
    (b'[{"id": "a", "type": "ellipsoid", "length": false}]', 'field "length" must be a number'),
    (b'[{"id": "a", "type": "ellipsoid", "description": 5}]', 'field "description" must be a'),
    (b'[{"id": "a", "type": "ellipsoid", "description": null}]', 'field "description" may not'),
    (b'[{"id": "a", "type": "ellipsoid", "segments": "12"}]', 'field "segments" must be an array'),
    (b'[{"id": "a", "type": "ellipsoid", "segments": null}]', 'field "segments" may not be null'),
    (b'[{"id": "a", "type": "ellipsoid", "segments": ["1", 2]}]', 'field "segments"[1] must be'),
    (b"[" * 100000 + b"]" * 100000, "invalid JSON"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_BODIES, ids=[m for _, m in BAD_BODIES])
def test_a_refused_put_leaves_everything_as_it_was(
    tmp_path: Path, bad: bytes, message: str
) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, body([point("old")]))
    site.store.put(path, body(GOOD))  # so that a version and a lock file exist too
    error = refused(BadRequest, lambda: site.store.put(path, bad), site.data, message)
    assert error.status == 400
    assert path.read_bytes() == canonical(GOOD)
    # The same body on a block that does not exist creates nothing either.
    refused(BadRequest, lambda: site.store.put(site.locate("x5y5z5", write=True), bad), site.data)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"[]", "a PATCH body must be one record (a JSON object), got an array"),
        (b"null", "got null"),
        (b'{"id": "a", "type": "point"', "invalid JSON"),
        (b'{"id": "a", "type": "point"}', 'record (id "a"): field "point" is required'),
        (b'{"id": "a", "type": "point", "point": [1, 2, null]}', 'field "point" must be three'),
        (b'{"id": "a", "type": "polygon", "points": [[1, 2, 3], 5]}', 'field "points"[1] must'),
        (b'{"id": "a", "type": "point", "point": [1, 2, 3], "anntype": null}', '"anntype" may not'),
        (b'{"type": "point", "point": [1, 2, 3]}', "needs an id"),
        (b'{"id": "", "type": "point", "point": [1, 2, 3]}', 'field "id" must be a non-empty'),
    ],
)
def test_a_refused_patch_leaves_everything_as_it_was(
    tmp_path: Path, bad: bytes, message: str
) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, body(GOOD))
    refused(BadRequest, lambda: site.store.patch(path, bad, None), site.data, message)
    assert path.read_bytes() == canonical(GOOD)
    new = site.locate("x7y7z7", write=True)
    refused(BadRequest, lambda: site.store.patch(new, bad, None), site.data)


def test_valid_records_of_every_kind_are_accepted() -> None:
    records: list[Any] = [
        point("9f1c" * 10),
        polygon("1bcd4c15-5ddc-4a36-9871-faca72f9f41b"),
        {
            "points": [[1, 2, 3], [4.5, 5, 6]],
            "type": "linestring",
            "id": "l",
            "anntype": "axon",
            "reviewed": False,
            "visited": False,
            "length": 412,
            "description": "a fibre",
            "segments": ["1", "22"],
        },
        {"type": "POLYGON", "id": "P", "points": []},
        {"type": "Line", "id": "li", "pointA": [1, 2, 3], "pointB": [4, 5, 6]},
        {"type": "axis_aligned_bounding_box", "id": "box"},
        {"type": "ellipsoid", "id": "e", "center": [1, 2, 3], "radii": None, "x": {"y": None}},
        {"type": "point", "id": "neg", "point": [-1.5, 0, -0.0], "length": 1e300},
    ]
    assert validate_records(records) == records
    assert parse_records(json.dumps(records).encode()) == records
    assert parse_records("\ufeff[]".encode()) == []


# --- PUT, PATCH, DELETE -----------------------------------------------------------------


def test_put_replaces_the_file_with_its_canonical_form(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    records: list[Any] = [
        point("é-1", description="café ☕ \U0001f9e0", extra={"nested": [1, 2.5, None, "ü"]}),
        polygon("g"),
    ]
    first = site.store.put(path, body(records))
    assert first == WriteResult("fibers.json", etag_of(path.read_bytes()), True, 2, None)
    content = path.read_bytes()
    assert content == canonical(records)
    assert "café ☕".encode() in content  # UTF-8, not \u escapes
    assert json.loads(content) == records  # unknown fields and nulls in them kept

    second = site.store.put(path, body([point("x")]))
    assert (second.created, second.count) == (False, 1)
    assert path.read_bytes() == canonical([point("x")])
    stored = site.store.read(path)
    assert stored == StoredFile(path.read_bytes(), second.etag, path.stat().st_mtime)
    assert stored.etag.startswith('"') and len(stored.etag) == 34


def test_strings_that_utf8_cannot_hold_are_kept_as_escapes(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    lone = b'[{"id": "a", "type": "point", "point": [1, 2, 3], "description": "\\ud800 \\u00e9"}]'
    site.store.put(path, lone)
    content = path.read_bytes()
    assert content.isascii()
    assert json.loads(content) == json.loads(lone)
    site.store.patch(path, body(point("b")), None)
    assert json.loads(path.read_bytes())[0]["description"] == "\ud800 é"


def test_read_of_a_missing_file_is_not_found(tmp_path: Path) -> None:
    site = Site(tmp_path)
    (site.ann / "x0y0z0").mkdir()
    with pytest.raises(NotFound):
        site.store.read(site.locate("x0y0z0"))
    (site.ann / "x0y0z0" / "fibers.json").mkdir()
    with pytest.raises(NotFound):
        site.store.read(site.locate("x0y0z0"))


def test_patch_appends_replaces_in_place_and_creates(tmp_path: Path) -> None:
    site = Site(tmp_path, annotations=False)
    path = site.locate("x3y4z5", "z-0005.json", write=True)
    result = site.store.patch(path, body(point("a")), None)
    assert (result.created, result.count, result.record_id) == (True, 1, "a")
    site.store.patch(path, body(point("b")), "b")
    site.store.patch(path, body(polygon("c")), None)
    changed = point("b", x=99.0, anntype="glia")
    result = site.store.patch(path, body(changed), "b")
    assert (result.created, result.count, result.record_id) == (False, 3, "b")
    assert path.read_bytes() == canonical([point("a"), changed, polygon("c")])
    assert result.etag == etag_of(path.read_bytes())
    # The id may come from ?id= alone.
    no_id = point("ignored")
    del no_id["id"]
    result = site.store.patch(path, body(no_id), "d")
    assert result.record_id == "d"
    assert json.loads(path.read_bytes())[-1] == {**no_id, "id": "d"}


def test_patch_ids_must_agree_and_exist(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, body(GOOD))
    refused(BadRequest, lambda: site.store.patch(path, body(point("a")), "b"), site.data, "differs")
    no_id = point("x")
    del no_id["id"]
    refused(BadRequest, lambda: site.store.patch(path, body(no_id), None), site.data, "needs an id")
    refused(BadRequest, lambda: site.store.patch(path, body(point("a")), ""), site.data)


def test_patch_over_a_file_that_is_not_an_array_changes_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    (site.ann / "x0y0z0").mkdir()
    path = site.ann / "x0y0z0" / "fibers.json"
    path.write_bytes(b'{"not": "an array"}')
    # The problem shows only once the file is locked and read: the lock file stays, and
    # nothing else changes.
    with pytest.raises(ServerError, match="not a JSON array"):
        site.store.patch(path, body(point("a")), None)
    assert sorted(os.listdir(path.parent)) == [".fibers.json.lock", "fibers.json"]
    assert path.read_bytes() == b'{"not": "an array"}'
    path.write_bytes(b"[1, 2,")
    refused(ServerError, lambda: site.store.patch(path, body(point("a")), None), site.data)
    # A whole PUT repairs it, keeping the broken content as a version.
    site.store.put(path, body([point("a")]))
    assert site.store.read_version(path, 1).content == b"[1, 2,"
    # An empty file counts as no records.
    path.write_bytes(b"")
    assert site.store.patch(path, body(point("a")), None).count == 1


def test_patch_keeps_other_records_as_they_are(tmp_path: Path) -> None:
    site = Site(tmp_path)
    (site.ann / "x0y0z0").mkdir()
    path = site.ann / "x0y0z0" / "fibers.json"
    # Written by some other tool: spaces, a record the viewer would not like, unicode escapes.
    path.write_bytes(b'[ {"id": "old", "type": "point", "anntype": null, "w": "\\u00e9"} ]')
    site.store.patch(path, body(point("new")), None)
    assert json.loads(path.read_bytes()) == [
        {"id": "old", "type": "point", "anntype": None, "w": "é"},
        point("new"),
    ]


def test_delete_removes_one_record(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, body([point("a"), polygon("b"), point("c")]))
    result = site.store.delete(path, "b")
    assert result == WriteResult("fibers.json", etag_of(path.read_bytes()), False, 2, "b")
    assert path.read_bytes() == canonical([point("a"), point("c")])
    # The content before the DELETE is kept.
    assert json.loads(site.store.read_version(path, 1).content)[1] == polygon("b")
    refused(NotFound, lambda: site.store.delete(path, "b"), site.data, 'no record with id "b"')
    refused(BadRequest, lambda: site.store.delete(path, None), site.data)
    refused(BadRequest, lambda: site.store.delete(path, ""), site.data)
    site.store.delete(path, "a")
    site.store.delete(path, "c")
    assert path.read_bytes() == b"[]"


def test_disk_trouble_is_a_server_error_naming_the_file_and_changes_nothing(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, body(GOOD))
    (path.parent / ".versions").write_bytes(b"not a directory")
    error = refused(ServerError, partial(site.store.put, path, b"[]"), site.data)
    assert error.message == "brain1/annotations/x0y0z0/.versions is not a directory"
    (path.parent / ".versions").unlink()
    (path.parent / ".fibers.json.lock").unlink()
    (path.parent / ".fibers.json.lock").mkdir()
    error = refused(ServerError, partial(site.store.put, path, b"[]"), site.data)
    assert error.message.startswith("cannot access brain1/annotations/x0y0z0/.fibers.json.lock")
    assert str(tmp_path) not in error.message
    assert path.read_bytes() == canonical(GOOD)


def test_delete_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    (site.ann / "x0y0z0").mkdir()
    refused(NotFound, lambda: site.store.delete(site.ann / "x0y0z0" / "a.json", "x"), site.data)
    refused(NotFound, lambda: site.store.delete(site.ann / "x1y1z1" / "a.json", "x"), site.data)


# --- If-Match ---------------------------------------------------------------------------


def test_if_match(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    new = site.locate("x5y5z5", write=True)
    for header in ("*", '"0123"', 'W/"0123"'):
        refused(PreconditionFailed, partial(site.store.put, new, b"[]", header), site.data)
        refused(
            PreconditionFailed,
            partial(site.store.patch, new, body(point("a")), None, header),
            site.data,
        )
    etag = site.store.put(path, body([point("a")])).etag
    stale = etag
    etag = site.store.put(path, body([point("a"), point("b")]), etag).etag
    etag = site.store.put(path, body([point("a"), point("b")]), f'"nope", {etag}').etag
    etag = site.store.patch(path, body(point("c")), None, "*").etag
    for header in (stale, f"W/{etag}", "", '"nope"', etag.strip('"')):
        refused(PreconditionFailed, partial(site.store.put, path, b"[]", header), site.data)
        refused(
            PreconditionFailed,
            partial(site.store.patch, path, body(point("d")), None, header),
            site.data,
        )
        refused(
            PreconditionFailed,
            partial(site.store.delete, path, "a", header),
            site.data,
        )
    assert site.store.delete(path, "a", etag).count == 2


# --- versions ---------------------------------------------------------------------------


def test_versions_keep_what_each_write_replaced(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    with pytest.raises(NotFound):
        site.store.versions(path)
    site.store.put(path, body([point("a")]))
    assert site.store.versions(path) == []
    first = path.read_bytes()
    os.utime(path, (1_700_000_000.25, 1_700_000_000.25))
    site.store.put(path, body([point("a"), point("b")]))
    second = path.read_bytes()
    site.store.patch(path, body(point("c")), None)

    listing = site.store.versions(path)
    assert [(v["version"], v["count"], v["size"]) for v in listing] == [
        (2, 2, len(second)),
        (1, 1, len(first)),
    ]
    assert listing[1]["modified"] == "2023-11-14T22:13:20.250Z"
    when = datetime.fromisoformat(str(listing[0]["modified"]).replace("Z", "+00:00"))
    assert abs(when.timestamp() - time.time()) < 60
    assert when.tzinfo == timezone.utc
    old = site.store.read_version(path, 1)
    assert old == StoredFile(first, etag_of(first), 1_700_000_000.25)
    assert site.store.read_version(path, 2).content == second
    for missing in (0, -1, 3, 99, 10**300):
        with pytest.raises(NotFound):
            site.store.read_version(path, missing)
    # Versions are hidden in a dot-directory beside the file.
    assert sorted(os.listdir(path.parent / ".versions" / "fibers.json")) == ["1.json", "2.json"]
    assert [n for n in os.listdir(path.parent) if not n.startswith(".")] == ["fibers.json"]


def test_a_stray_put_of_an_empty_array_can_be_undone(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z120", "z-0120.json", write=True)
    work = [polygon(f"cell{i}") for i in range(30)]
    site.store.put(path, canonical(work))
    original = path.read_bytes()
    result = site.store.put(path, b"[]")  # the viewer moving between slices
    assert result.count == 0
    newest = site.store.versions(path)[0]
    assert newest["count"] == 30
    restored = site.store.put(
        path, site.store.read_version(path, int(str(newest["version"]))).content
    )
    assert restored.count == 30
    assert path.read_bytes() == original
    assert [v["count"] for v in site.store.versions(path)] == [0, 30]


def test_versions_are_trimmed_and_their_numbers_never_reused(tmp_path: Path) -> None:
    site = Site(tmp_path, keep_versions=3)
    path = site.locate("x0y0z0", write=True)
    for i in range(7):
        site.store.put(path, body([point(str(j)) for j in range(i + 1)]))
    assert [v["version"] for v in site.store.versions(path)] == [6, 5, 4]
    assert [v["count"] for v in site.store.versions(path)] == [6, 5, 4]
    with pytest.raises(NotFound):
        site.store.read_version(path, 3)
    site.store.delete(path, "0")
    assert [v["version"] for v in site.store.versions(path)] == [7, 6, 5]
    assert len(os.listdir(path.parent / ".versions" / "fibers.json")) == 3


def test_an_identical_write_makes_no_version(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    first = site.store.put(path, body(GOOD))
    mtime = path.stat().st_mtime_ns
    for _ in range(5):  # a burst of identical PUTs, in various spellings
        again = site.store.put(path, canonical(GOOD))
        assert again == WriteResult("fibers.json", first.etag, False, 2, None)
        site.store.put(path, body(GOOD))
    site.store.patch(path, body(point("p1")), None)  # the same record again
    assert site.store.versions(path) == []
    assert path.stat().st_mtime_ns == mtime


def test_no_versions_are_kept_when_told_so(tmp_path: Path) -> None:
    site = Site(tmp_path, keep_versions=0)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, b"[]")
    site.store.put(path, body(GOOD))
    assert site.store.versions(path) == []
    with pytest.raises(ValueError):
        AnnotationStore(site.root, keep_versions=-1)


# --- concurrency ------------------------------------------------------------------------


def test_threads_patching_one_file_lose_nothing_and_never_see_a_torn_file(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    writers, per_writer, readers = 8, 25, 4
    done = threading.Event()
    reads = [0] * readers
    torn = [0] * readers
    errors: list[BaseException] = []
    start = threading.Barrier(writers + readers)

    def write(w: int) -> None:
        store = AnnotationStore(site.root)  # stores of their own: the locks are per file
        start.wait()
        try:
            for i in range(per_writer):
                store.patch(path, canonical(point(f"t{w}-{i}")), None)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def read(r: int) -> None:
        start.wait()
        while not done.is_set():
            try:
                content = site.store.read(path).content
            except NotFound:
                continue
            reads[r] += 1
            try:
                assert isinstance(json.loads(content), list)
            except (ValueError, AssertionError):
                torn[r] += 1

    write_threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    read_threads = [threading.Thread(target=read, args=(r,)) for r in range(readers)]
    for t in write_threads + read_threads:
        t.start()
    for t in write_threads:
        t.join()
    done.set()
    for t in read_threads:
        t.join()

    ids = [r["id"] for r in json.loads(path.read_bytes())]
    lost = writers * per_writer - len(set(ids))
    print(
        f"\nthreads: writers={writers} records={len(ids)} reads={sum(reads)} "
        f"lost={lost} torn={sum(torn)}"
    )
    assert errors == []
    assert lost == 0 and len(ids) == writers * per_writer
    assert sum(torn) == 0
    assert sum(reads) > 0


def _process_patcher(data: str, file: str, writer: int, count: int) -> None:
    store = AnnotationStore(DataRoot(data))
    for i in range(count):
        store.patch(Path(file), canonical(point(f"p{writer}-{i}")), None)


def _process_reader(
    data: str,
    file: str,
    stop: multiprocessing.synchronize.Event,
    results: multiprocessing.queues.Queue[tuple[int, int]],
) -> None:
    store = AnnotationStore(DataRoot(data))
    reads = torn = 0
    while not stop.is_set():
        try:
            content = store.read(Path(file)).content
        except NotFound:
            continue
        reads += 1
        try:
            if not isinstance(json.loads(content), list):
                torn += 1
        except ValueError:
            torn += 1
    results.put((reads, torn))


def test_processes_patching_one_file_lose_nothing(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", "centroids.json", write=True)
    site.store.put(path, b"[]")
    writers, per_writer, readers = 4, 40, 2
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    results: multiprocessing.queues.Queue[tuple[int, int]] = ctx.Queue()
    read_procs = [
        ctx.Process(target=_process_reader, args=(str(site.data), str(path), stop, results))
        for _ in range(readers)
    ]
    write_procs = [
        ctx.Process(target=_process_patcher, args=(str(site.data), str(path), w, per_writer))
        for w in range(writers)
    ]
    for p in read_procs + write_procs:
        p.start()
    for p in write_procs:
        p.join(60)
    stop.set()
    figures = [results.get(timeout=60) for _ in read_procs]
    for p in read_procs:
        p.join(60)
    assert [p.exitcode for p in write_procs + read_procs] == [0] * (writers + readers)

    ids = [r["id"] for r in json.loads(path.read_bytes())]
    lost = writers * per_writer - len(set(ids))
    reads, torn = sum(f[0] for f in figures), sum(f[1] for f in figures)
    print(
        f"\nprocesses: writers={writers} records={len(ids)} reads={reads} lost={lost} torn={torn}"
    )
    assert lost == 0 and len(ids) == writers * per_writer
    assert torn == 0
    assert len(site.store.versions(path)) == 20


#: The bulk of every content the crash writer puts (about 1 MB), so that a good share of its
#: time goes to writing the file and a kill often lands in the middle of a write.
_CRASH_TAIL = [point(f"tail-{i}", x=float(i), description="d" * 2000) for i in range(500)]


def _crash_content(k: int) -> list[dict[str, object]]:
    """The k-th content the crash writer puts."""
    return [point(f"k{k}", x=float(k)), *_CRASH_TAIL]


def _crash_writer(data: str, file: str, start: int) -> None:
    store = AnnotationStore(DataRoot(data), keep_versions=3)
    tail = canonical(_CRASH_TAIL)[1:]
    k = start
    while True:
        # The same bytes as canonical(_crash_content(k)), without re-serialising the tail.
        store.put(Path(file), b"[" + canonical(point(f"k{k}", x=float(k))) + b"," + tail)
        k += 1


def _written_by_crash_writer(content: bytes) -> int:
    """Which content of the crash writer ``content`` is; fails unless it is one exactly."""
    k = int(json.loads(content)[0]["id"][1:])
    assert content == canonical(_crash_content(k))
    return k


def test_a_writer_killed_at_random_moments_leaves_a_whole_file(tmp_path: Path) -> None:
    site = Site(tmp_path)
    path = site.locate("x0y0z0", write=True)
    site.store.put(path, canonical(_crash_content(0)))
    ctx = multiprocessing.get_context("spawn")
    rng = random.Random()
    rounds, mid_write = 12, 0
    seen: list[int] = []
    for round_ in range(rounds):
        start = (round_ + 1) * 1_000_000
        child = ctx.Process(target=_crash_writer, args=(str(site.data), str(path), start))
        child.start()
        deadline = time.monotonic() + 30
        while _written_by_crash_writer(path.read_bytes()) < start:
            assert time.monotonic() < deadline and child.is_alive()
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        if any(".tmp-" in n for n in os.listdir(path.parent)):
            mid_write += 1
        # The file is whole: exactly one of the contents written, never a mixture.
        seen.append(_written_by_crash_writer(path.read_bytes()) - start)
        for v in site.store.versions(path):
            _written_by_crash_writer(site.store.read_version(path, int(str(v["version"]))).content)
    print(
        f"\ncrash: rounds={rounds} writes before each kill={seen} "
        f"killed with a temporary file left={mid_write}"
    )
    # The lock died with the writer; the next write works and sweeps up its leftovers.
    site.store.put(path, body(GOOD))
    assert path.read_bytes() == canonical(GOOD)
    assert not [n for n in os.listdir(path.parent) if ".tmp-" in n]
