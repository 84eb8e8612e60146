"""Chunk names, info files and TIFF decoding, without a server."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neurotrale_twisted.core.cache import LruCache
from neurotrale_twisted.core.chunks.info import InfoCache, ScaleFormat, scale_format
from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.core.chunks.source import ChunkSource
from neurotrale_twisted.core.chunks.tiff import RawLayout, decode_tiff, read_layout
from neurotrale_twisted.core.errors import NotFound, ServerError
from neurotrale_twisted.core.imagery import RootImagery
from neurotrale_twisted.core.paths import DataRoot
from tests.support import raw_of, write_chunk, write_info


def decode_file(path: Path, name: ChunkName, fmt: ScaleFormat) -> bytes:
    """:func:`decode_tiff` of the file at ``path``."""
    with open(path, "rb") as file:
        return decode_tiff(file, name, fmt, str(path))


def layout_of(path: Path) -> RawLayout | None:
    """:func:`read_layout` of the file at ``path``."""
    with open(path, "rb") as file:
        return read_layout(file, str(path))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("0-64_0-64_0-64", ChunkName(0, 64, 0, 64, 0, 64)),
        ("64-128_0-64_32-40.tiff", ChunkName(64, 128, 0, 64, 32, 40)),
        ("1-2_3-4_5-6.tif", ChunkName(1, 2, 3, 4, 5, 6)),
        ("0-64_0-64", None),
        ("0-64_0-64_0-64.png", None),
        ("64-0_0-64_0-64", None),
        ("5-5_0-1_0-1", None),
        ("-1-5_0-1_0-1", None),
        ("0-64_0-64_0-64.tiff.tiff", None),
        ("info", None),
    ],
)
def test_chunk_names(name: str, expected: ChunkName | None) -> None:
    assert ChunkName.parse(name) == expected


@given(st.tuples(*[st.integers(0, 10**9)] * 3), st.tuples(*[st.integers(1, 4096)] * 3))
def test_chunk_name_round_trip(start: tuple[int, int, int], extent: tuple[int, int, int]) -> None:
    (x0, y0, z0), (dx, dy, dz) = start, extent
    name = ChunkName.parse(f"{x0}-{x0 + dx}_{y0}-{y0 + dy}_{z0}-{z0 + dz}")
    assert name is not None
    assert name.shape == (dz, dy, dx)
    assert ChunkName.parse(name.stem + ".tiff") == name


@given(st.text(max_size=40))
def test_chunk_name_parse_never_raises(text: str) -> None:
    ChunkName.parse(text)


DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "float32", "float64"]
COMPRESSIONS = [None, "zlib", "lzw", "zstd", "packbits"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dtype=st.sampled_from(DTYPES),
    byteorder=st.sampled_from(["<", ">"]),
    compression=st.sampled_from(COMPRESSIONS),
    shape=st.tuples(st.integers(1, 4), st.integers(1, 19), st.integers(1, 23)),
    channels=st.integers(1, 3),
    planar=st.sampled_from(["contig", "separate"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_bytes_are_raw_little_endian_x_fastest(
    tmp_path_factory: pytest.TempPathFactory,
    dtype: str,
    byteorder: str,
    compression: str | None,
    shape: tuple[int, int, int],
    channels: int,
    planar: str,
    seed: int,
) -> None:
    """Random arrays written as TIFF in any layout decode to exactly the raw encoding."""
    tmp = tmp_path_factory.mktemp("hyp")
    rng = np.random.default_rng(seed)
    z, y, x = shape
    info = np.iinfo(dtype) if dtype[0] in "ui" else None
    if info is not None:
        czyx = rng.integers(info.min, info.max, (channels, z, y, x), dtype=dtype, endpoint=True)
    else:
        czyx = rng.standard_normal((channels, z, y, x)).astype(dtype)
    if channels == 1:
        on_disk = czyx[0]
        extra = {}
    elif planar == "contig":
        on_disk = np.moveaxis(czyx, 0, -1)  # (z, y, x, c): samples interleaved
        extra = {"planarconfig": "contig"}
    else:
        on_disk = np.moveaxis(czyx, 0, 1)  # (z, c, y, x): one plane per sample
        extra = {"planarconfig": "separate"}
    if compression == "packbits" and dtype.endswith("64"):
        compression = None  # packbits of 64-bit samples is not something tifffile writes
    path = write_chunk(
        tmp,
        "1_1_1",
        (0, x, 0, y, 0, z),
        on_disk.astype(on_disk.dtype.newbyteorder(byteorder)),
        byteorder=byteorder,
        compression=compression,
        **extra,
    )
    name = ChunkName(0, x, 0, y, 0, z)
    write_info(tmp, (x, y, z), dtype, channels)
    fmt = scale_format(json.loads((tmp / "info").read_text()), "1_1_1", str(tmp / "info"))
    assert decode_file(path, name, fmt) == raw_of(czyx)


def test_shape_mismatch_is_a_server_error_naming_the_file(tmp_path: Path) -> None:
    write_info(tmp_path, (64, 64, 64))
    path = write_chunk(tmp_path, "1_1_1", (0, 64, 0, 64, 0, 64), np.zeros((2, 64, 64), "uint16"))
    fmt = scale_format(json.loads((tmp_path / "info").read_text()), "1_1_1", str(tmp_path / "info"))
    with pytest.raises(ServerError, match=str(path)):
        decode_file(path, ChunkName(0, 64, 0, 64, 0, 64), fmt)


def test_dtype_mismatch_is_a_server_error_naming_the_file(tmp_path: Path) -> None:
    write_info(tmp_path, (8, 8, 2), dtype="uint16")
    path = write_chunk(tmp_path, "1_1_1", (0, 8, 0, 8, 0, 2), np.zeros((2, 8, 8), "uint8"))
    fmt = scale_format(json.loads((tmp_path / "info").read_text()), "1_1_1", str(tmp_path / "info"))
    with pytest.raises(ServerError, match="data type uint8"):
        decode_file(path, ChunkName(0, 8, 0, 8, 0, 2), fmt)


def test_corrupt_tiff_is_a_server_error_naming_the_file(tmp_path: Path) -> None:
    write_info(tmp_path, (8, 8, 2))
    path = write_chunk(tmp_path, "1_1_1", (0, 8, 0, 8, 0, 2), np.zeros((2, 8, 8), "uint16"))
    path.write_bytes(path.read_bytes()[:40])
    fmt = scale_format(json.loads((tmp_path / "info").read_text()), "1_1_1", str(tmp_path / "info"))
    with pytest.raises(ServerError, match=str(path)):
        decode_file(path, ChunkName(0, 8, 0, 8, 0, 2), fmt)


def test_missing_things_are_not_found(tmp_path: Path) -> None:
    source = ChunkSource(DataRoot(tmp_path))
    name = ChunkName(0, 8, 0, 8, 0, 2)
    with pytest.raises(NotFound):
        source.respond(["nothing"], "1_1_1", name)
    write_info(tmp_path / "ds", (8, 8, 2))
    with pytest.raises(NotFound):
        source.respond(["ds"], "2_2_2", name)
    with pytest.raises(NotFound):
        source.respond(["ds"], "1_1_1", name)
    write_chunk(
        tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 0, 2), np.ones((2, 8, 8), "uint16"), suffix=".tif"
    )
    assert source.respond(["ds"], "1_1_1", name).body == raw_of(np.ones((1, 2, 8, 8), "<u2"))


def test_info_is_reread_when_it_changes(tmp_path: Path) -> None:
    cache = InfoCache()
    write_info(tmp_path, (8, 8, 2), dtype="uint16")
    with RootImagery(DataRoot(tmp_path)).open_dataset([]) as dataset:
        assert cache.read(dataset)[0]["data_type"] == "uint16"
        write_info(tmp_path, (8, 8, 2), dtype="uint8")  # different size: always seen
        assert cache.read(dataset)[0]["data_type"] == "uint8"


def test_client_with_current_etag_skips_decoding(tmp_path: Path) -> None:
    write_info(tmp_path, (8, 8, 2))
    write_chunk(tmp_path, "1_1_1", (0, 8, 0, 8, 0, 2), np.ones((2, 8, 8), "uint16"))
    source = ChunkSource(DataRoot(tmp_path))
    name = ChunkName(0, 8, 0, 8, 0, 2)
    first = source.respond([], "1_1_1", name)
    again = source.respond([], "1_1_1", name, None, lambda etag: etag == first.etag)
    assert again.body is None and again.etag == first.etag


def test_big_endian_file_is_served_little_endian(tmp_path: Path) -> None:
    volume = np.arange(2 * 3 * 4, dtype=">u2").reshape(2, 3, 4)
    path = write_chunk(tmp_path, "1_1_1", (0, 4, 0, 3, 0, 2), volume, byteorder=">")
    with tifffile.TiffFile(path) as tif:
        assert tif.byteorder == ">"
    write_info(tmp_path, (4, 3, 2))
    raw = ChunkSource(DataRoot(tmp_path)).respond([], "1_1_1", ChunkName(0, 4, 0, 3, 0, 2)).body
    assert raw == np.arange(24, dtype="<u2").tobytes()


def test_uncompressed_files_are_read_as_one_byte_range(tmp_path: Path) -> None:
    volume = np.random.default_rng(5).integers(0, 60000, (3, 5, 7), dtype="uint16")
    write_info(tmp_path, (7, 5, 3))
    plain = write_chunk(tmp_path, "1_1_1", (0, 7, 0, 5, 0, 3), volume)
    packed = write_chunk(tmp_path, "1_1_1", (7, 14, 0, 5, 0, 3), volume, compression="zlib")
    swapped = write_chunk(tmp_path, "1_1_1", (14, 21, 0, 5, 0, 3), volume, byteorder=">")
    layout = layout_of(plain)
    assert layout is not None and layout.shape == (3, 5, 7) and layout.nbytes == volume.nbytes
    assert plain.read_bytes()[layout.offset : layout.offset + layout.nbytes] == volume.tobytes()
    assert layout_of(packed) is None and layout_of(swapped) is None
    source = ChunkSource(DataRoot(tmp_path))
    for x0 in (0, 7, 14):
        name = ChunkName(x0, x0 + 7, 0, 5, 0, 3)
        assert source.respond([], "1_1_1", name).body == volume.astype("<u2").tobytes()


def test_cache_never_serves_a_stale_chunk(tmp_path: Path) -> None:
    write_info(tmp_path, (8, 8, 2))
    first, second = np.zeros((2, 8, 8), "uint16"), np.full((2, 8, 8), 7, "uint16")
    path = write_chunk(tmp_path, "1_1_1", (0, 8, 0, 8, 0, 2), first)
    source = ChunkSource(DataRoot(tmp_path))
    name = ChunkName(0, 8, 0, 8, 0, 2)
    for coding in (None, "zstd", "gzip"):
        source.respond([], "1_1_1", name, coding)
    before = path.stat()
    # Rewritten in place with the same size, and its mtime put back, as `cp -p` does.
    replacement = tmp_path / "replacement.tiff"
    tifffile.imwrite(replacement, second, photometric="minisblack")
    with open(path, "r+b") as f:
        f.write(replacement.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert source.respond([], "1_1_1", name).body == second.tobytes()
    for coding in ("zstd", "gzip"):
        answer = source.respond([], "1_1_1", name, coding)
        assert answer.body is not None
        assert decompress(answer.body, answer.coding) == second.tobytes()


def decompress(body: bytes, coding: str | None) -> bytes:
    """Undo a content coding, as a client does."""
    if coding == "gzip":
        return gzip.decompress(body)
    if coding == "zstd":
        return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 24)
    return body


def test_lru_cache_is_bounded_and_counts() -> None:
    cache: LruCache[bytes] = LruCache(10, len)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    assert cache.get("a") == b"12345"  # a is now the most recent
    cache.put("c", b"123")
    assert cache.get("b") is None and cache.get("a") == b"12345" and cache.get("c") == b"123"
    assert cache.weight <= 10
    cache.put("huge", b"x" * 11)
    assert cache.get("huge") is None
    assert (cache.hits, cache.misses) == (3, 2)


def test_a_store_of_imagery_is_one_class_of_three_methods(tmp_path: Path) -> None:
    """An image store other than the data root (here: files held in memory, as an object
    store's would be) is the ``Imagery`` interface alone: ChunkSource serves from it, with
    its ETag and its 304s, decoding a zlib TIFF as it does from disk."""
    import io
    from collections.abc import Sequence

    from neurotrale_twisted.core.imagery import ImageFile

    write_info(tmp_path, (8, 8, 2))
    volume = np.arange(2 * 8 * 8, dtype="uint16").reshape(2, 8, 8)
    chunk = write_chunk(tmp_path, "1_1_1", (0, 8, 0, 8, 0, 2), volume, compression="zlib")
    key = "ds/1_1_1/0-8_0-8_0-2"
    objects = {"ds/info": (tmp_path / "info").read_bytes(), key: chunk.read_bytes()}
    opened: list[str] = []

    class MemoryFile:
        def __init__(self, key: str) -> None:
            self.label, self.data = f"memory:{key}", objects[key]
            opened.append(key)

        identity = property(lambda self: (self.label, len(self.data)))
        etag = property(lambda self: f'"{len(self.data)}"')
        modified = property(lambda self: 0.0)
        size = property(lambda self: len(self.data))

        def read_range(self, offset: int, size: int) -> bytes:
            return self.data[offset : offset + size]

        def stream(self) -> io.BytesIO:
            return io.BytesIO(self.data)

        def close(self) -> None:
            pass

    class MemoryDataset:
        def __init__(self, segments: Sequence[str]) -> None:
            self.relative = "/".join(segments)

        def open_info(self) -> ImageFile:
            if f"{self.relative}/info" not in objects:
                raise NotFound("no such dataset")
            return MemoryFile(f"{self.relative}/info")

        def open_chunk(self, key: str, stem: str) -> ImageFile:
            if f"{self.relative}/{key}/{stem}" not in objects:
                raise NotFound(f"no chunk {stem}")
            return MemoryFile(f"{self.relative}/{key}/{stem}")

        def close(self) -> None:
            pass

    class MemoryImagery:
        def open_dataset(self, segments: Sequence[str]) -> MemoryDataset:
            return MemoryDataset(segments)

    source = ChunkSource(MemoryImagery())
    name = ChunkName(0, 8, 0, 8, 0, 2)
    answer = source.respond(["ds"], "1_1_1", name)
    assert answer.body == volume.astype("<u2").tobytes() and answer.etag == f'"{len(objects[key])}"'
    assert (
        source.respond(["ds"], "1_1_1", name, None, lambda etag: etag == answer.etag).body is None
    )
    with pytest.raises(NotFound):
        source.respond(["other"], "1_1_1", name)
    with pytest.raises(NotFound):
        source.respond(["ds"], "1_1_1", ChunkName(8, 16, 0, 8, 0, 2))
    assert opened.count(key) == 2


def counting_opens(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each time a chunk's dataset is opened (the walk from the root), one more item."""
    opens: list[object] = []
    real = RootImagery.open_dataset

    def open_dataset(self: RootImagery, segments: list[str]) -> object:
        opens.append(segments)
        return real(self, segments)

    monkeypatch.setattr(RootImagery, "open_dataset", open_dataset)
    return opens


def test_an_unchanged_chunk_is_answered_without_opening_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_info(tmp_path / "ds", (8, 8, 2))
    ones = np.ones((2, 8, 8), "uint16")
    path = write_chunk(tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 0, 2), ones)
    source = ChunkSource(DataRoot(tmp_path))
    name = ChunkName(0, 8, 0, 8, 0, 2)
    opens = counting_opens(monkeypatch)
    first = source.respond(["ds"], "1_1_1", name)
    for _ in range(3):
        again = source.respond(["ds"], "1_1_1", name)
        assert (again.body, again.etag) == (first.body, first.etag)
    held = source.respond(["ds"], "1_1_1", name, None, lambda etag: etag == first.etag)
    assert held.body is None and held.etag == first.etag
    assert len(opens) == 1  # two stat calls answered the rest
    # Rewritten in place with its size and mtime put back (``cp -p``): its ctime moved.
    status = path.stat()
    write_chunk(tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 0, 2), ones * 7)
    assert path.stat().st_size == status.st_size
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert source.respond(["ds"], "1_1_1", name).body == raw_of((ones * 7)[np.newaxis])
    assert len(opens) == 2
    # A new info is looked at again: the files are opened (here the answer is the same).
    write_info(tmp_path / "ds", (16, 8, 2))
    assert source.respond(["ds"], "1_1_1", name).body == raw_of((ones * 7)[np.newaxis])
    assert len(opens) == 3
    # A .tiff beside the .tif served so far is what the walk would pick: it is served.
    os.rename(path, path.with_suffix(".tif"))
    assert source.respond(["ds"], "1_1_1", name).body == raw_of((ones * 7)[np.newaxis])
    write_chunk(tmp_path / "ds", "1_1_1", (0, 8, 0, 8, 0, 2), ones * 3)
    assert source.respond(["ds"], "1_1_1", name).body == raw_of((ones * 3)[np.newaxis])
    # A directory on the way chmod-ed (the walk opens it: it needs read permission there,
    # where the look needs search permission only) is walked again.
    opened = len(opens)
    assert source.respond(["ds"], "1_1_1", name).body == raw_of((ones * 3)[np.newaxis])
    assert len(opens) == opened
    for directory in (tmp_path / "ds", tmp_path / "ds" / "1_1_1"):
        directory.chmod(0o751)
        source.respond(["ds"], "1_1_1", name)
        assert len(opens) == opened + 1
        opened += 1
    path.unlink()
    path.with_suffix(".tif").unlink()
    with pytest.raises(NotFound):
        source.respond(["ds"], "1_1_1", name)


