"""What an ingest is to do: the command line's values checked, against the source and against
what the destination already holds, before anything is written."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neurotrale_twisted.tools.ingest.layout import (
    IMAGE_DTYPES,
    SEGMENTATION_DTYPES,
    default_levels,
    make_info,
)
from neurotrale_twisted.tools.ingest.source import BadInput, PlaneStack, find_sources, scan_stack

#: The file that records how a dataset was ingested, so ``--resume`` can refuse other settings.
#: A dot-file: the server never lists or serves it.
SETTINGS_FILE = ".neurotrale-ingest.json"


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
