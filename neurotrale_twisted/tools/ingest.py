"""Turn a stack of TIFF planes into a dataset in the precomputed-tif layout the server reads.

``neurotrale-ingest --source 'planes/*.tif' --dest /data/brain1`` (or
``python -m neurotrale_twisted.tools.ingest ...``) reads the planes in natural sorted order
(``z2.tif`` before ``z10.tif``; 2-D planes, or 3-D stacks whose pages are planes), and writes
``/data/brain1/info`` and one directory of ``x0-x1_y0-y1_z0-z1.tiff`` chunks per scale
(``1_1_1``, ``2_2_2``, ``4_4_4``, ...), each scale half the size of the one before: the mean
of each 2x2x2 block for images (rounded half up), the most frequent label for segmentations
(ties go to the smallest label). At an odd edge a block holds fewer voxels; the mean and the
mode are taken over those it holds.

Memory: the volume is streamed, never held. Each scale keeps one chunk row in z
(``chunk_z`` planes of that scale) and at most one plane waiting for its pair, so the buffers
hold about ``4/3 * chunk_z`` planes of the first scale (``chunk_z * Y * X * itemsize * 4/3``
bytes); on top of that, each of ``--jobs`` writer processes has at most two strips of chunks
(``chunk_z * chunk_y * X`` voxels each) in flight. A 10000 x 10000 uint16 stack with the
default 64-voxel chunks needs about 17 GB of buffers, whatever its depth; a 1024 x 1024 one
about 180 MB.

Every chunk file is written to a temporary dot-file beside it and renamed into place, so a
chunk file is either complete or absent; ``--resume`` re-reads the planes (the coarser scales
are computed from them) and writes only the chunks that are missing or unreadable.

Exit status: 0 done, 1 failed while writing, 2 bad input (nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import math
import multiprocessing
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import tifffile
from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type hints

from neurotrale_twisted import project_version
from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.core.cpus import usable_cpus
from neurotrale_twisted.tools.arguments import ArgumentParser

Array = np.ndarray[Any, np.dtype[Any]]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

#: The file that records how a dataset was ingested, so ``--resume`` can refuse other settings.
#: A dot-file: the server never lists or serves it.
SETTINGS_FILE = ".neurotrale-ingest.json"
COMPRESSIONS = ("none", "zlib", "zstd")
#: Data types Neuroglancer's precomputed format can show.
IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32")
SEGMENTATION_DTYPES = ("uint8", "uint16", "uint32", "uint64")
_TEMPORARY = re.compile(r"^\..+\.tiff\.\d+\.tmp$")
_SCALE_KEY = re.compile(r"^\d+_\d+_\d+$")
#: Planes of one scale downsampled at a time (even): bounds the downsampling's temporaries.
_DOWNSAMPLE_BATCH = 8

P = ParamSpec("P")
T = TypeVar("T")


class BadInput(Exception):
    """The command line or the source cannot make a dataset; nothing has been written."""


# -- The source ------------------------------------------------------------------------------


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


# -- The layout ------------------------------------------------------------------------------


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


# -- Downsampling ----------------------------------------------------------------------------


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


# -- Chunk files -----------------------------------------------------------------------------


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
    """Write ``chunk`` (z, y, x) as a TIFF at ``path`` atomically.

    The file is written as a dot-file beside ``path`` and renamed over it, so readers (the
    server, a later ``--resume``) see the complete file or none.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tifffile.imwrite(
            temporary,
            chunk,
            photometric="minisblack",
            compression=None if compression == "none" else compression,
            maxworkers=1,  # the parallelism is --jobs processes
        )
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


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
        path = task.directory / f"{name.stem}.tiff"
        if task.resume and chunk_is_complete(path, name.shape, task.strip.dtype):
            skipped += 1
            continue
        write_chunk_file(path, task.strip[:, :, x0:x1], task.compression)
        written += 1
    return StripResult(written, skipped, task.strip.nbytes)


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


# -- The pyramid -----------------------------------------------------------------------------


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
class IngestReport:
    """What an ingest did."""

    dataset: Path
    info: dict[str, Any]
    written: int = 0
    skipped: int = 0
    nbytes: int = 0
    levels: int = 0


@dataclass
class Pyramid:
    """Streams planes through every scale: writes each chunk row as it fills, and halves it
    into the next scale.

    Chunk strips go to ``writers``; at most two per writer are in flight, which bounds the
    memory the pool holds.
    """

    dataset: Path
    sizes: list[tuple[int, int, int]]
    chunk: tuple[int, int, int]
    dtype: np.dtype[Any]
    segmentation: bool
    compression: str
    resume: bool
    writers: cf.Executor
    jobs: int
    on_strip: Callable[[StripResult], None]
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


