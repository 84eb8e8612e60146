"""The pyramid writer: planes streamed through every scale, each scale's chunk rows written as
they fill and halved into the next; and :func:`write_volume`, the same for a volume held in
memory (``neurotrale-demo``)."""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from neurotrale_twisted.tools.atomic import write_json
from neurotrale_twisted.tools.ingest.chunkfiles import StripResult, StripTask, write_strip
from neurotrale_twisted.tools.ingest.downsample import downsample_mean, downsample_mode
from neurotrale_twisted.tools.ingest.layout import Array, level_sizes, make_info, scale_key

#: Planes of one scale downsampled at a time (even): bounds the downsampling's temporaries.
_DOWNSAMPLE_BATCH = 8

P = ParamSpec("P")
T = TypeVar("T")


class InlineExecutor(cf.Executor):
    """Runs each task at once in the calling process: ``--jobs 1``, no pickling, no copies."""

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        """Run ``fn`` now; the returned future holds its result or its exception."""
        future: cf.Future[T] = cf.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:
            future.set_exception(e)
        return future


def _ignore_strip(result: StripResult) -> None:
    """Hear of a strip written, and do nothing: the default of :attr:`Pyramid.on_strip`."""


@dataclass
class _Level:
    """One scale being built: its current chunk row in z, and a plane waiting for its pair."""

    index: int
    directory: Path
    size: tuple[int, int, int]
    row: Array
    filled: int = 0
    row_z0: int = 0
    carry: Array | None = None
    received: int = 0


@dataclass
class Pyramid:
    """Streams planes through every scale: writes each chunk row as it fills, and halves it
    into the next scale.

    Chunk strips go to ``writers`` (by default, written at once in this process); at most two
    per writer (``jobs``) are in flight, which bounds the memory the pool holds.
    """

    dataset: Path
    sizes: list[tuple[int, int, int]]
    chunk: tuple[int, int, int]
    dtype: np.dtype[Any]
    compression: str
    segmentation: bool = False
    resume: bool = False
    writers: cf.Executor = field(default_factory=InlineExecutor)
    jobs: int = 1
    on_strip: Callable[[StripResult], None] = _ignore_strip
    levels: list[_Level] = field(default_factory=list)
    pending: deque[cf.Future[StripResult]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        cz = self.chunk[2]
        for index, (x, y, z) in enumerate(self.sizes):
            row = np.empty((min(cz, z), y, x), self.dtype)
            directory = self.dataset / scale_key(index)
            self.levels.append(_Level(index, directory, (x, y, z), row))

    @property
    def first_row(self) -> Array:
        """The unfilled part of the first scale's row, for the reader to decode planes into."""
        level = self.levels[0]
        return level.row[level.filled :]

    def planes_read(self, count: int) -> None:
        """Note that ``count`` more planes were decoded into :attr:`first_row`."""
        level = self.levels[0]
        level.filled += count
        level.received += count
        if level.filled == len(level.row):
            self._flush(level, final=False)

    def add_planes(self, planes: Array) -> None:
        """Append planes held in memory to the first scale (copied, so ``planes`` may change)."""
        self.push(self.levels[0], planes)

    def push(self, level: _Level, planes: Array) -> None:
        """Append planes to a scale's row, writing and halving it each time it fills."""
        level.received += len(planes)
        done = 0
        while done < len(planes):
            take = min(len(level.row) - level.filled, len(planes) - done)
            level.row[level.filled : level.filled + take] = planes[done : done + take]
            level.filled += take
            done += take
            if level.filled == len(level.row):
                self._flush(level, final=False)

    def finish(self) -> None:
        """Flush every scale's last, partial row, then wait for every chunk to be written."""
        self._flush(self.levels[0], final=True)
        self.drain(0)
        for level in self.levels:
            if level.received != level.size[2]:
                raise AssertionError(
                    f"scale {level.index} got {level.received} planes, not {level.size[2]}"
                )

    def drain(self, keep: int) -> None:
        """Wait until at most ``keep`` strips are in flight, reporting each finished one."""
        while len(self.pending) > keep:
            done, _ = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                self.pending.remove(future)
                self.on_strip(future.result())

    def _flush(self, level: _Level, final: bool) -> None:
        count = level.filled
        if count:
            self._write_row(level, level.row[:count])
        below = self.levels[level.index + 1] if level.index + 1 < len(self.levels) else None
        if below is not None:
            self._halve(level, below, level.row[:count], final)
        level.row_z0 += count
        level.filled = 0
        if final and below is not None:
            self._flush(below, final=True)

    def _write_row(self, level: _Level, row: Array) -> None:
        level.directory.mkdir(parents=True, exist_ok=True)
        cx, cy, _ = self.chunk
        inline = isinstance(self.writers, InlineExecutor)
        for y0 in range(0, row.shape[1], cy):
            strip = row[:, y0 : y0 + cy]
            # A pool pickles its arguments later, on another thread: give it its own copy,
            # since the row is refilled as soon as this returns.
            task = StripTask(
                level.directory,
                strip if inline else strip.copy(),
                y0,
                level.row_z0,
                cx,
                self.compression,
                self.resume,
            )
            self.pending.append(self.writers.submit(write_strip, task))
            self.drain(2 * self.jobs)

    def _halve(self, level: _Level, below: _Level, planes: Array, final: bool) -> None:
        downsample = downsample_mode if self.segmentation else downsample_mean
        start = 0
        if level.carry is not None and len(planes):
            pair = np.stack([level.carry, planes[0]])
            level.carry = None
            self.push(below, downsample(pair))
            start = 1
        end = len(planes)
        if not final and (end - start) % 2:
            level.carry = planes[end - 1].copy()
            end -= 1
        for at in range(start, end, _DOWNSAMPLE_BATCH):
            self.push(below, downsample(planes[at : min(at + _DOWNSAMPLE_BATCH, end)]))
        if final and level.carry is not None:
            self.push(below, downsample(level.carry[np.newaxis]))
            level.carry = None


def write_volume(
    dataset: Path,
    volume: Array,
    levels: int,
    chunk: tuple[int, int, int],
    voxel_size: tuple[float, float, float],
    compression: str = "none",
) -> dict[str, Any]:
    """Write an image volume held in memory, (z, y, x), as a dataset in ``dataset``: its
    ``info`` and the chunk files of ``levels`` scales, as an ingest of it would; in this
    process. Returns the ``info``."""
    z, y, x = volume.shape
    size = (x, y, z)
    info = make_info(size, volume.dtype, levels, chunk, voxel_size)
    dataset.mkdir(parents=True, exist_ok=True)
    write_json(dataset / "info", info)
    pyramid = Pyramid(dataset, level_sizes(size, levels), chunk, volume.dtype, compression)
    pyramid.add_planes(volume)
    pyramid.finish()
    return info
