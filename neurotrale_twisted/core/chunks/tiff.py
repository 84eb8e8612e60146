"""TIFF files as chunks: decoding into the precomputed "raw" encoding (little-endian, x
fastest, then y, z and channel), and finding where an uncompressed file keeps its voxels, so
that it is answered with one read of a byte range. A TIFF that disagrees with its chunk's
name or with ``info`` is a :class:`ServerError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import IO

import numpy as np
import tifffile

from neurotrale_twisted.core.chunks.info import ScaleFormat
from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.core.errors import ServerError

#: The most bytes of image data a chunk's TIFF may store, as a multiple of its raw size plus
#: a slack: no codec expands data that much (LZW, the worst, by half).
MAX_STORED_RATIO = 4
MAX_STORED_SLACK = 1024 * 1024


@dataclass(frozen=True)
class RawLayout:
    """Where an uncompressed, contiguous, little-endian TIFF keeps its voxels in the file."""

    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype[np.generic]


def open_tiff(stream: IO[bytes], label: str) -> tifffile.TiffFile:
    """A ``TiffFile`` reading ``stream`` (from its start) only, named after ``label``."""
    stream.seek(0)
    return tifffile.TiffFile(stream, name=os.path.basename(label))


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


def decode_tiff(file: IO[bytes], name: ChunkName, fmt: ScaleFormat, path: str) -> bytes:
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


def read_layout(file: IO[bytes], path: str) -> RawLayout | None:
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
