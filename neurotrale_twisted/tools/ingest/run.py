"""One ingest: the dataset directory prepared, the planes decoded by reader threads and
streamed through the pyramid, the chunk strips written by a pool of writer processes, and a
progress bar on standard error."""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type hints

from neurotrale_twisted.core.chunks.names import ChunkName
from neurotrale_twisted.tools.atomic import is_temporary, write_json
from neurotrale_twisted.tools.ingest.chunkfiles import StripResult
from neurotrale_twisted.tools.ingest.layout import is_scale_key, level_sizes
from neurotrale_twisted.tools.ingest.pyramid import InlineExecutor, Pyramid
from neurotrale_twisted.tools.ingest.settings import SETTINGS_FILE, IngestSettings


@dataclass
class IngestReport:
    """What an ingest did."""

    dataset: Path
    info: dict[str, Any]
    written: int = 0
    skipped: int = 0
    nbytes: int = 0
    levels: int = 0


def _clear_scales(dataset: Path, force: bool) -> None:
    """Remove temporary files left by a killed run; with ``force``, old chunk files too."""
    for scale in dataset.iterdir():
        if not (scale.is_dir() and is_scale_key(scale.name)):
            continue
        for entry in scale.iterdir():
            stale = is_temporary(entry.name) or (force and ChunkName.parse(entry.name))
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
    write_json(dataset / SETTINGS_FILE, settings.record)
    write_json(dataset / "info", info)
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