# -- The command -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IngestSettings:
    """Everything an ingest needs, checked: see :func:`prepare`."""

    stack: PlaneStack
    dataset: Path
    levels: int
    chunk: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    compression: str
    segmentation: bool
    jobs: int
    resume: bool
    force: bool

    @property
    def info(self) -> dict[str, Any]:
        """The dataset's ``info``."""
        return make_info(
            self.stack.size,
            self.stack.dtype,
            self.levels,
            self.chunk,
            self.voxel_size,
            self.segmentation,
        )

    @property
    def record(self) -> dict[str, Any]:
        """What :data:`SETTINGS_FILE` holds: what ``--resume`` must find unchanged."""
        return {
            "compression": self.compression,
            "planes": self.stack.size[2],
            "source_files": len(self.stack.files),
        }


def _triple(text: str, kind: type[int] | type[float], what: str) -> tuple[Any, Any, Any]:
    parts = text.split(",")
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(v > 0 and math.isfinite(v) for v in values):
        raise BadInput(f"--{what} must be three positive numbers X,Y,Z, not {text!r}")
    return values


def _check_destination(settings: IngestSettings) -> None:
    dataset = settings.dataset
    if dataset.exists() and not dataset.is_dir():
        raise BadInput(f"{dataset} exists and is not a directory")
    if not dataset.is_dir() or not any(dataset.iterdir()) or settings.force:
        return
    if not settings.resume:
        raise BadInput(
            f"{dataset} is not empty: use --resume to finish an interrupted ingest there, "
            "or --force to write over it"
        )
    info_path, record_path = dataset / "info", dataset / SETTINGS_FILE
    try:
        info = json.loads(info_path.read_text())
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        raise BadInput(
            f"{dataset} holds no interrupted ingest to resume (no readable info and "
            f"{SETTINGS_FILE}); use --force to write over it"
        ) from None
    changed = [
        k for k in sorted({*info, *settings.info}) if info.get(k) != settings.info.get(k)
    ] + [k for k in sorted(settings.record) if record.get(k) != settings.record[k]]
    if changed:
        raise BadInput(
            f"{dataset} was ingested with other settings or source ({', '.join(changed)} "
            "differ); resume with the same options, or use --force to write over it"
        )


def prepare(args: argparse.Namespace) -> IngestSettings:
    """Check the command line and the source; raise :class:`BadInput` before writing anything."""
    chunk = _triple(args.chunk_size, int, "chunk-size")
    voxel_size = _triple(args.voxel_size, float, "voxel-size")
    if args.levels is not None and args.levels < 1:
        raise BadInput(f"--levels must be at least 1, not {args.levels}")
    if args.jobs < 1:
        raise BadInput(f"--jobs must be at least 1, not {args.jobs}")
    stack = scan_stack(find_sources(args.source), args.jobs)
    allowed = SEGMENTATION_DTYPES if args.segmentation else IMAGE_DTYPES
    if stack.dtype.name not in allowed:
        kind = "a segmentation" if args.segmentation else "an image"
        raise BadInput(f"planes of {stack.dtype} cannot make {kind}: use {', '.join(allowed)}")
    levels = args.levels or default_levels(stack.size, chunk)
    settings = IngestSettings(
        stack=stack,
        dataset=Path(args.dest),
        levels=levels,
        chunk=chunk,
        voxel_size=voxel_size,
        compression=args.compression,
        segmentation=args.segmentation,
        jobs=args.jobs,
        resume=args.resume,
        force=args.force,
    )
    _check_destination(settings)
    return settings


def _write_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def _clear_scales(dataset: Path, force: bool) -> None:
    """Remove temporary files left by a killed run; with ``force``, old chunk files too."""
    for scale in dataset.iterdir():
        if not (scale.is_dir() and _SCALE_KEY.match(scale.name)):
            continue
        for entry in scale.iterdir():
            stale = _TEMPORARY.match(entry.name) or (force and ChunkName.parse(entry.name))
            if stale and entry.is_file():
                entry.unlink()


def _writer_pool(jobs: int) -> cf.Executor:
    if jobs == 1:
        return InlineExecutor()
    # forkserver, not fork: this process already runs reader threads when workers start.
    context = multiprocessing.get_context("forkserver")
    return cf.ProcessPoolExecutor(jobs, mp_context=context, initializer=_ignore_interrupts)


