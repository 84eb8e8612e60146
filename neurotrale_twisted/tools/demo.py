"""Write a small microscopy-like dataset in the precomputed-tif layout, to serve and explore.

``neurotrale-demo DIR`` (or ``python -m neurotrale_twisted.tools.demo DIR``) writes
``DIR/demo-brain``: an ``info`` with three scales, ``x0-x1_y0-y1_z0-z1.tiff`` chunks with
truncated edge chunks, and an ``annotations/`` folder with ``block_info.csv``, ``fibers.json``,
``centroids.json`` and a few ``z-NNNN.json`` slices in the NeuroTrALE record format."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from neurotrale_twisted import project_version
from neurotrale_twisted.tools.arguments import EXIT_USAGE, ArgumentParser
from neurotrale_twisted.tools.atomic import atomic_file
from neurotrale_twisted.tools.ingest.chunkfiles import COMPRESSIONS
from neurotrale_twisted.tools.ingest.pyramid import write_volume

#: Writes one annotation file's records (the demo's own writer, or the server's store).
AnnotationWriter = Callable[[Path, list[dict[str, object]]], None]

#: Exit status when the directory cannot be written (a refused command line: EXIT_USAGE).
EXIT_FAILED = 1

#: The demo volume's size in voxels (x, y, z): deliberately not a multiple of the chunk size.
DEMO_SIZE = (200, 176, 72)
CHUNK = (64, 64, 32)
#: Voxel size in micrometres (``info`` gives it in nanometres: 1800, 1800, 2000).
VOXEL_SIZE = (1.8, 1.8, 2.0)
LEVELS = 3
BLOCK = (100, 88, 36)


def microscopy_volume(size: tuple[int, int, int], seed: int = 7) -> np.ndarray:
    """A (z, y, x) uint16 volume of blurred cell bodies and fibres over camera noise."""
    rng = np.random.default_rng(seed)
    x, y, z = size
    volume = rng.normal(400, 40, (z, y, x)).astype(np.float32)
    zz, yy, xx = np.mgrid[0:z, 0:y, 0:x].astype(np.float32)
    for _ in range(40):
        cz, cy, cx = rng.uniform(0, z), rng.uniform(0, y), rng.uniform(0, x)
        sigma, amplitude = rng.uniform(2, 5), rng.uniform(1500, 6000)
        r = 3 * sigma
        sl = (
            slice(max(0, int(cz - r)), int(cz + r) + 1),
            slice(max(0, int(cy - r)), int(cy + r) + 1),
            slice(max(0, int(cx - r)), int(cx + r) + 1),
        )
        d2 = (zz[sl] - cz) ** 2 + (yy[sl] - cy) ** 2 + (xx[sl] - cx) ** 2
        volume[sl] += amplitude * np.exp(-d2 / (2 * sigma**2))
    for _ in range(6):
        start = rng.uniform((0, 0, 0), (z, y, x))
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        for t in np.linspace(0, max(size), 4 * max(size)):
            pz, py, px = (start + t * direction).astype(int)
            if 0 <= pz < z and 0 <= py < y and 0 <= px < x:
                volume[pz, max(0, py - 1) : py + 2, max(0, px - 1) : px + 2] += 2500
    clipped: np.ndarray = np.clip(volume, 0, 65535).astype(np.uint16)
    return clipped


def record_id(*parts: object) -> str:
    """A 40-hex-digit id like the viewer's."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()


