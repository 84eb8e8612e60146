"""The source of an ingest: the TIFF files the command line names, checked to make one volume
of planes, and the planes decoded from them on demand."""

from __future__ import annotations

import concurrent.futures as cf
import glob
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from neurotrale_twisted.tools.ingest.layout import Array


class BadInput(Exception):
    """The command line or the source cannot make a dataset; nothing has been written."""


@dataclass(frozen=True)
class SourceFile:
    """One TIFF file of the source and how many planes (z) it contributes."""

    path: Path
    planes: int


@dataclass(frozen=True)
class PlaneStack:
    """The source volume: files whose planes, in order, make the z axis."""

    files: tuple[SourceFile, ...]
    plane_shape: tuple[int, int]
    dtype: np.dtype[Any]

    @property
    def size(self) -> tuple[int, int, int]:
        """The volume's (x, y, z) size in voxels."""
        y, x = self.plane_shape
        return (x, y, sum(f.planes for f in self.files))

    def segments(self, z0: int, z1: int) -> Iterator[tuple[SourceFile, int, int, int]]:
        """(file, first page, last page + 1, offset into ``z0..z1``) of each file in the range."""
        start = 0
        for source in self.files:
            end = start + source.planes
            lo, hi = max(z0, start), min(z1, end)
            if lo < hi:
                yield source, lo - start, hi - start, lo - z0
            start = end

    def read(self, z0: int, out: Array, readers: cf.Executor) -> None:
        """Decode planes ``z0 .. z0 + len(out)`` into ``out``, a file per task on ``readers``.

        Raises :class:`OSError` naming the file when one cannot be decoded.
        """
        tasks = [
            readers.submit(_read_pages, source.path, first, last, out[at : at + last - first])
            for source, first, last, at in self.segments(z0, z0 + len(out))
        ]
        for task in tasks:
            task.result()


def _read_pages(path: Path, first: int, last: int, out: Array) -> None:
    """Decode pages ``first .. last`` of the first series of ``path`` into ``out``."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if len(series.shape) == 2:
                data = series.asarray()
                out[0] = data
            else:
                data = tif.asarray(key=slice(first, last), series=0)
                out[...] = data.reshape(out.shape)
    except Exception as e:  # tifffile raises many types for corrupt files
        raise OSError(f"{path}: cannot decode: {type(e).__name__}: {e}") from e


def natural_key(path: Path) -> list[Any]:
    """Sort key that orders runs of digits by value: ``z2.tif`` before ``z10.tif``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_sources(patterns: Sequence[str]) -> list[Path]:
    """The files that glob ``patterns`` name (a directory stands for its TIFF files), sorted.

    Raises :class:`BadInput` when nothing matches.
    """
    found: set[Path] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            names = [
                p
                for ext in ("*.tif", "*.tiff", "*.TIF", "*.TIFF")
                for p in glob.glob(os.path.join(glob.escape(expanded), ext))
            ]
        else:
            names = glob.glob(expanded, recursive=True)
        found.update(Path(name) for name in names if os.path.isfile(name))
    if not found:
        raise BadInput(f"no files match {' '.join(patterns)}")
    return sorted(found, key=natural_key)


def _describe(path: Path) -> tuple[tuple[int, ...], str, np.dtype[Any], int]:
    """The first series' shape, axes, dtype and page count of ``path``; BadInput if unreadable."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), series.axes, np.dtype(series.dtype), len(series.pages)
    except Exception as e:  # tifffile raises many types for corrupt files
        raise BadInput(f"{path}: not a readable TIFF file: {type(e).__name__}: {e}") from e


def scan_stack(paths: Sequence[Path], jobs: int = 1) -> PlaneStack:
    """Read the headers of ``paths`` and check that their planes make one volume.

    Raises :class:`BadInput` for an unreadable file, a file that is not single-channel
    planes, or planes whose shapes or data types differ.
    """
    with cf.ThreadPoolExecutor(max(1, jobs)) as pool:
        headers = list(pool.map(_describe, paths))
    files = []
    first: tuple[Path, tuple[int, int], np.dtype[Any]] | None = None
    for path, (shape, axes, dtype, pages) in zip(paths, headers, strict=True):
        if "S" in axes or len(shape) not in (2, 3):
            raise BadInput(
                f"{path}: shape {shape} (axes {axes}) is not a single-channel plane (y, x) "
                "or stack of planes (z, y, x)"
            )
        planes = 1 if len(shape) == 2 else shape[0]
        if planes != 1 and pages != planes:
            raise BadInput(f"{path}: its {planes} planes are not stored one per TIFF page")
        plane = (int(shape[-2]), int(shape[-1]))
        dtype = dtype.newbyteorder("=")
        if first is None:
            first = (path, plane, dtype)
        elif plane != first[1] or dtype != first[2]:
            raise BadInput(
                f"planes differ: {first[0]} is {first[1][1]}x{first[1][0]} {first[2]}, "
                f"but {path} is {plane[1]}x{plane[0]} {dtype}"
            )
        files.append(SourceFile(path, planes))
    assert first is not None
    return PlaneStack(tuple(files), first[1], first[2])