def _ignore_interrupts() -> None:
    """Leave Ctrl-C to the parent, which stops the pool and tells the user how to resume."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ingest(
    settings: IngestSettings, on_strip: Callable[[StripResult], None] | None = None
) -> IngestReport:
    """Write the dataset ``settings`` describes; ``on_strip`` hears of each strip written.

    Raises :class:`OSError` when a plane cannot be decoded or a file cannot be written.
    """
    dataset = settings.dataset
    info = settings.info
    dataset.mkdir(parents=True, exist_ok=True)
    _clear_scales(dataset, settings.force)
    _write_json(dataset / SETTINGS_FILE, settings.record)
    _write_json(dataset / "info", info)
    report = IngestReport(dataset, info, levels=settings.levels)
    sizes = level_sizes(settings.stack.size, settings.levels)
    itemsize = settings.stack.dtype.itemsize
    total = sum(math.prod(size) for size in sizes) * itemsize
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=dataset.name,
        file=sys.stderr,
        disable=None,
        dynamic_ncols=True,
    )

    def strip_done(result: StripResult) -> None:
        report.written += result.written
        report.skipped += result.skipped
        report.nbytes += result.nbytes
        bar.update(result.nbytes)
        if on_strip is not None:
            on_strip(result)

    writers = _writer_pool(settings.jobs)
    readers = cf.ThreadPoolExecutor(settings.jobs, thread_name_prefix="ingest-read")
    try:
        pyramid = Pyramid(
            dataset=dataset,
            sizes=sizes,
            chunk=settings.chunk,
            dtype=settings.stack.dtype,
            segmentation=settings.segmentation,
            compression=settings.compression,
            resume=settings.resume,
            writers=writers,
            jobs=settings.jobs,
            on_strip=strip_done,
        )
        depth = settings.stack.size[2]
        z = 0
        while z < depth:
            target = pyramid.first_row[: depth - z]
            settings.stack.read(z, target, readers)
            z += len(target)
            pyramid.planes_read(len(target))
        pyramid.finish()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return report


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``neurotrale-ingest``."""
    parser = ArgumentParser(
        prog="neurotrale-ingest",
        description="Turn a stack of TIFF planes into a precomputed-tif dataset for "
        "`twistd neurotrale`.",
        epilog="Example: neurotrale-ingest --source 'planes/*.tif' --dest /data/brain1, then "
        "twistd -n neurotrale --path /data and open precomputed://http://HOST:9000/brain1",
    )
    parser.add_argument(
        "--source",
        required=True,
        nargs="+",
        metavar="GLOB",
        help="the planes: glob patterns (quote them), files or directories; read in natural "
        "sorted order. 2-D planes, or 3-D stacks (z, y, x) of planes",
    )
    parser.add_argument(
        "--dest", required=True, metavar="DIR", help="the dataset directory to write"
    )
    parser.add_argument(
        "--levels",
        type=int,
        metavar="N",
        help="number of scales (default: halve while every dimension spans a chunk)",
    )
    parser.add_argument(
        "--chunk-size", default="64,64,64", metavar="X,Y,Z", help="chunk size (default 64,64,64)"
    )
    parser.add_argument(
        "--voxel-size",
        default="1.8,1.8,2.0",
        metavar="X,Y,Z",
        help="voxel size in micrometres (default 1.8,1.8,2.0)",
    )
    parser.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default="none",
        help="TIFF compression of the chunk files (default none)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        default=usable_cpus(),
        help="processes writing chunks (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--segmentation",
        action="store_true",
        help="the planes hold labels: downsample by the most frequent label, not the mean",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted ingest: write only missing or incomplete chunks",
    )
    again.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --dest, replacing its info and chunk files",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``neurotrale-ingest``; return the exit status (2 for bad input, nothing written)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed why (or the help)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        settings = prepare(args)
    except BadInput as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        report = ingest(settings)
    except KeyboardInterrupt:
        print(
            f"{parser.prog}: interrupted; run the same command with --resume to finish",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (OSError, BrokenProcessPool) as e:
        print(
            f"{parser.prog}: error: {e}\n(fix it, then run the same command with --resume)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    x, y, z = settings.stack.size
    print(
        f"wrote {report.dataset}: {x}x{y}x{z} {settings.stack.dtype} in {report.levels} "
        f"scales, {report.written} chunk files written, {report.skipped} kept"
    )
    print(f"serve it with: twistd -n neurotrale --path {report.dataset.resolve().parent}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