def write_annotations(
    directory: Path,
    size: tuple[int, int, int],
    seed: int = 11,
    write_json: AnnotationWriter | None = None,
) -> None:
    """Write ``block_info.csv`` and a few annotation files in the contract's record format,
    each through ``write_json`` (default: written as is)."""
    _write_json = write_json or _write_new_json
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / "block_info.csv") as file:
        file.write("{},{},{}\n".format(*BLOCK).encode())
    block = directory / "x0y0z0"
    block.mkdir(exist_ok=True)
    fibers = []
    for i in range(3):
        points = [[round(float(v), 2) for v in rng.uniform((0, 0, 0), BLOCK)] for _ in range(4)]
        length = sum(math.dist(a, b) for a, b in itertools.pairwise(points))
        fibers.append(
            {
                "points": points,
                "type": "linestring",
                "id": record_id("fiber", i),
                "anntype": "axon",
                "reviewed": False,
                "visited": False,
                "length": round(length),
            }
        )
    centroids = [
        {
            "point": [round(float(v), 2) for v in rng.uniform((0, 0, 0), BLOCK)],
            "type": "point",
            "id": record_id("centroid", i),
            "anntype": "neuron",
            "reviewed": False,
            "visited": False,
        }
        for i in range(5)
    ]
    _write_json(block / "fibers.json", fibers)
    _write_json(block / "centroids.json", centroids)
    for z in (10, 20, 30):
        cx, cy = rng.uniform(20, 80), rng.uniform(20, 70)
        polygon = [
            [round(cx + 8 * math.cos(a), 2), round(cy + 6 * math.sin(a), 2), z]
            for a in np.linspace(0, 2 * math.pi, 7)[:-1]
        ]
        records = [
            {
                "points": polygon,
                "type": "polygon",
                "id": record_id("contour", z),
                "anntype": "neuron" if z != 20 else "glia",
                "reviewed": z == 10,
                "visited": True,
            },
            {
                "point": [round(cx, 2), round(cy, 2), z],
                "type": "point",
                "id": record_id("centre", z),
                "anntype": "neuron",
                "reviewed": False,
                "visited": False,
            },
        ]
        _write_json(block / f"z-{z:04d}.json", records)


def _write_new_json(path: Path, records: list[dict[str, object]]) -> None:
    """Write an annotation file's records as compact JSON (the default :data:`AnnotationWriter`)."""
    with atomic_file(path) as file:
        file.write(json.dumps(records, separators=(",", ":")).encode())


def store_writer(directory: Path) -> AnnotationWriter:
    """A writer that saves annotation files through the server's store (a ``PUT``): the
    content a file had is kept as a version, as for any write; an unchanged file makes none."""
    from neurotrale_twisted.core.annotations.store import AnnotationStore
    from neurotrale_twisted.core.paths import DataRoot

    store = AnnotationStore(DataRoot(directory))

    def write(path: Path, records: list[dict[str, object]]) -> None:
        store.put(path, json.dumps(records).encode())

    return write


def write_demo(
    directory: Path,
    name: str = "demo-brain",
    compression: str = "none",
    write_json: AnnotationWriter | None = None,
) -> Path:
    """Write the demo dataset under ``directory``; return its path. Annotation files go
    through ``write_json`` (default: written as is; :func:`store_writer` keeps versions)."""
    dataset = directory / name
    # The image pyramid is what neurotrale-ingest writes of this volume: the same info, chunk
    # files and downsampler (the 2x2x2 block mean rounded half up; a block at an odd edge is
    # averaged over the voxels it holds).
    write_volume(dataset, microscopy_volume(DEMO_SIZE), LEVELS, CHUNK, VOXEL_SIZE, compression)
    write_annotations(dataset / "annotations", DEMO_SIZE, write_json=write_json)
    return dataset


def main(argv: list[str] | None = None) -> None:
    """Command line: ``neurotrale-demo DIR [--compression zlib] [--force]``."""
    parser = ArgumentParser(prog="neurotrale-demo", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where to write the dataset")
    parser.add_argument(
        "--name", default="demo-brain", help="the dataset's directory name (default demo-brain)"
    )
    parser.add_argument(
        "--compression",
        choices=[*COMPRESSIONS, "lzw"],
        default="none",
        help="TIFF compression of the chunk files (default none)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="write over an existing dataset of that name: its annotation files are saved as "
        "the server saves them, so the content they had is kept as a version",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {project_version()}")
    args = parser.parse_args(argv)
    if args.name in ("", ".", "..") or "/" in args.name or "\\" in args.name:
        parser.error(f"--name {args.name!r}: must be one directory name, not a path")
    target = args.directory / args.name
    writer = None
    if target.exists():
        if not args.force:
            print(
                f"{parser.prog}: error: {target} already exists; serve it as it is "
                f"(neurotrale --path {args.directory}), or pass --force to write the demo "
                "over it (annotation files it changes keep their content as a version)",
                file=sys.stderr,
            )
            sys.exit(EXIT_USAGE)
        writer = store_writer(args.directory)
    try:
        dataset = write_demo(args.directory, args.name, args.compression, write_json=writer)
    except OSError as e:
        where = e.filename if e.filename is not None else target
        print(f"{parser.prog}: error: cannot write {where}: {e.strerror or e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
    print(
        f"wrote {dataset}; serve it with: neurotrale --path {args.directory} "
        "--listen tcp:9000:interface=127.0.0.1"
    )


if __name__ == "__main__":
    main()
