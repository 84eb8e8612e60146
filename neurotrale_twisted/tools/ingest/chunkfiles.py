"""The chunk files of a scale: written atomically a strip (a row of chunks along x) at a time,
and, for ``--resume``, checked to be complete."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.tools.atomic import atomic_file
from neurotrale_twisted.tools.ingest.layout import Array, chunk_path

#: The TIFF compressions of chunk files the command line offers.
COMPRESSIONS = ("none", "zlib", "zstd")


def chunk_is_complete(path: Path, shape: tuple[int, int, int], dtype: np.dtype[Any]) -> bool:
    """Whether ``path`` is a TIFF that decodes to a (z, y, x) array of ``shape`` and ``dtype``.

    A torn or truncated file fails to decode or decodes to fewer planes: not complete.
    """
    try:
        data = tifffile.imread(path)
    except Exception:  # tifffile raises many types for corrupt files
        return False
    # tifffile drops axes of length 1, so compare the shapes without them.
    squeezed = tuple(n for n in shape if n != 1)
    return squeezed == data.squeeze().shape and data.dtype.newbyteorder("=") == dtype


def write_chunk_file(path: Path, chunk: Array, compression: str) -> None:
    """Write ``chunk`` (z, y, x) as a TIFF at ``path`` atomically (``compression``: a TIFF
    compression tifffile knows, or ``"none"``).

    Readers (the server, a later ``--resume``) see the complete file or none. Not fsynced:
    a flush per chunk file would slow an ingest of many thousands of them, and ``--resume``
    decodes every chunk file it keeps, so one a crash of the machine left short is rewritten.
    """
    with atomic_file(path, durable=False) as file:
        tifffile.imwrite(
            file,
            chunk,
            photometric="minisblack",
            compression=None if compression == "none" else compression,
            maxworkers=1,  # the parallelism is --jobs processes
        )


@dataclass(frozen=True)
class StripTask:
    """A row of chunks along x, all starting at ``y0`` and ``z0`` in one scale directory."""

    directory: Path
    strip: Array
    y0: int
    z0: int
    chunk_x: int
    compression: str
    resume: bool


@dataclass(frozen=True)
class StripResult:
    """What writing a strip did: chunk files written and skipped, and the voxel bytes covered."""

    written: int
    skipped: int
    nbytes: int


def write_strip(task: StripTask) -> StripResult:
    """Write the chunk files of one strip (run in a worker process).

    With ``resume``, a chunk whose file is already complete is left as it is.
    """
    z, y, x = task.strip.shape
    written = skipped = 0
    for x0 in range(0, x, task.chunk_x):
        x1 = min(x0 + task.chunk_x, x)
        name = ChunkName(x0, x1, task.y0, task.y0 + y, task.z0, task.z0 + z)
        path = chunk_path(task.directory, name)
        if task.resume and chunk_is_complete(path, name.shape, task.strip.dtype):
            skipped += 1
            continue
        write_chunk_file(path, task.strip[:, :, x0:x1], task.compression)
        written += 1
    return StripResult(written, skipped, task.strip.nbytes)
