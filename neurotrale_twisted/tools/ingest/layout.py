"""The precomputed-tif layout an ingest writes: how many scales, their sizes and directory
names (``1_1_1``, ``2_2_2``, ...), the ``info`` that describes them, the chunk files' names,
and the data types Neuroglancer can show."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from neurotrale_twisted.core.chunks.names import ChunkName

#: A (z, y, x) block of voxels: the order a TIFF stack decodes to.
Array = np.ndarray[Any, np.dtype[Any]]

#: Data types Neuroglancer's precomputed format can show.
IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")
SEGMENTATION_DTYPES = ("uint8", "uint16", "uint32", "uint64")
_SCALE_KEY = re.compile(r"^\d+_\d+_\d+$")


def default_levels(size: tuple[int, int, int], chunk: tuple[int, int, int]) -> int:
    """How many scales to make: halve while every dimension still spans one chunk (>= 1)."""
    levels = 1
    while all(-(-s // 2**levels) >= c for s, c in zip(size, chunk, strict=True)):
        levels += 1
    return levels


def level_sizes(size: tuple[int, int, int], levels: int) -> list[tuple[int, int, int]]:
    """The (x, y, z) size of each scale: each ``ceil(size / 2)`` of the one before."""
    sizes = [size]
    for _ in range(levels - 1):
        x, y, z = sizes[-1]
        sizes.append((-(-x // 2), -(-y // 2), -(-z // 2)))
    return sizes


def scale_key(level: int) -> str:
    """The directory name (``key``) of scale ``level``: ``1_1_1``, ``2_2_2``, ``4_4_4``, ..."""
    factor = 2**level
    return f"{factor}_{factor}_{factor}"


def _nanometres(micrometres: float, factor: int) -> float | int:
    value = round(micrometres * 1000 * factor, 6)
    return int(value) if value.is_integer() else value


def make_info(
    size: tuple[int, int, int],
    dtype: np.dtype[Any],
    levels: int,
    chunk: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    segmentation: bool = False,
) -> dict[str, Any]:
    """The ``info`` file precomputed-tif writes for this volume (resolution in nanometres)."""
    scales = [
        {
            "chunk_sizes": [list(chunk)],
            "encoding": "raw",
            "key": scale_key(level),
            "resolution": [_nanometres(v, 2**level) for v in voxel_size],
            "size": list(level_size),
            "voxel_offset": [0, 0, 0],
        }
        for level, level_size in enumerate(level_sizes(size, levels))
    ]
    return {
        "data_type": dtype.name,
        "mesh": "mesh",
        "num_channels": 1,
        "scales": scales,
        "type": "segmentation" if segmentation else "image",
    }


def is_scale_key(name: str) -> bool:
    """Whether ``name`` is a scale's directory name (``X_Y_Z``, as :func:`scale_key` makes)."""
    return _SCALE_KEY.match(name) is not None


def chunk_path(directory: Path, name: ChunkName) -> Path:
    """The file of chunk ``name`` in scale directory ``directory``: ``x0-x1_y0-y1_z0-z1.tiff``."""
    return directory / f"{name.stem}.tiff"
