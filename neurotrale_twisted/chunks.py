"""Chunk names, ``info`` files, and TIFF decoding into the precomputed "raw" encoding.

A chunk ``x0-x1_y0-y1_z0-z1`` of scale ``key`` lives in ``{dataset}/{key}/x0-x1_y0-y1_z0-z1.tiff``
(``.tif`` too). Clients want its voxels as little-endian bytes, x fastest, then y, z and
channel; the body must be exactly ``(x1-x0)*(y1-y0)*(z1-z0)*num_channels*itemsize`` bytes, so
a TIFF that disagrees with its name or with ``info`` is a :class:`ServerError` naming the file.
Pure Python: no Twisted here; the web layer runs these functions on a thread pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from .errors import NotFound, ServerError
from .paths import DataRoot

CHUNK_PATTERN = r"\d+-\d+_\d+-\d+_\d+-\d+(?:\.tiff?)?"
_CHUNK_NAME = re.compile(r"^(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)(?:\.tiff?)?$")
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
        match = _CHUNK_NAME.match(name)
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
class DecodedChunk:
    """A chunk ready to send: its raw bytes (None when the client's ETag matched)."""

    raw: bytes | None
    etag: str
    modified: float
    path: Path


class InfoCache:
    """Parsed ``info`` files, re-read whenever the file's mtime or size changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Path, tuple[tuple[int, int], dict[str, object]]] = {}

    def read(self, dataset: Path) -> dict[str, object]:
        """The dataset's ``info`` as a dict; :class:`NotFound` when there is none.

        Raises :class:`ServerError` when it is not valid JSON.
        """
        path = dataset / "info"
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no dataset with an info file at {dataset.name!r}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            entry = self._entries.get(path)
        if entry is not None and entry[0] == stamp:
            return entry[1]
        try:
            info = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise ServerError(f"cannot read {path}: {e}") from e
        if not isinstance(info, dict):
            raise ServerError(f"{path} is not a JSON object")
        with self._lock:
            self._entries[path] = (stamp, info)
        return info


def scale_format(info: dict[str, object], key: str, dataset: Path) -> ScaleFormat:
    """The format of scale ``key``; :class:`NotFound` if ``info`` has no such scale."""
    scales = info.get("scales")
    if not isinstance(scales, list) or not any(
        isinstance(s, dict) and s.get("key") == key for s in scales
    ):
        raise NotFound(f"dataset has no scale {key!r}")
    try:
        dtype = np.dtype(str(info["data_type"]))
        channels = int(info.get("num_channels", 1))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as e:
        raise ServerError(f"{dataset / 'info'}: bad data_type or num_channels: {e}") from e
    return ScaleFormat(key, dtype, channels)


def find_chunk_file(root: DataRoot, scale_dir: Path, name: ChunkName) -> Path:
    """The TIFF file holding chunk ``name``; :class:`NotFound` when there is none."""
    for ext in CHUNK_EXTENSIONS:
        path = scale_dir / (name.stem + ext)
        if path.is_file():
            root.check_readable(path)
            return path
    raise NotFound(f"no chunk {name.stem}")


def file_etag(st: os.stat_result) -> str:
    """A strong ETag for a file's current version (device, inode, size, mtime)."""
    ident = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode()
    return '"' + hashlib.blake2b(ident, digest_size=12).hexdigest() + '"'


def to_raw(
    array: np.ndarray[tuple[int, ...], np.dtype[np.generic]],
    axes: str,
    name: ChunkName,
    fmt: ScaleFormat,
    path: Path,
) -> bytes:
    """Turn a decoded TIFF array into the raw encoding: channel, z, y, x (x fastest), ``<``.

    ``axes`` is tifffile's axes string for the array (``S`` or ``C`` marks channels).
    Raises :class:`ServerError`, naming ``path``, when the shape or dtype disagrees with the
    chunk's name or the scale's format.
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


def decode_tiff(path: Path, name: ChunkName, fmt: ScaleFormat) -> bytes:
    """Read the TIFF at ``path`` and return chunk ``name`` in the raw encoding.

    Any compression tifffile (with imagecodecs) can decode is accepted. Raises
    :class:`ServerError`, naming the file, when it cannot be read or does not fit.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array = series.asarray()
            axes = series.axes
    except Exception as e:  # tifffile raises many types for corrupt files
        raise ServerError(f"{path}: cannot decode TIFF: {type(e).__name__}: {e}") from e
    return to_raw(array, axes, name, fmt, path)


class ChunkSource:
    """Finds, stats and decodes chunks of the datasets under one data root."""

    def __init__(self, root: DataRoot) -> None:
        self.root = root
        self.infos = InfoCache()

    def load(
        self,
        dataset: Path,
        key: str,
        name: ChunkName,
        client_has: Callable[[str], bool] | None = None,
    ) -> DecodedChunk:
        """Decode chunk ``name`` of scale ``key``; skip the decoding when the client has it.

        ``client_has`` is called with the file's current ETag (see :func:`file_etag`); when it
        answers True the result's ``raw`` is None (the web layer answers 304). Raises
        :class:`NotFound` for a missing dataset, scale or chunk, and :class:`ServerError`
        for a bad file.
        """
        fmt = scale_format(self.infos.read(dataset), key, dataset)
        path = find_chunk_file(self.root, dataset / key, name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFound(f"no chunk {name.stem}") from None
        etag = file_etag(st)
        if client_has is not None and client_has(etag):
            return DecodedChunk(None, etag, st.st_mtime, path)
        return DecodedChunk(decode_tiff(path, name, fmt), etag, st.st_mtime, path)