def test_a_dataset_swapped_for_a_link_out_of_the_root_is_not_served_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quick look follows links; it only ever finds the answer of the very files read
    before. A dataset replaced by a link to a copy outside the root is walked again, and
    refused, whatever the cache holds."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_info(root / "ds", (8, 8, 2))
    write_chunk(root / "ds", "1_1_1", (0, 8, 0, 8, 0, 2), np.ones((2, 8, 8), "uint16"))
    source = ChunkSource(DataRoot(root))
    name = ChunkName(0, 8, 0, 8, 0, 2)
    source.respond(["ds"], "1_1_1", name)
    opens = counting_opens(monkeypatch)
    (root / "ds").rename(outside)
    (root / "ds").symlink_to(outside)
    with pytest.raises(NotFound):
        source.respond(["ds"], "1_1_1", name)
    assert len(opens) == 1


def test_a_chunk_file_moved_out_and_linked_back_is_not_served_from_the_cache(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    write_info(root / "ds", (8, 8, 2))
    path = write_chunk(root / "ds", "1_1_1", (0, 8, 0, 8, 0, 2), np.ones((2, 8, 8), "uint16"))
    name = ChunkName(0, 8, 0, 8, 0, 2)
    strict, following = ChunkSource(DataRoot(root)), ChunkSource(DataRoot(root, True))
    expected = strict.respond(["ds"], "1_1_1", name).body
    assert following.respond(["ds"], "1_1_1", name).body == expected
    moved = tmp_path / "moved.tiff"
    path.rename(moved)
    path.symlink_to(moved)
    with pytest.raises(NotFound):
        strict.respond(["ds"], "1_1_1", name)
    # Under --follow-symlinks the operator lets reads through links: the same file is served.
    assert following.respond(["ds"], "1_1_1", name).body == expected
