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
import tifffile

from neurotrale_twisted import project_version
from neurotrale_twisted.tools.arguments import EXIT_USAGE, ArgumentParser

#: Writes one annotation file's records (the demo's own writer, or the server's store).
AnnotationWriter = Callable[[Path, list[dict[str, object]]], None]

#: Exit status when the directory cannot be written (a refused command line: EXIT_USAGE).
EXIT_FAILED = 1

#: The demo volume's size in voxels (x, y, z): deliberately not a multiple of the chunk size.
DEMO_SIZE = (200, 176, 72)
CHUNK = (64, 64, 32)
#: Voxel size in nanometres, as precomputed-tif writes it (1.8 x 1.8 x 2.0 µm).
RESOLUTION = (1800, 1800, 2000)
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


def downsample(volume: np.ndarray) -> np.ndarray:
    """Halve a (z, y, x) volume by the mean of 2x2x2 blocks (edges padded by repetition)."""
    pad = [(0, s % 2) for s in volume.shape]
    padded = np.pad(volume, pad, mode="edge").astype(np.float32)
    z, y, x = padded.shape
    blocks = padded.reshape(z // 2, 2, y // 2, 2, x // 2, 2)
    halved: np.ndarray = blocks.mean(axis=(1, 3, 5)).round().astype(volume.dtype)
    return halved


def write_scale(
    directory: Path,
    volume: np.ndarray,
    compression: str | None,
    chunk: tuple[int, int, int] = CHUNK,
) -> None:
    """Write one scale's chunks of ``chunk`` (x, y, z) voxels as ``x0-x1_y0-y1_z0-z1.tiff``."""
    directory.mkdir(parents=True, exist_ok=True)
    z, y, x = volume.shape
    cx, cy, cz = chunk
    for z0 in range(0, z, cz):
        for y0 in range(0, y, cy):
            for x0 in range(0, x, cx):
                x1, y1, z1 = min(x0 + cx, x), min(y0 + cy, y), min(z0 + cz, z)
                name = f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}.tiff"
                tifffile.imwrite(
                    directory / name,
                    volume[z0:z1, y0:y1, x0:x1],
                    photometric="minisblack",
                    compression=compression,
                )


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
    (directory / "block_info.csv").write_text("{},{},{}\n".format(*BLOCK))
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
    path.write_text(json.dumps(records, separators=(",", ":")))


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
    compression: str | None = None,
    write_json: AnnotationWriter | None = None,
) -> Path:
    """Write the demo dataset under ``directory``; return its path. Annotation files go
    through ``write_json`` (default: written as is; :func:`store_writer` keeps versions)."""
    dataset = directory / name
    dataset.mkdir(parents=True, exist_ok=True)
    volume = microscopy_volume(DEMO_SIZE)
    scales = []
    for level in range(3):
        factor = 2**level
        key = f"{factor}_{factor}_{factor}"
        z, y, x = volume.shape
        write_scale(dataset / key, volume, compression)
        scales.append(
            {
                "chunk_sizes": [list(CHUNK)],
                "encoding": "raw",
                "key": key,
                "resolution": [r * factor for r in RESOLUTION],
                "size": [x, y, z],
                "voxel_offset": [0, 0, 0],
            }
        )
        volume = downsample(volume)
    info = {
        "data_type": "uint16",
        "mesh": "mesh",
        "num_channels": 1,
        "scales": scales,
        "type": "image",
    }
    (dataset / "info").write_text(json.dumps(info, indent=2))
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
        choices=["none", "zlib", "zstd", "lzw"],
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
    compression = None if args.compression == "none" else args.compression
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
        dataset = write_demo(args.directory, args.name, compression, write_json=writer)
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
