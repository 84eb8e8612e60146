"""Halving a (z, y, x) volume into the next scale: the block mean for images, the block mode
for labels.

A scale of an odd-sized axis ``n`` has ``ceil(n / 2)`` voxels: the last block along it holds
one voxel, which stands in for the missing one, so the mean (or mode) is taken over the voxels
the block holds, each weighed equally: an edge voxel of the coarser scale is the mean of the
voxels that exist beneath it, not pulled toward a padding value.
"""

from __future__ import annotations

import numpy as np

from neurotrale_twisted.tools.ingest.layout import Array


def _halves(n: int) -> tuple[slice, slice | Array]:
    """Indices of the first and second voxel of each pair along an axis of length ``n``.

    At an odd end the last block has one voxel; it stands in for both, so every statistic
    taken over the 8 corners weighs the voxels a block holds equally.
    """
    if n % 2 == 0:
        return slice(0, n, 2), slice(1, n, 2)
    return slice(0, n, 2), np.minimum(np.arange(1, n + 1, 2), n - 1)


def _corners(volume: Array) -> list[Array]:
    """The 8 corner voxels of every 2x2x2 block of a (z, y, x) array, as 8 arrays."""
    parts = [volume]
    for axis in range(3):
        first, second = _halves(volume.shape[axis])
        lead = (slice(None),) * axis
        parts = [p[(*lead, first)] for p in parts] + [p[(*lead, second)] for p in parts]
    return parts


def _block_sums(volume: Array, dtype: type[np.generic]) -> Array:
    """The sum of each 2x2x2 block of a (z, y, x) array in ``dtype``, one axis at a time."""
    total = volume
    for axis in range(3):
        first, second = _halves(total.shape[axis])
        lead = (slice(None),) * axis
        halved = total[(*lead, first)].astype(dtype)
        halved += total[(*lead, second)]
        total = halved
    return total


def downsample_mean(volume: Array) -> Array:
    """Halve a (z, y, x) volume: the mean of each 2x2x2 block, same dtype.

    Integers are rounded half up, exactly: sums are taken in a type wide enough for eight
    voxels, or, for 64-bit voxels, split as ``v = 8 * (v >> 3) + (v & 7)`` so the mean is
    ``sum(v >> 3) + (sum(v & 7) + 4) >> 3`` and neither sum overflows.
    """
    dtype = volume.dtype
    if dtype.kind == "f":
        mean: Array = (_block_sums(volume, np.float64) / 8).astype(dtype)
        return mean
    if dtype.itemsize <= 4:
        wide = np.int32 if dtype.itemsize <= 2 else np.int64
        total = _block_sums(volume, wide)
        total += 4
        total >>= 3
        rounded: Array = total.astype(dtype)
        return rounded
    quotient = _block_sums(volume >> 3, dtype.type)
    remainder = _block_sums((volume & 7).astype(np.uint8), np.uint8)
    remainder += 4
    remainder >>= 3
    quotient += remainder.astype(dtype)
    return quotient


def downsample_mode(volume: Array) -> Array:
    """Halve a (z, y, x) label volume: the most frequent label of each 2x2x2 block.

    Ties go to the smallest label.
    """
    corners = np.stack(_corners(volume))
    counts = np.zeros(corners.shape, np.uint8)
    for corner in corners:
        counts += corners == corner
    best = counts.max(axis=0)
    filler = np.iinfo(volume.dtype).max
    mode: Array = np.where(counts == best, corners, filler).min(axis=0).astype(volume.dtype)
    return mode
