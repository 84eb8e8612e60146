"""Chunk names, ``info`` files, and TIFF decoding into the precomputed "raw" encoding.

A chunk ``x0-x1_y0-y1_z0-z1`` of scale ``key`` lives in ``{dataset}/{key}/x0-x1_y0-y1_z0-z1.tiff``
(``.tif`` too). Clients want its voxels as little-endian bytes, x fastest, then y, z and
channel; the body must be exactly ``(x1-x0)*(y1-y0)*(z1-z0)*num_channels*itemsize`` bytes, so
a TIFF that disagrees with its name or with ``info`` is a :class:`ServerError` naming the file.
Every file is reached and read through :mod:`rootfs` (a dataset directory walked from the
root, then its ``info`` and the chunk's file opened there, and only that open file read), so
the file that was checked is the file that is decoded. Pure Python: no Twisted here; the web
layer runs these functions on a thread pool.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Protocol, cast

import numpy as np
import tifffile

from neurotrale_twisted.core.cache import LruCache
from neurotrale_twisted.core.encoding import encode_body
from neurotrale_twisted.core.errors import Forbidden, NotFound, ServerError
from neurotrale_twisted.core.paths import DataRoot
from neurotrale_twisted.core.rootfs import Directory, Follow, OpenedFile

#: A chunk name. ASCII digits only: ``\d`` would match other scripts' digits, which ``int``
#: reads as the same number, so ``\u0660-64_...`` would be an alias of ``0-64_...``.
CHUNK_PATTERN = r"[0-9]+-[0-9]+_[0-9]+-[0-9]+_[0-9]+-[0-9]+(?:\.tiff?)?"
_CHUNK_NAME = re.compile(r"([0-9]+)-([0-9]+)_([0-9]+)-([0-9]+)_([0-9]+)-([0-9]+)(?:\.tiff?)?")
#: The largest ``info`` read (real ones are kilobytes, a few megabytes with many scales).
MAX_INFO_BYTES = 16 * 1024 * 1024
#: The most bytes of image data a chunk's TIFF may store, as a multiple of its raw size plus
#: a slack: no codec expands data that much (LZW, the worst, by half).
MAX_STORED_RATIO = 4
MAX_STORED_SLACK = 1024 * 1024
#: Extensions tried, in order, for the file of a chunk.
CHUNK_EXTENSIONS = (".tiff", ".tif")


@dataclass(frozen=True)
class ChunkName:
    """The bounding box a chunk file name spells: ends exclusive, in voxels."""

    x0: int
    x1: int
    y0: int
    y1: int
    z0: int
    z1: int

    @classmethod
    def parse(cls, name: str) -> ChunkName | None:
        """Parse ``x0-x1_y0-y1_z0-z1`` (optionally ``.tiff``/``.tif``); None if not a chunk name.

        An empty or inverted box is not a chunk name either.
        """
        match = _CHUNK_NAME.fullmatch(name)
        if match is None:
            return None
        x0, x1, y0, y1, z0, z1 = (int(g) for g in match.groups())
        if x1 <= x0 or y1 <= y0 or z1 <= z0:
            return None
        return cls(x0, x1, y0, y1, z0, z1)

    @property
    def stem(self) -> str:
        """The file name without extension."""
        return f"{self.x0}-{self.x1}_{self.y0}-{self.y1}_{self.z0}-{self.z1}"

    @property
    def shape(self) -> tuple[int, int, int]:
        """The chunk's (z, y, x) extent, the order a TIFF stack decodes to."""
        return (self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0)


@dataclass(frozen=True)
class ScaleFormat:
    """What ``info`` says the chunks of one scale hold."""

    key: str
    dtype: np.dtype[np.generic]
    num_channels: int


@dataclass(frozen=True)
class ChunkResponse:
    """A chunk ready to send: the body in ``coding`` (None: identity), or no body at all
    when the client already holds this representation (the web layer answers 304)."""

    body: bytes | None
    coding: str | None
    etag: str
    modified: float


@dataclass(frozen=True)
class RawLayout:
    """Where an uncompressed, contiguous, little-endian TIFF keeps its voxels in the file."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]


class InfoCache:
    """Parsed ``info`` files, by the identity and version of the file (re-read when it changes)."""

    def __init__(self) -> None:
        self._entries: LruCache[dict[str, object]] = LruCache(4096)

    def read(
        self, dataset: Directory, follow: Follow = False, label: str = "info"
    ) -> dict[str, object]:
        """The ``info`` of the open ``dataset`` directory, as a dict; :class:`NotFound` when none.

        It is opened as :meth:`Directory.open_file` does (a link only when ``follow``).
        Raises :class:`ServerError`, naming ``label`` (its path, for the operator), when it
        is not a JSON object.
        """
        try:
            opened = dataset.open_file("info", follow=follow)
        except NotFound:
            where = dataset.relative or "/"
            raise NotFound(f"no dataset with an info file at {where!r}") from None
        with opened:
            version = file_version(opened.status)
            cached = self._entries.get(version)
            if cached is not None:
                return cached
            # Read no further than a limit: a sparse info of gigabytes costs its planter
            # nothing, and every chunk request would read it whole into memory.
            if opened.status.st_size > MAX_INFO_BYTES:
                raise ServerError(f"{label} is larger than {MAX_INFO_BYTES} bytes")
            try:
                content = opened.read_all(MAX_INFO_BYTES + 1)
                if len(content) > MAX_INFO_BYTES:  # it grew since it was opened
                    raise ServerError(f"{label} is larger than {MAX_INFO_BYTES} bytes")
                info = json.loads(content)
            except (OSError, ValueError) as e:
                raise ServerError(f"cannot read {label}: {e}") from e
        if not isinstance(info, dict):
            raise ServerError(f"{label} is not a JSON object")
        self._entries.put(version, info)
        return info


def scale_format(info: dict[str, object], key: str, label: str = "info") -> ScaleFormat:
    """The format of scale ``key``; :class:`NotFound` if ``info`` has no such scale.

    Raises :class:`ServerError` naming ``label`` (the info file's path) when it is unusable.
    """
    scales = info.get("scales")
    if not isinstance(scales, list) or not any(
        isinstance(s, dict) and s.get("key") == key for s in scales
    ):
        raise NotFound(f"dataset has no scale {key!r}")
    try:
        dtype = np.dtype(str(info["data_type"]))
        channels = int(info.get("num_channels", 1))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as e:
        raise ServerError(f"{label}: bad data_type or num_channels: {e}") from e
    return ScaleFormat(key, dtype, channels)


def open_chunk_file(
    scale_dir: Directory, name: ChunkName, follow: Follow = False
) -> tuple[str, OpenedFile]:
    """The file name and the open TIFF file of chunk ``name``; :class:`NotFound` when none.

    Only a regular file is opened (a link only when ``follow``): a FIFO, socket or device
    of a chunk's name is not found, and never blocks.
    """
    for ext in CHUNK_EXTENSIONS:
        filename = name.stem + ext
        try:
            return filename, scale_dir.open_file(filename, follow=follow)
        except NotFound:
            continue
    raise NotFound(f"no chunk {name.stem}")


class TiffStream(io.RawIOBase):
    """An open file as tifffile should see it: read and seek, and no file descriptor.

    tifffile opens other files beside one it reads (multi-file OME, MicroManager and NDTiff
    series name them) only when its handle has a descriptor; through this it reads this
    file alone. Starts at the beginning of the file.
    """

    def __init__(self, file: BinaryIO) -> None:
        super().__init__()
        self._file = file
        file.seek(0)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(buffer)  # type: ignore[attr-defined, no-any-return]

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


def open_tiff(file: BinaryIO, label: str) -> tifffile.TiffFile:
    """A ``TiffFile`` reading the open ``file`` only, named after ``label``."""
    stream = cast(IO[bytes], TiffStream(file))
    return tifffile.TiffFile(stream, name=os.path.basename(label))


def file_version(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies one version of a file's content: device, inode, size, mtime, ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_etag(st: os.stat_result) -> str:
    """A strong ETag for a file's current version (device, inode, size, mtime, ctime).

    The ctime changes on every write and cannot be set back, so a file rewritten in place
    with its old size and mtime restored (``cp -p``) still gets a new ETag.
    """
    ident = f"{file_version(st)}".encode()
    return '"' + hashlib.blake2b(ident, digest_size=12).hexdigest() + '"'


def to_raw(
    array: np.ndarray[tuple[int, ...], np.dtype[np.generic]],
    axes: str,
    name: ChunkName,
    fmt: ScaleFormat,
    path: str,
) -> bytes:
    """Turn a decoded TIFF array into the raw encoding: channel, z, y, x (x fastest), ``<``.

    ``axes`` is tifffile's axes string for the array (``S`` or ``C`` marks channels).
    Raises :class:`ServerError`, naming ``path`` (the file's, for the operator), when the
    shape or dtype disagrees with the chunk's name or the scale's format.
    """
    if array.dtype.newbyteorder("<") != fmt.dtype.newbyteorder("<"):
        raise ServerError(f"{path}: data type {array.dtype} but info says {fmt.dtype}")
    z, y, x = name.shape
    c = fmt.num_channels
    if c > 1:
        channel_axes = [i for i, a in enumerate(axes) if a in "SC"]
        if len(axes) == array.ndim and channel_axes:
            array = np.moveaxis(array, channel_axes[-1], 0)
        if array.shape[0] != c:
            raise ServerError(f"{path}: shape {array.shape} has no axis of {c} channels")
    if array.size != c * z * y * x or array.shape[-2:] != (y, x):
        raise ServerError(
            f"{path}: shape {array.shape} does not match chunk {name.stem} "
            f"with {c} channel(s), which needs (z, y, x) = {(z, y, x)}"
        )
    little = array.astype(fmt.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(little).tobytes()


def decode_tiff(file: BinaryIO, name: ChunkName, fmt: ScaleFormat, path: str) -> bytes:
    """Read the open TIFF ``file`` (at ``path``) and return chunk ``name`` in the raw encoding.

    Any compression tifffile (with imagecodecs) can decode is accepted. The size the header
    declares is checked before anything is decoded, so a corrupt header claiming a huge image
    costs no memory. Raises :class:`ServerError`, naming the file, when it cannot be read or
    does not fit.
    """
    z, y, x = name.shape
    expected = z * y * x * fmt.num_channels
    try:
        with open_tiff(file, path) as tif:
            series = tif.series[0]
            if series.size != expected:
                raise ServerError(
                    f"{path}: holds {series.size} samples of shape {series.shape} but chunk "
                    f"{name.stem} with {fmt.num_channels} channel(s) needs {expected}"
                )
            # The byte counts of the strips or tiles are read whole: bound them by what a
            # chunk can need (a sparse file, or strips that all point at one region, would
            # otherwise cost gigabytes of memory for a chunk of kilobytes).
            stored = sum(sum(page.databytecounts) for page in series.pages if page is not None)
            allowed = MAX_STORED_RATIO * expected * fmt.dtype.itemsize + MAX_STORED_SLACK
            if stored > allowed:
                raise ServerError(
                    f"{path}: its strips or tiles claim {stored} bytes, too many for chunk "
                    f"{name.stem} (at most {allowed})"
                )
            array = series.asarray()
            axes = series.axes
    except ServerError:
        raise
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ServerError(f"{path}: cannot decode TIFF: {type(e).__name__}: {e}") from e
    return to_raw(array, axes, name, fmt, path)


def tagged(etag: str, coding: str | None) -> str:
    """The ETag of the ``coding`` representation of a body whose identity ETag is ``etag``."""
    return etag if coding is None else f"{etag[:-1]}-{coding}{etag[-1]}"


def read_layout(file: BinaryIO, path: str) -> RawLayout | None:
    """The byte range of the voxels of the open ``file`` (at ``path``), an uncompressed,
    contiguous, little-endian TIFF.

    None when the file needs real decoding (compressed, tiled, big-endian, bit-packed,
    planar samples...). Raises :class:`ServerError` naming the file when it cannot be parsed.
    """
    try:
        with open_tiff(file, path) as tif:
            series = tif.series[0]
            page = series.pages[0]
            offset = series.dataoffset
            if (
                offset is None
                or tif.byteorder != "<"
                or page is None
                or getattr(page, "compression", None) != 1
                or getattr(page, "predictor", 1) != 1
                or getattr(page, "bitspersample", 0) != series.dtype.itemsize * 8
            ):
                return None
            dtype = series.dtype.newbyteorder("<")
            return RawLayout(int(offset), int(series.size * dtype.itemsize), series.shape, dtype)
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ServerError(f"{path}: cannot parse TIFF: {type(e).__name__}: {e}") from e


class ChunkObserver(Protocol):
    """Told about chunk reads, for the metrics (``metrics.ServerMetrics`` is one)."""

    def chunk_decoded(self, seconds: float) -> None:
        """A chunk's file was read and decoded into raw bytes in ``seconds``."""

    def chunk_cache(self, hit: bool) -> None:
        """An answer was looked up in the response cache: found (True) or not."""


class ChunkSource:
    """Finds, decodes, compresses and caches the chunks of the datasets under one root.

    Uncompressed TIFFs whose voxels already lie in the file in the raw encoding's order are
    answered with one ``pread`` of that byte range (the TIFF header is parsed once per file
    version); the rest are decoded with tifffile. Encoded answers are kept in a bounded
    :class:`LruCache` keyed by the file's identity and mtime and the coding, so an edited
    file is never served stale.
    """

    def __init__(
        self,
        root: DataRoot,
        cache_bytes: int = 32 * 1024 * 1024,
        observer: ChunkObserver | None = None,
    ) -> None:
        self.root = root
        self.observer = observer
        self.infos = InfoCache()
        self.responses: LruCache[tuple[bytes, str | None]] = LruCache(
            cache_bytes, lambda entry: len(entry[0]) + 200
        )
        self.layouts: LruCache[tuple[RawLayout | None]] = LruCache(16384)

    def respond(
        self,
        dataset: list[str],
        key: str,
        name: ChunkName,
        coding: str | None = None,
        client_has: Callable[[str], bool] | None = None,
    ) -> ChunkResponse:
        """Chunk ``name`` of scale ``key`` of the dataset that the validated path segments
        ``dataset`` name, in ``coding`` when that makes it smaller.

        ``client_has`` is asked about the ETags of the file's current representations; when it
        holds one, the answer has no body. Raises :class:`NotFound` for a missing dataset,
        scale or chunk, :class:`Forbidden` for one the server may not read, and
        :class:`ServerError` for a file that does not fit ``info``.
        """
        fs = self.root.fs
        follow = fs.read_follow
        try:
            with fs.open_dir(dataset) as directory:
                where = os.path.join(fs.path, directory.relative)
                info = os.path.join(where, "info")
                fmt = scale_format(self.infos.read(directory, follow, info), key, info)
                with directory.subdir(key, follow=follow) as scale:
                    filename, opened = open_chunk_file(scale, name, follow)
        except PermissionError:
            # A directory or file on the way that the server may not read (chmod 000).
            raise Forbidden("the server may not read this chunk") from None
        with opened:
            path = os.path.join(where, key, filename)
            return self._respond(opened, path, name, fmt, coding, client_has)

    def _respond(
        self,
        opened: OpenedFile,
        path: str,
        name: ChunkName,
        fmt: ScaleFormat,
        coding: str | None,
        client_has: Callable[[str], bool] | None,
    ) -> ChunkResponse:
        """:meth:`respond` for the chunk's open file, found at ``path`` (for messages)."""
        st = opened.status
        etag = file_etag(st)
        if client_has is not None:
            for held in (tagged(etag, coding), etag):
                if client_has(held):
                    return ChunkResponse(None, None, held, st.st_mtime)
        # What the body depends on: the file's version, and what the name and info ask of it.
        version = (*file_version(st), name.stem, fmt.dtype.str, fmt.num_channels)
        cached = self.responses.get((*version, coding))
        if self.observer is not None:
            self.observer.chunk_cache(hit=cached is not None)
        if cached is None:
            raw = self.responses.get((*version, None)) if coding is not None else None
            raw_body = raw[0] if raw is not None else self._timed_raw(opened, path, name, fmt)
            if raw is None and coding is not None:
                self.responses.put((*version, None), (raw_body, None))
            cached = encode_body(raw_body, coding)
            self.responses.put((*version, coding), cached)
        body, used = cached
        return ChunkResponse(body, used, tagged(etag, used), st.st_mtime)

    def _timed_raw(self, opened: OpenedFile, path: str, name: ChunkName, fmt: ScaleFormat) -> bytes:
        """:meth:`_raw`, its duration told to the observer."""
        started = time.perf_counter()
        raw = self._raw(opened, path, name, fmt)
        if self.observer is not None:
            self.observer.chunk_decoded(time.perf_counter() - started)
        return raw

    def _raw(self, opened: OpenedFile, path: str, name: ChunkName, fmt: ScaleFormat) -> bytes:
        """The chunk's raw bytes: one read of a byte range when the file allows, else decoding."""
        version = file_version(opened.status)
        entry = self.layouts.get(version)
        if entry is None:
            entry = (read_layout(opened.file, path),)
            self.layouts.put(version, entry)
        layout = entry[0]
        z, y, x = name.shape
        if (
            layout is not None
            and fmt.num_channels == 1
            and layout.dtype == fmt.dtype.newbyteorder("<")
            and layout.nbytes == z * y * x * layout.dtype.itemsize
            and layout.shape[-2:] == (y, x)
        ):
            data = os.pread(opened.file.fileno(), layout.nbytes, layout.offset)
            if len(data) != layout.nbytes:
                raise ServerError(f"{path}: truncated: {len(data)} of {layout.nbytes} bytes")
            return data
        return decode_tiff(opened.file, name, fmt, path)
